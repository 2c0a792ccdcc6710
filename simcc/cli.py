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


def _torch_or_exit(command: str):
    try:
        import torch
    except ImportError:
        raise InputError(command, "", "needs torch: pip install 'simcc[profile]'") from None
    return torch


@main.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Default: bf16 on cuda, fp32 on cpu.")
@click.option("--quick", is_flag=True, help="Small shapes and few repeats (a CPU run stays under two minutes).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Measurements CSV to write.")
def profile(device: str, dtype: str | None, quick: bool, out_path: str) -> None:
    """Time real torch kernels (GEMMs, grouped expert GEMMs, gate, dispatch/combine, attention, copies,
    LSTM, whole MoE layers) on this machine and write a measurements table."""
    torch = _torch_or_exit("simcc profile")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda", "", f"CUDA is not available here (torch {torch.__version__}); use --device cpu")
    from rich.progress import Progress

    from simcc.profile.kernels import run_profile
    from simcc.sim.trace import write_atomically

    with Progress(transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def advance(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        table = run_profile(device, dtype or ("bf16" if device == "cuda" else "fp32"), quick, advance)
    write_atomically(Path(out_path), table.to_csv(index=False))
    click.echo(f"wrote {len(table)} measurements on {table['device_name'].iloc[0]} to {out_path}")


@main.command()
@click.argument("measurements")
@click.option("--base", required=True, help="Hardware profile to start from (path or shipped name).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Calibrated profile to write.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def calibrate(measurements: str, base: str, out_path: str, fmt: str) -> None:
    """Fit MEASUREMENTS into a calibrated profile, and report the error on held-out measurements."""
    from simcc.calibrate.fit import calibrate as fit, calibrated_profile_yaml, error_summary
    from simcc.calibrate.measurements import check_device, read_measurements
    from simcc.sim.trace import write_atomically
    from simcc.specs.hardware import system_from
    from simcc.specs.loader import load_profile_model

    base_profile, base_source = load_profile_model(base)
    out = Path(out_path).resolve()
    if out in (Path(base_source).resolve(), Path(measurements).resolve()):
        raise InputError(out_path, "--out", "would overwrite an input; choose a new file")
    frame = read_measurements(measurements)
    device = system_from(base_profile, base_source).device
    check_device(frame, device, measurements, base_source)
    report = fit(frame, device, measurements)
    write_atomically(out, calibrated_profile_yaml(base_profile, report.device))
    held = report.errors[report.errors["held_out"]]
    summary = error_summary(held)
    click.echo(_render_errors(summary, fmt, f"held-out prediction error ({len(held)} of {len(report.errors)} kernels)"), nl=False)
    for note in report.notes:
        click.echo(f"note: {note}")
    if fmt == "table":
        click.echo(f"wrote {out_path}")


@main.command()
@click.option("--profile", "profile_name", required=True, help="Hardware profile (e.g. one written by calibrate).")
@click.option("--measurements", required=True, help="Measurements CSV from `simcc profile`.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def validate(profile_name: str, measurements: str, fmt: str) -> None:
    """Predicted vs measured for every measured kernel and MoE layer, with signed error."""
    from simcc.calibrate.fit import error_summary, prediction_errors
    from simcc.calibrate.measurements import check_device, read_measurements
    from simcc.specs.loader import load_hardware

    system = load_hardware(profile_name)
    frame = read_measurements(measurements)
    check_device(frame, system.device, measurements, system.source_file)
    errors = prediction_errors(frame, system.device)
    if fmt != "table":
        click.echo(errors.to_json(orient="records", indent=2) + "\n" if fmt == "json" else errors.to_csv(index=False), nl=False)
        return
    for _, row in errors.iterrows():
        click.echo(f"{row['case']:28s} {row['family']:13s} measured {row['measured_s'] * 1e3:10.4f} ms  "
                   f"predicted {row['predicted_s'] * 1e3:10.4f} ms  {row['error'] * 100:+7.1f}%")
    click.echo(_render_errors(error_summary(errors), "table", "summary"), nl=False)


def _render_errors(summary, fmt: str, title: str) -> str:
    if fmt == "json":
        return summary.to_json(orient="records", indent=2) + "\n"
    if fmt == "csv":
        return summary.to_csv(index=False)
    lines = [title, f"  {'family':14s} {'points':>6s} {'median |err|':>13s} {'worst |err|':>12s}"]
    for _, row in summary.iterrows():
        lines.append(f"  {row['family']:14s} {row['points']:6d} {row['median_abs_error'] * 100:12.1f}% "
                     f"{row['worst_abs_error'] * 100:11.1f}%")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
