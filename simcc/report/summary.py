"""One flat row per estimate: the figures people choose a configuration by. `compare` and `sweep`
both tabulate these rows, so the two commands agree with each other and with `estimate`."""

from __future__ import annotations

from typing import Any

from simcc.costs.money import SECONDS_PER_HOUR
from simcc.results import Estimate, StepSection, TrainingRunSection
from simcc.specs.hardware import System

BREAKDOWN = StepSection.BREAKDOWN
COLUMNS = ("workload", "hardware", "devices", "status", "reason", "step_s", "tokens_per_s",
           "tflops_per_device", "mfu", "memory_gb", "memory_capacity_gb", "fits", "days", "device_hours", "usd", "kwh",
           "seconds_per_million_tokens", "usd_per_million_tokens", *BREAKDOWN)


def summary_row(result: Estimate, system: System) -> dict[str, Any]:
    """Training reports its step; serving its output tokens. $ per million tokens is the devices'
    hourly price over the tokens an hour produces (Calculon-style cost per unit of work)."""
    assert result.memory is not None  # every estimate sizes memory, simulated or not
    memory, step, throughput = result.memory, result.step, result.throughput  # no throughput: not simulated
    run = result.run if isinstance(result.run, TrainingRunSection) else None
    tokens_per_s = result.tokens_per_s
    price = system.price.usd_per_device_hour if system.price else None
    per_million = (system.devices * price / SECONDS_PER_HOUR / tokens_per_s * 1e6
                   if price is not None and tokens_per_s else None)
    fits = memory.fits
    row: dict[str, Any] = {
        "workload": result.workload, "hardware": result.hardware, "devices": system.devices,
        "status": "ok" if fits else "does not fit",
        "reason": "" if fits else next((n for n in result.notes if n.startswith("does not fit")), "does not fit"),
        "step_s": step.step_s if step else None, "tokens_per_s": tokens_per_s,
        "tflops_per_device": throughput.model_tflops_per_device if throughput else None,
        "mfu": throughput.mfu if throughput else None,
        "memory_gb": memory.total_gb, "memory_capacity_gb": memory.capacity_gb, "fits": fits,
        "days": run.days if run else None, "device_hours": run.device_hours if run else None,
        "usd": run.usd if run else None, "kwh": run.kwh if run else None,
        "seconds_per_million_tokens": 1e6 / tokens_per_s if tokens_per_s else None,
        "usd_per_million_tokens": per_million,
    }
    row.update(step.breakdown() if step else {key: None for key in BREAKDOWN})
    return row


def invalid_row(workload: str, hardware: str, reason: str) -> dict[str, Any]:
    """A configuration that cannot be estimated (a degree that does not divide, a dtype the device
    lacks): kept in the table with the reason, never silently dropped."""
    row: dict[str, Any] = {key: None for key in COLUMNS}
    row.update({"workload": workload, "hardware": hardware, "status": "invalid", "reason": reason, "fits": False})
    return row


def mark_best(rows: list[dict[str, Any]]) -> None:
    """Mark the fastest (most tokens per second) and the cheapest ($ per million tokens) among the
    configurations that fit."""
    for row in rows:
        row["mark"] = ""
    ok = [r for r in rows if r["status"] == "ok" and r["tokens_per_s"]]
    if not ok:
        return
    fastest = max(ok, key=lambda r: r["tokens_per_s"])
    fastest["mark"] = "fastest"
    priced = [r for r in ok if r["usd_per_million_tokens"] is not None]
    if priced:
        cheapest = min(priced, key=lambda r: r["usd_per_million_tokens"])
        cheapest["mark"] = ", ".join(filter(None, [cheapest["mark"], "cheapest"]))
