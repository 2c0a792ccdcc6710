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
def estimate(workload: str, hardware: str, fmt: str, overrides: tuple[str, ...]) -> None:
    """Estimate step time, memory, throughput, cost and energy of WORKLOAD on a hardware profile."""
    from simcc.estimate import estimate as run_estimate
    from simcc.report.render import RENDERERS
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_overrides, hardware_overrides = split_overrides(list(overrides))
    spec, source = load_workload(workload, workload_overrides)
    system = load_hardware(hardware, hardware_overrides)
    click.echo(RENDERERS[fmt](run_estimate(spec, system, source)), nl=False)


@main.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def list_command(fmt: str) -> None:
    """List shipped hardware profiles and workloads."""
    from simcc.specs.catalog import catalog, render_catalog

    click.echo(render_catalog(catalog(), fmt), nl=False)


if __name__ == "__main__":
    main()
