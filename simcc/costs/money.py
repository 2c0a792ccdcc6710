"""Money and energy of a run from its duration and how busy its devices are."""

from __future__ import annotations

from dataclasses import dataclass

from simcc.specs.hardware import System

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class RunTotals:
    seconds: float
    device_hours: float
    usd: float | None
    kwh: float


def device_power_w(system: System, busy_fraction: float) -> float:
    """Linear power model between idle and TDP, weighted by the time the device computes."""
    power = system.device.power
    busy = min(max(busy_fraction, 0.0), 1.0)
    return power.idle_w + busy * (power.tdp_w - power.idle_w)


def run_totals(system: System, seconds: float, busy_fraction: float) -> RunTotals:
    """$ = devices x hours x price; energy = devices x hours x device power (device draw only:
    host CPUs, NICs and cooling are not counted)."""
    hours = seconds / SECONDS_PER_HOUR
    device_hours = system.devices * hours
    usd = device_hours * system.price.usd_per_device_hour if system.price else None
    kwh = system.devices * device_power_w(system, busy_fraction) * seconds / JOULES_PER_KWH
    return RunTotals(seconds, device_hours, usd, kwh)
