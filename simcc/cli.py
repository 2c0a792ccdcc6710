"""Command line: parse arguments, call the library, print. No modelling happens here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from simcc.errors import InputError

FORMATS = click.Choice(["table", "json", "csv"])


class SimccGroup(click.Group):
    """Turns InputError into one line on stderr and exit code 2 (click's code for bad usage)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(2)


@click.group(cls=SimccGroup)
@click.version_option(package_name="simcc")
def main() -> None:
    """simcc: how fast, how much memory, what cost, for MoE and conditional-computation models."""


@main.command()
@click.argument("workload")
@click.option("--hardware", "-H", required=True, help="Hardware profile: a YAML path or a shipped name (simcc list).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a workload field (or hardware.FIELD for the profile); validated like the file.")
@click.option("--steps", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Training steps to simulate, each with a fresh expert-load draw.")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed for load draws (default: the workload's).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Write the simulated training timeline as Chrome/Perfetto trace-event JSON.")
@click.option("--requests", "request_count", type=click.IntRange(1, 10_000_000), default=2000, show_default=True,
              help="Serving: Poisson requests to simulate.")
@click.option("--requests-trace", type=click.Path(dir_okay=False), default=None,
              help="Serving: CSV of arrival_s, prompt_tokens, output_tokens[, compute_scale] instead of Poisson arrivals.")
def estimate(workload: str, hardware: str, fmt: str, overrides: tuple[str, ...], steps: int, seed: int | None,
             trace_path: str | None, request_count: int, requests_trace: str | None) -> None:
    """Estimate step time, memory, throughput, cost and energy of WORKLOAD on a hardware profile."""
    from simcc.estimate import SimulationOptions
    from simcc.estimate import estimate as run_estimate
    from simcc.report.render import RENDERERS
    from simcc.sim.serving import read_trace
    from simcc.sim.trace import Trace, write_trace
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_overrides, hardware_overrides = split_overrides(list(overrides))
    if seed is not None:
        workload_overrides.append(f"seed={seed}")
    spec, source = load_workload(workload, workload_overrides)
    system = load_hardware(hardware, hardware_overrides)
    trace = Trace(enabled=trace_path is not None)
    requests = read_trace(requests_trace) if requests_trace else None
    options = SimulationOptions(steps=steps, trace=trace, request_count=request_count, requests=requests)
    result = run_estimate(spec, system, source, options)
    if trace_path is not None:
        write_trace(trace, Path(trace_path))
    click.echo(RENDERERS[fmt](result), nl=False)


@main.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def list_command(fmt: str) -> None:
    """List shipped hardware profiles and workloads."""
    from simcc.specs.catalog import catalog, render_catalog

    click.echo(render_catalog(catalog(), fmt), nl=False)


if __name__ == "__main__":
    main()
