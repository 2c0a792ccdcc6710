"""The sweep's picture: every configuration by time and cost with its Pareto front, and where
the step time of the best few goes. matplotlib is imported here only."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from simcc.report.summary import BREAKDOWN
from simcc.io import write_atomically

BEST_SHOWN = 6


def label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes)


def varying(table: pd.DataFrame, axes: list[str]) -> list[str]:
    """The axes that take more than one value: the others say nothing in a label."""
    return [a for a in axes if table[a].nunique(dropna=False) > 1] or axes[:1]


def plot_sweep(table: pd.DataFrame, front: pd.DataFrame, x: str, y: str, axes: list[str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from simcc.errors import InputError

        raise InputError("--plot", str(out), "needs matplotlib: pip install 'simcc[sweep]'") from None
    ok = table[table["status"] == "ok"]
    axes = varying(table, axes)
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    for hardware, group in ok.groupby("hardware", sort=False):  # one colour per profile
        scatter.scatter(group[x], group[y], s=14, alpha=0.5, label=f"{hardware}: {len(group)} that fit")
    scatter.plot(front[x], front[y], "o-", color="crimson", label="Pareto front")
    for _, row in front.head(BEST_SHOWN).iterrows():
        scatter.annotate(label(row, axes), (row[x], row[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    scatter.set_xlabel(x)
    scatter.set_ylabel(y)
    scatter.set_title("time vs cost")
    scatter.legend(fontsize=8)

    best = ok.sort_values(x, kind="stable").head(BEST_SHOWN)
    names = [label(row, axes) for _, row in best.iterrows()]
    bottom = [0.0] * len(best)
    for part in BREAKDOWN:
        values = best[part].fillna(0.0).tolist()
        bars.barh(names, values, left=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    bars.invert_yaxis()  # fastest on top
    bars.set_xlabel("seconds per step (critical stage)")
    bars.set_title(f"where the step goes, the {len(best)} fastest")
    bars.legend(fontsize=8)
    bars.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(out, buffer.getvalue())
