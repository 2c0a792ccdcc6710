"""Least-squares non-decreasing fit (isotonic regression, by pooling adjacent violators), for
quantities that cannot fall along an axis: a calibrated efficiency curve over kernel size, an
expert's share of the tokens over its popularity."""

from __future__ import annotations


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares."""
    merged: list[list[float]] = []
    for value, weight in zip(values, weights):
        merged.append([value, weight, 1])
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            value2, weight2, count2 = merged.pop()
            value1, weight1, count1 = merged.pop()
            total = weight1 + weight2
            merged.append([(value1 * weight1 + value2 * weight2) / total, total, count1 + count2])
    out: list[float] = []
    for value, _, count in merged:
        out += [value] * int(count)
    return out
