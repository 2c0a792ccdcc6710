"""Pareto front of two costs to minimise (time and money)."""

from __future__ import annotations

import pandas as pd


def pareto_front(table: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows no other row beats in both x and y (lower is better), by increasing x. Of identical
    points the first is kept; rows missing either value are not candidates."""
    candidates = table.dropna(subset=[x, y]).sort_values([x, y], kind="stable")
    keep, best_y = [], float("inf")
    for index, row in candidates.iterrows():
        if row[y] < best_y:
            keep.append(index)
            best_y = row[y]
    return candidates.loc[keep]


def time_and_cost_columns(table: pd.DataFrame) -> tuple[str, str]:
    """Whole-run days and $ when the workload gives total tokens, else seconds and $ per million
    tokens (which rank configurations the same way for any fixed token budget)."""
    ok = table[table["status"] == "ok"]
    if not ok.empty and ok["days"].notna().all() and ok["usd"].notna().all():
        return "days", "usd"
    return "seconds_per_million_tokens", "usd_per_million_tokens"
