"""Evaluate configurations: each one is a workload, a profile and `--set` overrides, estimated
independently and seeded, so local processes and Ray give the same table."""

from __future__ import annotations

import itertools
import json
import os
import signal
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

from simcc.errors import InputError
from simcc.sweep.spec import SweepSpec

Progress = Callable[[int], None]
RAY_BATCH = 16  # configurations per Ray task: one estimate is too small to pay a task's overhead alone


@dataclass(frozen=True)
class Config:
    workload: str
    hardware: str
    overrides: tuple[str, ...]  # `--set` texts; `hardware.` ones go to the profile
    axes: tuple[tuple[str, Any], ...] = ()  # the swept values, reported as columns
    steps: int = 1
    simulate_unfit: bool = True  # a sweep skips layouts that do not fit in memory (keeping the reason)


def set_text(path: str, value: Any) -> str:
    """A `--set` text whose value parses back (YAML) to the same value."""
    return f"{path}={value if isinstance(value, str) else json.dumps(value)}"


def sweep_configs(spec: SweepSpec) -> list[Config]:
    fixed = list(spec.set) + ([f"seed={spec.seed}"] if spec.seed is not None else [])
    paths = list(spec.axes)
    configs = []
    for hardware in spec.hardware:
        for values in itertools.product(*(spec.axes[p] for p in paths)):
            axes = (("hardware", hardware), *zip(paths, values))
            overrides = tuple(fixed + [set_text(p, v) for p, v in zip(paths, values)])
            configs.append(Config(spec.workload, hardware, overrides, axes, spec.steps, simulate_unfit=False))
    return configs


@lru_cache(maxsize=64)
def _system(hardware: str, overrides: tuple[str, ...]):
    """A sweep's profiles are few and its files do not change while it runs: load each once per
    process, which also lets the op-cost memo (per device object) serve every configuration."""
    from simcc.specs.loader import load_hardware

    return load_hardware(hardware, list(overrides))


def evaluate(config: Config) -> dict[str, Any]:
    """One row; a configuration that cannot be built or estimated becomes an invalid row with the
    one-line reason, so a sweep never stops on one bad combination."""
    from simcc.estimate import SimulationOptions, estimate
    from simcc.report.summary import invalid_row, summary_row
    from simcc.specs.loader import load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides(list(config.overrides))
    try:
        workload, source = load_workload(config.workload, workload_sets)
        system = _system(config.hardware, tuple(hardware_sets))
        row = summary_row(estimate(workload, system, source, SimulationOptions(steps=config.steps, simulate_unfit=config.simulate_unfit)), system)
    except InputError as error:
        row = invalid_row(config.workload, config.hardware, error.one_line())
    # The profile as the user named it, for every row (the profile's own name is in the estimate).
    return {**dict(config.axes), **row, "hardware": config.hardware}


def _evaluate_batch(configs: list[Config]) -> list[dict[str, Any]]:
    return [evaluate(c) for c in configs]


def _ignore_interrupt() -> None:
    """Workers leave Ctrl-C to the parent, which stops them all at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_local(configs: list[Config], jobs: int | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """In this process when one job is asked for, else a process pool over local cores. On Ctrl-C
    the workers are terminated, not waited for, so an interrupted sweep exits at once."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(configs) == 1:
        return _collect(map(evaluate, configs), progress)
    import multiprocessing

    chunk = max(1, min(32, len(configs) // (4 * jobs)))
    pool = multiprocessing.Pool(jobs, initializer=_ignore_interrupt)
    try:
        rows = _collect(pool.imap(evaluate, configs, chunksize=chunk), progress)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
    return rows


def run_ray(configs: list[Config], address: str | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """The same evaluation as Ray tasks: on the cluster at `address`, or a local Ray instance."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray", "", "needs ray: pip install 'simcc[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(_evaluate_batch)
    batches = [configs[i:i + RAY_BATCH] for i in range(0, len(configs), RAY_BATCH)]
    refs = [remote.remote(batch) for batch in batches]
    sizes = {ref: len(batch) for ref, batch in zip(refs, batches)}
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += sum(sizes[r] for r in ready)
        if progress:
            progress(done)
    return [row for batch in ray.get(refs) for row in batch]


def _collect(results: Iterable[dict[str, Any]], progress: Progress | None) -> list[dict[str, Any]]:
    rows = []
    for row in results:
        rows.append(row)
        if progress:
            progress(len(rows))
    return rows
