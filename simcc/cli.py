"""Command line: parse arguments, call the library, print. No modelling happens here."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import click

from simcc.errors import InputError
from simcc.io import check_output, note_input

FORMATS = click.Choice(["table", "json", "csv"])


class FinitePositive(click.FloatRange):
    """A positive finite number up to `most` (seconds, days, dollars): click's range compares, and
    'nan' compares false with every bound, so it is refused here by name."""

    def __init__(self, unit: str, most: float) -> None:
        super().__init__(min=0, min_open=True, max=most)
        self.name = unit
        self.unit = unit

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number of {self.unit}; expected 0 < x <= {self.max:g}", param, ctx)
        return number


class SimccGroup(click.Group):
    """Turns InputError into one line on stderr and exit code 2 (click's code for bad usage)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(2)
        except OSError as err:  # the file system refused a path the user gave (too long, not permitted)
            name = str(err.filename or "")
            shown = name if len(name) <= 120 else name[:117] + "..."
            click.echo(f"error: {shown}: {err.strerror or err}", err=True)
            sys.exit(2)
        except click.UsageError as err:  # a bad option value: one line too, not click's usage block
            command = err.ctx.command_path if err.ctx else "simcc"
            click.echo(f"error: {command}: {err.format_message()}".replace("\n", " "), err=True)
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
@click.option("--steps", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Training steps to simulate: 1 plays the expected expert loads; more each draw fresh loads (for step_p95_s).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed for load draws (default: the workload's).")
@click.option("--trace", "trace_path", default=None,
              help="Write the simulated training timeline as Chrome/Perfetto trace-event JSON.")
@click.option("--requests", "request_count", type=click.IntRange(1, 10_000_000), default=2000, show_default=True,
              help="Serving: Poisson requests to simulate.")
@click.option("--layer", "layer", type=click.IntRange(0), default=None,
              help="Cost one block alone (its index in the expanded model, from 0) for one micro-batch on one device.")
@click.option("--pass", "passes", type=click.Choice(["forward", "backward", "both"]), default="forward", show_default=True,
              help="With --layer: the forward pass, the backward (with recomputation), or both.")
@click.option("--layers", is_flag=True, default=False,
              help="A table of every block for one micro-batch on one device: FLOPs, bytes moved, forward, backward "
                   "and recomputation time, communication, activations kept.")
@click.option("--requests-trace", default=None,
              help="Serving: CSV of arrival_s, prompt_tokens, output_tokens[, compute_scale] instead of Poisson arrivals.")
@click.option("--slo-ttft", type=FinitePositive("seconds", 1e6), default=None,
              help="Serving: time-to-first-token objective in seconds; reports goodput (requests meeting every SLO).")
@click.option("--slo-tpot", type=FinitePositive("seconds", 1e6), default=None,
              help="Serving: time-per-output-token objective in seconds; reports goodput.")
def estimate(workload: str, hardware: str, fmt: str, overrides: tuple[str, ...], steps: int, seed: int | None,
             trace_path: str | None, request_count: int, layer: int | None, passes: str, layers: bool,
             requests_trace: str | None, slo_ttft: float | None, slo_tpot: float | None) -> None:
    """Estimate step time, memory, throughput, cost and energy of WORKLOAD on a hardware profile."""
    from simcc.estimate import SimulationOptions
    from simcc.estimate import estimate as run_estimate
    from simcc.report.render import RENDERERS
    from simcc.sim.serving import read_request_csv
    from simcc.sim.timeline import Timeline, write_timeline
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_overrides, hardware_overrides = split_overrides(list(overrides))
    if seed is not None:
        workload_overrides.append(f"seed={seed}")
    spec, source = load_workload(workload, workload_overrides)
    system = load_hardware(hardware, hardware_overrides)
    if layer is not None:
        from simcc.estimate import estimate_layer

        click.echo(RENDERERS[fmt](estimate_layer(spec, system, source, layer, passes)), nl=False)
        return
    if layers:
        from simcc.estimate import estimate_blocks

        click.echo(RENDERERS[fmt](estimate_blocks(spec, system, source)), nl=False)
        return
    timeline = Timeline(enabled=trace_path is not None)
    requests = read_request_csv(requests_trace) if requests_trace else None
    if trace_path is not None:
        check_output(trace_path, "--trace")
    options = SimulationOptions(steps=steps, timeline=timeline, request_count=request_count, requests=requests,
                                slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot)
    result = run_estimate(spec, system, source, options)
    if trace_path is not None:
        write_timeline(timeline, Path(trace_path), "--trace")
        if timeline.truncated:
            click.echo(f"note: the timeline keeps its first {len(timeline.events):,} events; simulate fewer "
                       "micro-batches or layers to see the whole step", err=True)
    click.echo(RENDERERS[fmt](result), nl=False)


COMPARE_COLUMNS = ["workload", "hardware", "devices", "step_s", "tokens_per_s", "tflops_per_device", "mfu",
                   "memory_gb", "fits", "days", "usd", "kwh", "usd_per_million_tokens", "mark", "reason"]


@main.command()
@click.argument("workloads", nargs=-1, required=True)
@click.option("--hardware", "-H", "profiles", multiple=True, required=True,
              help="Hardware profiles to compare (repeat, or several after one flag with the shell's help).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override applied to every configuration.")
@click.option("--steps", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="As for estimate: 1 plays the expected expert loads.")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None, help="Local processes (default: one per core).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def compare(workloads: tuple[str, ...], profiles: tuple[str, ...], overrides: tuple[str, ...], steps: int,
            jobs: int | None, fmt: str) -> None:
    """Every WORKLOAD on every --hardware profile, side by side; marks the fastest and the cheapest
    of those that fit, and says why the others do not."""
    from simcc.report.render import rows_output
    from simcc.report.summary import mark_best
    from simcc.sweep.run import Config, run_local

    _check_loadable(workloads, profiles, overrides)
    configs = [Config(w, h, tuple(overrides), steps=steps) for w in workloads for h in profiles]
    rows = run_local(configs, jobs)
    if all(row["status"] == "invalid" for row in rows):
        raise InputError(rows[0]["workload"], "", f"no configuration could be estimated; the first: {rows[0]['reason']}")
    mark_best(rows)
    click.echo(rows_output(rows, fmt, COMPARE_COLUMNS), nl=False)


@main.command()
@click.argument("spec_path", metavar="SWEEP.yaml")
@click.option("--out", "out_path", default=None,
              help="Results table: .csv or .parquet (written atomically).")
@click.option("--plot", "plot_path", default=None,
              help="PNG of time vs cost with the Pareto front, and the step breakdown of the best configurations.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None, help="Local processes (default: one per core).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: a summary and the Pareto front; json/csv: every configuration.")
def sweep(spec_path: str, out_path: str | None, plot_path: str | None, executor: str, address: str | None,
          jobs: int | None, fmt: str) -> None:
    """Estimate every combination of a sweep file's axes; keep the reason for each one that cannot
    run or fit; print the Pareto front of time vs cost."""
    import pandas as pd
    from rich.progress import Progress

    from simcc.report.render import rows_output
    from simcc.sweep.pareto import pareto_front, time_and_cost_columns
    from simcc.sweep.run import run_local, run_ray, sweep_configs
    from simcc.sweep.spec import load_sweep

    spec = load_sweep(spec_path)
    _check_loadable([spec.workload], spec.hardware, spec.set)
    _check_out_suffix(out_path)
    for path, option in ((out_path, "--out"), (plot_path, "--plot")):
        if path is not None:
            check_output(path, option)
    configs = sweep_configs(spec)
    if fmt == "table":
        click.echo(f"sweeping {len(configs):,} configurations")  # said up front, before any is run
    started = time.perf_counter()
    with Progress(transient=True, disable=fmt != "table") as bar:
        task = bar.add_task("sweeping", total=len(configs))
        advance = lambda done: bar.update(task, completed=done)  # noqa: E731
        rows = run_ray(configs, address, advance) if executor == "ray" else run_local(configs, jobs, advance)
    elapsed = time.perf_counter() - started
    table = pd.DataFrame(rows)
    if (table["status"] == "invalid").all():
        raise InputError(spec_path, "axes", f"no configuration could be estimated; the first: {rows[0]['reason']}")
    if out_path is not None:
        _write_table(table, Path(out_path))
    x, y = time_and_cost_columns(table)
    front = pareto_front(table[table["status"] == "ok"], x, y)
    axes = ["hardware", *spec.axes]
    if plot_path is not None:
        from simcc.sweep.plot import plot_sweep

        plot_sweep(table, front, x, y, axes, Path(plot_path))
    if fmt != "table":
        click.echo(rows_output(rows, fmt, []), nl=False)
        return
    counts = table["status"].value_counts().to_dict()
    click.echo(f"{len(table)} configurations in {elapsed:.1f} s ({len(table) / elapsed:.1f}/s, {executor}): "
               + ", ".join(f"{n} {status}" for status, n in counts.items()))
    for status in ("invalid", "does not fit"):
        reasons = table[table["status"] == status]["reason"].value_counts()
        for reason, n in reasons.head(3).items():
            click.echo(f"  {status} ({n}): {reason}")
    click.echo(f"\nPareto front, {x} vs {y} ({len(front)} configurations):")
    click.echo(rows_output(front.to_dict("records"), "table", [*axes, x, y, "tokens_per_s", "mfu", "memory_gb"]), nl=False)
    for path in filter(None, (out_path, plot_path)):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("workload")
@click.option("--hardware", "-H", required=True, help="Hardware profile: its device, node and network, and its price.")
@click.option("--devices", default=None, metavar="N|A..B",
              help="Device counts to search: N, or A..B (A, 2A, 4A, ... and B; whole nodes). Default: the profile's.")
@click.option("--max-days", type=FinitePositive("days", 1e6), default=None, help="Keep layouts whose whole run takes at most this many days.")
@click.option("--max-usd", type=FinitePositive("dollars", 1e15), default=None, help="Keep layouts whose whole run costs at most this many $.")
@click.option("--top", type=click.IntRange(1, 100), default=5, show_default=True, help="How many of the fastest layouts to print.")
@click.option("--space", "axes", multiple=True, metavar="AXIS=V1,V2",
              help="Values of one axis (tp, pp, vpp, ep, expert_tp, micro_batch, recompute, zero_stage, "
                   "sequence_parallel, dispatcher, overlap_moe_comm, overlap_grad_reduce, overlap_p2p); repeat for several.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a workload field (or hardware.FIELD for the profile) before the search; validated like the file.")
@click.option("--plot", "plot_path", default=None, help="PNG of every simulated layout by time and cost, with the Pareto front.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None,
              help="Local processes, each searching every n-th layout (default: one per core).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: the top layouts, why the winner wins, the front; json/csv: every simulated layout.")
def search(workload: str, hardware: str, devices: str | None, max_days: float | None, max_usd: float | None, top: int,
           axes: tuple[str, ...], overrides: tuple[str, ...], plot_path: str | None, executor: str,
           address: str | None, jobs: int | None, fmt: str) -> None:
    """Find the fastest layouts of a training WORKLOAD that fit: every valid parallel layout on the
    device counts asked for, pruned by memory and by a lower bound on the step, the rest simulated."""
    from dataclasses import replace

    from simcc.search.render import render
    from simcc.search.run import Budget, SearchRequest, run_search
    from simcc.search.space import SearchSpace, parse_axis
    from simcc.specs.loader import split_overrides

    space = SearchSpace()
    for text in axes:
        name, values = parse_axis(text)
        space = replace(space, **{name: values})
    _check_loadable([workload], [hardware], overrides)  # and so known as inputs, which no output may replace
    if plot_path is not None:
        check_output(plot_path, "--plot")
    workload_sets, hardware_sets = split_overrides(list(overrides))
    request = SearchRequest(workload, tuple(workload_sets), hardware, tuple(hardware_sets), devices, space, top,
                            Budget(max_days, max_usd))
    result = run_search(request, executor, jobs, address)
    if plot_path is not None and result.simulated:
        import pandas as pd

        from simcc.search.render import result_rows
        from simcc.sweep.pareto import time_and_cost_columns
        from simcc.sweep.plot import plot_sweep

        table = pd.DataFrame(result_rows(result)).assign(hardware=hardware)
        x, y = time_and_cost_columns(table)
        plot_sweep(table, table[table["on_front"]], x, y, ["layout"], Path(plot_path))
    click.echo(render(result, fmt), nl=False)
    if plot_path is not None and fmt == "table":
        click.echo(f"wrote {plot_path}")


def _check_loadable(workloads: Iterable[str], profiles: Iterable[str], overrides: Iterable[str]) -> None:
    """Before any configuration runs: a missing file or a bad shared override is the user's error
    (exit 2), not a table of identical invalid rows."""
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides(list(overrides))
    for workload in workloads:
        load_workload(workload, workload_sets)
    for hardware in profiles:
        load_hardware(hardware, hardware_sets)


def _check_out_suffix(out_path: str | None) -> None:
    if out_path is not None and Path(out_path).suffix not in (".csv", ".parquet"):
        raise InputError("--out", out_path, "expected a .csv or .parquet file name")


def _write_table(table, path: Path) -> None:
    from simcc.io import write_atomically

    if path.suffix == ".parquet":
        import io

        buffer = io.BytesIO()
        try:
            table.to_parquet(buffer, index=False)
        except ImportError:
            raise InputError("--out", str(path), "Parquet needs pyarrow: pip install pyarrow (or write .csv)") from None
        write_atomically(path, buffer.getvalue(), "--out")
    else:
        write_atomically(path, table.to_csv(index=False), "--out")


@main.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def list_command(fmt: str) -> None:
    """List shipped hardware profiles and workloads."""
    from simcc.report.catalog import catalog, render_catalog

    click.echo(render_catalog(catalog(), fmt), nl=False)


def _torch_or_exit(command: str):
    try:
        import torch
    except ImportError:
        raise InputError(command, "", "needs torch: pip install 'simcc[profile]'") from None
    return torch


@main.group(invoke_without_command=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Default: bf16 on cuda, fp32 on cpu.")
@click.option("--quick", is_flag=True, help="Small shapes and short timing (a CPU run stays under two minutes).")
@click.option("--out", "out_path", default=None, help="Measurements CSV to write.")
@click.option("--ffn-shape", "ffn_shapes", multiple=True, metavar="HIDDENxFFNxEXPERTS",
              help="Time the MoEfication clustering (an SSD switch) at your model's FFN, e.g. 768x3072x32. Repeatable.")
@click.option("--processes", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="CPU: processes that will share this host in the runs you estimate (ranks per node).")
@click.option("--threads", type=click.IntRange(1, 4096), default=None,
              help="CPU: threads per process to time with (default: the host's cores / --processes).")
@click.pass_context
def profile(ctx: click.Context, device: str, dtype: str | None, quick: bool, out_path: str | None,
            ffn_shapes: tuple[str, ...], processes: int, threads: int | None) -> None:
    """Time real torch kernels (GEMMs, grouped expert GEMMs, gate, dispatch/combine, attention, copies,
    LSTM, MoEfication clustering, whole MoE layers) on this machine and write a measurements table.
    `simcc profile comm` measures collectives instead."""
    if ctx.invoked_subcommand is not None:
        return
    if out_path is None:
        raise click.UsageError("Missing option '--out'.")
    check_output(out_path, "--out")  # before minutes of profiling, not after
    shapes = tuple(_ffn_shape(text) for text in ffn_shapes)
    torch = _torch_or_exit("simcc profile")
    _check_cuda(torch, device)
    from simcc.io import write_atomically
    from simcc.profile.kernels import run_profile

    if device == "cpu":  # each process of a multi-process run has only its share of the cores
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // processes))
    with _progress("profiling") as advance:
        table = run_profile(device, dtype or ("bf16" if device == "cuda" else "fp32"), quick, advance, shapes)
    write_atomically(Path(out_path), table.to_csv(index=False), "--out")
    click.echo(f"wrote {len(table)} measurements on {table['device_name'].iloc[0]} to {out_path}")


PLAIN_PROGRESS_EVERY_S = 30.0


@contextlib.contextmanager
def _progress(label: str):
    """A progress callback (done, total, name): a live bar on a terminal; elsewhere (a log file, CI)
    a plain line on stderr every half minute, so a long run is never silent."""
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total, name: bar.update(task, completed=done, total=total, description=name)
        return
    started = last = time.monotonic()

    def report(done: int, total: int, name: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PLAIN_PROGRESS_EVERY_S or done == total:
            last = now
            click.echo(f"{label}: {done}/{total} ({name}), {now - started:.0f} s", err=True)

    yield report


def _ffn_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[1]) % int(parts[2]):
        raise InputError("--ffn-shape", text, "expected HIDDENxFFNxEXPERTS, positive integers with EXPERTS dividing FFN")
    hidden, ffn, experts = map(int, parts)
    return hidden, ffn, experts


@profile.command("comm")
@click.option("--ranks", type=click.IntRange(2, 1024), default=2, show_default=True,
              help="Local processes to start (ignored under torchrun, which sets the world).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="Messages up to 4 MB only.")
@click.option("--out", "out_path", required=True)
def profile_comm(ranks: int, device: str, quick: bool, out_path: str) -> None:
    """Time all-reduce, all-gather, reduce-scatter, all-to-all and point-to-point over message sizes
    (gloo across local CPU processes; NCCL across GPUs). Multi-GPU or multi-node:
    `torchrun --nproc-per-node 8 -m simcc profile comm --device cuda --out comm.csv`."""
    check_output(out_path, "--out")
    torch = _torch_or_exit("simcc profile comm")
    _check_cuda(torch, device)
    from simcc.profile.comm import run_comm_profile

    run_comm_profile(ranks, device, quick, out_path)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote collective measurements to {out_path}")


def _check_cuda(torch, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda", "", f"CUDA is not available here (torch {torch.__version__}); use --device cpu")


@main.command()
@click.argument("measurements", nargs=-1, required=True)
@click.option("--base", required=True, help="Hardware profile to start from (path or shipped name).")
@click.option("--out", "out_path", required=True, help="Calibrated profile to write.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def calibrate(measurements: tuple[str, ...], base: str, out_path: str, fmt: str) -> None:
    """Fit MEASUREMENTS (kernel tables from `simcc profile`, collective tables from `simcc profile
    comm`) into a calibrated profile, and report the prediction error on held-out measurements."""
    import pandas as pd

    from simcc.calibrate import fit as F
    from simcc.calibrate.measurements import check_device, measurement_kind, read_collectives, read_measurements
    from simcc.io import write_atomically
    from simcc.specs.hardware import Device, Edge, device_of, system_from
    from simcc.specs.loader import load_profile_model

    base_profile, base_source = load_profile_model(base)  # notes the base and the devices it names
    for path in measurements:
        note_input(path)
    out = check_output(out_path, "--out").resolve()  # never an input, before anything is fitted
    device = device_of(base_profile)  # as written: the measurements' own threads are recorded below
    held_errors, notes, fits = [], [], None
    kernel_files = [m for m in measurements if measurement_kind(m) == "kernels"]
    comm_files = [m for m in measurements if m not in kernel_files]
    if kernel_files:
        frame = pd.concat([read_measurements(m) for m in kernel_files], ignore_index=True)
        check_device(frame, device, kernel_files[0], base_source)
        report = F.calibrate(frame, device, ", ".join(kernel_files))
        device, notes = report.device, report.notes
        errors = report.errors
        held_errors.append(errors[errors["held_out"] & ~errors["contended"]])  # a contended timing is no reference
        unscored = int((errors["held_out"] & errors["contended"]).sum())
        if unscored:
            notes = [*notes, f"{unscored} held-out timings were contended and are not scored"]
    comm = None
    if comm_files:
        if isinstance(base_profile, (Device, Edge)):
            raise InputError(base_source, "kind", "collective measurements need a node or cluster profile (the link they measure)")
        comm = pd.concat([read_collectives(m) for m in comm_files], ignore_index=True)
        check_device(comm, device, comm_files[0], base_source)
        held = F.comm_held_out(comm)
        fits = F.fit_collectives(comm[~held])
    profile = F.calibrated_profile(base_profile, device, fits)
    write_atomically(out, F.profile_yaml(profile), "--out")
    if comm is not None:
        errors = F.collective_errors(comm, system_from(profile, str(out)))
        held_errors.append(errors[F.comm_held_out(comm).to_numpy()])
    held = pd.concat(held_errors, ignore_index=True)
    click.echo(_render_errors(F.error_summary(held), fmt, f"held-out prediction error ({len(held)} measurements)"), nl=False)
    for note in notes:
        click.echo(f"note: {note}", err=fmt != "table")  # json and csv stay parseable
    if fmt == "table":
        click.echo(f"wrote {out_path}")


@main.command()
@click.option("--profile", "profile_name", default=None, help="Hardware profile (e.g. one written by calibrate).")
@click.option("--measurements", multiple=True, help="Kernel or collective CSV; repeat for several.")
@click.option("--suite", default=None, help="Instead: a suite of published measurements (`published`; `moe`: modern MoE training at EP >= 8; `serving`: edge and datacenter generation speed; `mechanisms`: the source papers' own claims about their mechanisms).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def validate(profile_name: str | None, measurements: tuple[str, ...], suite: str | None, fmt: str) -> None:
    """Predicted vs measured, with signed error: for every measured kernel, MoE layer and collective
    of a profile (--profile, --measurements), or for each published case of a suite (--suite)."""
    if suite is not None:
        _validate_suite(suite, fmt)
        return
    if profile_name is None or not measurements:
        raise click.UsageError("give --profile and --measurements, or --suite published")
    import pandas as pd

    from simcc.calibrate.fit import collective_errors, comm_held_out, error_summary, held_out_mask, prediction_errors
    from simcc.calibrate.measurements import check_device, measurement_kind, read_collectives, read_measurements
    from simcc.specs.hardware import device_of, system_from
    from simcc.specs.loader import load_profile_model

    profile, source = load_profile_model(profile_name)
    system, measured_device = system_from(profile, source), device_of(profile)  # kernels: as the profiler ran
    tables = []
    for path in measurements:
        if measurement_kind(path) == "kernels":
            frame = read_measurements(path)
            check_device(frame, measured_device, path, system.source_file)
            errors = prediction_errors(frame, measured_device)
            # Whole MoE layers are never fitted; kernels follow calibrate's hold-out rule.
            errors["unseen"] = (held_out_mask(frame) | (frame["family"] == "moe_layer")).to_numpy()
        else:
            frame = read_collectives(path)
            check_device(frame, system.device, path, system.source_file)
            errors = collective_errors(frame, system)
            errors["unseen"] = comm_held_out(frame).to_numpy()
        tables.append(errors)
    errors = pd.concat(tables, ignore_index=True)
    if fmt != "table":
        click.echo(errors.to_json(orient="records", indent=2) + "\n" if fmt == "json" else errors.to_csv(index=False), nl=False)
        return
    for _, row in errors.iterrows():
        click.echo(f"{row['case']:30s} {row['family']:14s} measured {row['measured_s'] * 1e3:10.4f} ms  "
                   f"predicted {row['predicted_s'] * 1e3:10.4f} ms  {row['error'] * 100:+7.1f}%"
                   f"{'  (unseen)' if row['unseen'] else ''}")
    # Held-out first: fitted points flatter (a memory-bound curve has a knot at each of them).
    click.echo(_render_errors(error_summary(errors[errors["unseen"]]), "table",
                              "summary, points a calibration from these tables did not fit (held out, and whole MoE layers)"),
               nl=False)
    click.echo(_render_errors(error_summary(errors), "table", "summary, all points (fitted ones included)"), nl=False)


def _validate_suite(name: str, fmt: str) -> None:
    from simcc.report.render import finite_json, rows_output
    from simcc.validation import load_suite, run_suite, summary

    results = run_suite(load_suite(name))
    totals = summary(results)
    rows = [result.as_dict() for result in results]
    if fmt == "json":
        click.echo(finite_json({"cases": rows, "summary": totals.as_dict()}))
        return
    if fmt == "csv":
        click.echo(rows_output(rows, "csv", []), nl=False)
        return
    shown = [{**row, "error %": f"{result.error * 100:+.1f}"} for row, result in zip(rows, results)]
    click.echo(rows_output(shown, "table", ["case", "metric", "measured", "predicted", "error %", "dominant", "memory"]),
               nl=False)
    click.echo(f"{totals.cases} cases: median |error| {totals.median_abs_error:.1%}, worst "
               f"{totals.worst_abs_error:.1%}; {totals.within_10pct} within 10%, {totals.within_25pct} within 25%")


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
