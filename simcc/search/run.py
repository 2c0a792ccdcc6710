"""Search the layouts of a training workload for the fastest that fit, and the time-cost front.

Every candidate is costed (its plan: the same costs `estimate` simulates) and checked against
memory; a lower bound on its step from those costs (`plan/bound.py`) then decides whether it
could still matter. Candidates are simulated in order of that bound, and one is skipped when
the layouts already simulated prove it can neither enter the top N (N of them are at least as
fast as its bound) nor the Pareto front of time and cost (one of them is at least as fast and
as cheap as its bounds). The result is the one an exhaustive sweep of the same space finds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from simcc.costs.memory import MemoryBreakdown, worst_stage_memory
from simcc.costs.money import SECONDS_PER_DAY, SECONDS_PER_HOUR
from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.sim.bound import step_lower_bound
from simcc.plan.training import TrainingPlan, build_training_plan, chunk_works, stage_footprints, stage_params
from simcc.report.summary import summary_row
from simcc.results import Estimate
from simcc.search.space import MAX_CANDIDATES, Candidate, SearchSpace, candidates
from simcc.specs.hardware import System
from simcc.model.graph import units_of
from simcc.specs.blocks import MoEFFNBlock
from simcc.specs.workload import ModelSpec, Parallelism, Workload

@dataclass(frozen=True)
class Budget:
    max_days: float | None = None
    max_usd: float | None = None


@dataclass(frozen=True)
class Evaluated:
    """A candidate that fits, with its bound and, once simulated, its estimate."""

    candidate: Candidate
    recompute: str
    lower_bound_s: float
    memory: MemoryBreakdown
    price: float | None  # $ per device-hour
    estimate: Estimate | None = None
    row: dict[str, Any] = field(default_factory=dict)  # its summary row once simulated (as `compare` prints)

    @property
    def devices(self) -> int:
        return self.candidate.devices

    @property
    def label(self) -> str:
        return self.candidate.label(self.recompute)

    @property
    def step_s(self) -> float:
        assert self.estimate is not None and self.estimate.step is not None
        return self.estimate.step.step_s

    def usd_for(self, step_s: float) -> float | None:
        """$ of one step at `step_s` seconds: every device, for that long."""
        return None if self.price is None else self.devices * self.price * step_s / SECONDS_PER_HOUR


@dataclass
class SearchCounts:
    candidates: int = 0  # layouts the space holds (each with its ladder of recompute policies)
    refused: int = 0  # refused by the layout checks the integer filter does not repeat
    unfit: int = 0  # no recompute policy fits in memory
    over_budget: int = 0  # the bound, or the simulated step, breaks --max-days or --max-usd
    pruned: int = 0  # the bound proves it neither top N nor on the front
    simulated: int = 0


@dataclass
class SearchResult:
    ranked: list[Evaluated]  # the top N, fastest first
    front: list[Evaluated]  # time vs cost, fastest first
    simulated: list[Evaluated]  # every layout simulated that keeps to the budget
    counts: SearchCounts
    seconds: float
    first_refusal: str = ""
    explanation: list[str] = field(default_factory=list)


def search(workload: Workload, source: str, system_for: Callable[[int], System], device_counts: list[int],
           devices_per_node: int, space: SearchSpace, top: int = 5, budget: Budget = Budget(),
           part: tuple[int, int] = (0, 1)) -> SearchResult:
    """The `top` fastest layouts of `workload` on `device_counts` devices that fit and keep to the
    budget, and the Pareto front of step time vs $ per step among those simulated; `part` (i, n):
    only every n-th candidate from the i-th (one worker's share)."""
    _require_training(workload, source)
    started = time.perf_counter()
    listed = listed_candidates(workload, source, device_counts, devices_per_node, space)[part[0]::part[1]]
    counts = SearchCounts(candidates=len(listed))
    steps_per_run = _steps_per_run(workload)
    _check_budget(budget, steps_per_run, system_for(device_counts[0]), source)
    models = Models(workload.model)
    fitting: list[tuple[Evaluated, TrainingPlan, Workload, System]] = []
    first_refusal = ""
    for candidate in listed:
        system = system_for(candidate.devices)
        outcome = _first_fit(workload, source, system, candidate, models)
        if isinstance(outcome, str):
            counts.refused += 1
            first_refusal = first_refusal or outcome
        elif outcome is None:
            counts.unfit += 1
        elif _breaks(outcome[0], outcome[0].lower_bound_s, budget, steps_per_run):
            counts.over_budget += 1
        else:
            fitting.append(outcome)
    fitting.sort(key=lambda entry: entry[0].lower_bound_s)
    simulated: list[Evaluated] = []
    for evaluated, plan, candidate_workload, system in fitting:
        if _cannot_matter(evaluated, simulated, top):
            counts.pruned += 1
        else:
            result = estimate(candidate_workload, system, source, SimulationOptions(), plan=plan)
            counts.simulated += 1
            done = _with_estimate(evaluated, result, system)
            if _breaks(done, done.step_s, budget, steps_per_run):
                counts.over_budget += 1  # and it proves nothing about the others
            else:
                simulated.append(done)
    ranked = sorted(simulated, key=lambda e: e.step_s)[:top]
    result = SearchResult(ranked, _front(simulated), simulated, counts, time.perf_counter() - started, first_refusal)
    result.explanation = explain(ranked)
    return result


def listed_candidates(workload: Workload, source: str, device_counts: list[int], devices_per_node: int,
                      space: SearchSpace) -> list[Candidate]:
    """The space's layouts; one line (exit 2) when it holds none or too many to weigh."""
    listed = []
    for candidate in candidates(workload, device_counts, devices_per_node, space):
        listed.append(candidate)
        if len(listed) > MAX_CANDIDATES:
            raise InputError(source, "--space", f"more than {MAX_CANDIDATES:,} candidate layouts; "
                             "narrow an axis (for example --space micro_batch=1 or --devices N)")
    if not listed:
        raise InputError(source, "--space", f"no layout of these axes divides {', '.join(map(str, device_counts))} "
                         "devices and the model (each degree must divide the devices, the batch and the widths)")
    return listed


def _steps_per_run(workload: Workload) -> float | None:
    train = workload.train
    assert train is not None
    return train.total_tokens / (train.global_batch * train.seq_len) if train.total_tokens else None


def _check_budget(budget: Budget, steps_per_run: float | None, system: System, source: str) -> None:
    if budget.max_days is not None and steps_per_run is None:
        raise InputError(source, "train.total_tokens", "--max-days needs the run's total tokens")
    if budget.max_usd is not None and (steps_per_run is None or system.price is None):
        missing = "train.total_tokens" if steps_per_run is None else "price"
        raise InputError(source if steps_per_run is None else system.name, missing,
                         "--max-usd needs the run's total tokens and the profile's price")


def _breaks(evaluated: Evaluated, step_s: float, budget: Budget, steps_per_run: float | None) -> bool:
    if steps_per_run is None:
        return False
    if budget.max_days is not None and step_s * steps_per_run / SECONDS_PER_DAY > budget.max_days:
        return True
    usd = evaluated.usd_for(step_s)
    return budget.max_usd is not None and usd is not None and usd * steps_per_run > budget.max_usd


class Models:
    """The workload's model on each token dispatcher, made once per search so that candidates
    share their layers' cached costs (a layer's spec is part of its cost's key)."""

    def __init__(self, model: ModelSpec) -> None:
        self.model = model
        dispatchers = {spec.routing.dispatcher for spec in _moe_specs(model)}
        self.own = dispatchers.pop() if len(dispatchers) == 1 else None
        self._made: dict[str, ModelSpec] = {}

    def on(self, dispatcher: str | None) -> ModelSpec:
        if dispatcher is None or dispatcher == self.own:
            return self.model
        if dispatcher not in self._made:
            self._made[dispatcher] = ModelSpec.model_validate(_rewrite(self.model.model_dump(exclude_unset=True), dispatcher))
        return self._made[dispatcher]


def _moe_specs(model: ModelSpec) -> list[MoEFFNBlock]:
    return [b.spec for u in units_of(model) for b in u.blocks if isinstance(b.spec, MoEFFNBlock)]


def _rewrite(node: Any, dispatcher: str) -> Any:
    """A model's dumped fields with every MoE layer's routing on `dispatcher`."""
    if isinstance(node, dict):
        if isinstance(node.get("moe_ffn"), dict):
            moe = dict(node["moe_ffn"])
            moe["routing"] = {**moe.get("routing", {}), "dispatcher": dispatcher}
            node = {**node, "moe_ffn": moe}
        return {key: _rewrite(value, dispatcher) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite(value, dispatcher) for value in node]
    return node


def candidate_workload(workload: Workload, candidate: Candidate, recompute: str, models: Models) -> Workload:
    """The workload laid out as `candidate` under one recompute policy (validated like a file)."""
    fields = {**workload.parallelism.model_dump(), **candidate.parallelism(recompute)}
    if recompute == "full":
        fields["recompute_modules"] = []
    return workload.model_copy(update={"parallelism": Parallelism.model_validate(fields),
                                       "model": models.on(candidate.dispatcher)})


def _first_fit(workload: Workload, source: str, system: System, candidate: Candidate, models: Models):
    """(evaluated, plan, workload, system) under the lightest recompute policy that fits; None when
    none fits; the one-line reason when the layout is refused."""
    for step, recompute in enumerate(candidate.recompute):
        try:
            laid_out = candidate_workload(workload, candidate, recompute, models)
            layout = build_layout(laid_out, system, source)
        except InputError as error:
            return error.one_line()
        except ValueError as error:  # a combination the workload schema refuses
            return f"{source}: {str(error).splitlines()[0]}"
        if step == 0 and not _weights_fit(laid_out, system, layout):
            return None  # no recompute policy frees weights, gradients or optimizer state
        works = chunk_works(laid_out, layout)
        memory = worst_stage_memory(laid_out, system, layout, stage_footprints(laid_out, layout, works))
        if not memory.fits:
            continue
        plan = build_training_plan(laid_out, system, layout, works=works)
        price = system.price.usd_per_device_hour if system.price else None
        evaluated = Evaluated(candidate, recompute, step_lower_bound(plan), memory, price)
        return evaluated, plan, laid_out, system
    return None


def _weights_fit(workload: Workload, system: System, layout: Layout) -> bool:
    """Whether every stage's weights, gradients and optimizer state fit with no activations at all."""
    return worst_stage_memory(workload, system, layout, [(p, 0.0, 0.0, 0.0) for p in stage_params(workload, layout)]).fits


def _with_estimate(evaluated: Evaluated, result: Estimate, system: System) -> Evaluated:
    row = {"layout": evaluated.label, **summary_row(result, system), "lower_bound_s": evaluated.lower_bound_s}
    return replace(evaluated, estimate=result, row=row)


def _cannot_matter(evaluated: Evaluated, simulated: list[Evaluated], top: int) -> bool:
    """N simulated layouts at least as fast as this one's bound, and one of them also at least as
    cheap per step: it is neither in the top N nor on the front."""
    bound = evaluated.lower_bound_s
    faster = [e for e in simulated if e.step_s <= bound]
    if len(faster) < top:
        return False
    cheapest = evaluated.usd_for(bound)
    return cheapest is None or any((e.usd_for(e.step_s) or 0.0) <= cheapest for e in faster)


def _front(simulated: list[Evaluated]) -> list[Evaluated]:
    """Layouts no other beats in both step time and $ per step, fastest first."""
    ordered = sorted(simulated, key=lambda e: (e.step_s, e.usd_for(e.step_s) or 0.0))
    front, cheapest = [], float("inf")
    for entry in ordered:
        usd = entry.usd_for(entry.step_s)
        if usd is None:
            return ordered[:1]  # no price: the fastest is the whole front
        if usd < cheapest:
            front.append(entry)
            cheapest = usd
    return front


EXPLAINED_PARTS = (("compute_s", "compute"), ("exposed_comm_s", "exposed communication"), ("bubble_s", "pipeline bubble"),
                   ("imbalance_s", "expert imbalance"), ("optimizer_s", "optimizer step"))


def explain(ranked: list[Evaluated]) -> list[str]:
    """Why the winner wins: how its layout differs from the runner-up's, and what the runner-up
    loses its time on, part by part."""
    if len(ranked) < 2:
        return []
    winner = ranked[0]
    tied = [e for e in ranked[1:] if e.step_s <= winner.step_s * (1 + 1e-9)]
    lines = [f"ties with {e.label} ({_differs(winner, e)})" for e in tied]
    slower = ranked[1 + len(tied):]
    if not slower:
        return lines
    runner = slower[0]
    assert winner.estimate and runner.estimate and winner.estimate.step and runner.estimate.step
    gap = runner.step_s - winner.step_s
    lines.append(f"{gap:.4g} s per step ({gap / winner.step_s:.1%}) faster than the runner-up, {runner.label}; "
                 f"winner vs runner-up: {_differs(winner, runner)}")
    deltas = [(getattr(runner.estimate.step, key) - getattr(winner.estimate.step, key), name) for key, name in EXPLAINED_PARTS]
    shown = [f"{name} {delta:+.4g} s" for delta, name in sorted(deltas, key=lambda d: -abs(d[0])) if abs(delta) >= 0.01 * gap]
    lines.append("per step, the runner-up against the winner: " + ", ".join(shown))
    lines.append(f"memory per device: winner {winner.memory.total / 1e9:.1f} GB, runner-up "
                 f"{runner.memory.total / 1e9:.1f} GB, of {winner.memory.capacity / 1e9:.0f} GB")
    return lines


def _differs(first: Evaluated, second: Evaluated) -> str:
    return ", ".join(f"{name} {mine} vs {theirs}" for name, mine, theirs in _differences(first, second))


def _differences(first: Evaluated, second: Evaluated) -> list[tuple[str, Any, Any]]:
    """The layout fields in which two evaluated layouts differ (recompute as the one that fit)."""
    names = ["devices", "tp", "cp", "pp", "vpp", "ep", "expert_tp", "micro_batch", "zero_stage", "sequence_parallel",
             "dispatcher", "overlap_moe_comm", "overlap_grad_reduce", "overlap_p2p"]
    out = [(name, getattr(first.candidate, name), getattr(second.candidate, name)) for name in names
           if getattr(first.candidate, name) != getattr(second.candidate, name)]
    if first.recompute != second.recompute:
        out.append(("recompute", first.recompute, second.recompute))
    return out


@dataclass(frozen=True)
class SearchRequest:
    """Everything a search needs, as the user named it: what a worker process or a Ray task loads."""

    workload: str
    workload_sets: tuple[str, ...]
    hardware: str
    hardware_sets: tuple[str, ...]
    devices: str | None  # --devices text
    space: SearchSpace
    top: int = 5
    budget: Budget = Budget()


class Loaded:
    """A request's workload and profile, loaded once, and its profile at each device count."""

    def __init__(self, request: SearchRequest) -> None:
        from simcc.search.space import device_counts
        from simcc.specs.loader import load_hardware, load_workload

        self.request = request
        self.workload, self.source = load_workload(request.workload, list(request.workload_sets))
        self.system = load_hardware(request.hardware, list(request.hardware_sets))
        self.device_counts = device_counts(request.devices, self.system.devices_per_node, self.system.devices,
                                           self.system.kind != "cluster")
        self._systems: dict[int, System] = {self.system.devices: self.system}

    def system_for(self, devices: int) -> System:
        """The profile with as many nodes as `devices` takes (loaded like `--set hardware.nodes=N`)."""
        from simcc.specs.loader import load_hardware

        if devices not in self._systems:
            sets = [*self.request.hardware_sets, f"nodes={devices // self.system.devices_per_node}"]
            self._systems[devices] = load_hardware(self.request.hardware, sets)
        return self._systems[devices]


def run_part(request: SearchRequest, part: int = 0, parts: int = 1) -> SearchResult:
    """The search over every `parts`-th candidate from `part`. Parts merge into the whole search's
    answer (`merge`): the whole's top N and front are among the parts' own."""
    loaded = Loaded(request)
    return search(loaded.workload, loaded.source, loaded.system_for, loaded.device_counts,
                  loaded.system.devices_per_node, request.space, request.top, request.budget, (part, parts))


def merge(results: list[SearchResult], top: int) -> SearchResult:
    """One answer from the parts of a search: the fastest N of their top N, the front of their fronts."""
    counts = SearchCounts()
    for result in results:
        for name, value in vars(result.counts).items():
            setattr(counts, name, getattr(counts, name) + value)
    ranked = sorted((e for r in results for e in r.ranked), key=lambda e: e.step_s)[:top]
    front = _front([e for r in results for e in r.front])
    simulated = [e for r in results for e in r.simulated]
    merged = SearchResult(ranked, front, simulated, counts, max(r.seconds for r in results),
                          next((r.first_refusal for r in results if r.first_refusal), ""))
    merged.explanation = explain(ranked)
    return merged


def run_search(request: SearchRequest, executor: str = "local", jobs: int | None = 1,
               address: str | None = None) -> SearchResult:
    """The whole search: in this process, split over `jobs` local processes, or over Ray tasks
    (as `sweep --executor ray` runs), each taking every n-th candidate; parts merge exactly."""
    if executor == "ray":
        try:
            import ray
        except ImportError:
            raise InputError("--executor ray", "", "needs ray: pip install 'simcc[ray]'") from None
        _check(request)  # bad input is the user's, before any task starts
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        parts = max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(run_part)
        return merge(ray.get([remote.remote(request, part, parts) for part in range(parts)]), request.top)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return run_part(request)
    import multiprocessing

    _check(request)
    with multiprocessing.Pool(jobs) as pool:
        results = pool.starmap(run_part, [(request, part, jobs) for part in range(jobs)])
    return merge(results, request.top)


def _check(request: SearchRequest) -> None:
    """The request's files, device counts and space, checked here before parts run elsewhere."""
    loaded = Loaded(request)
    _require_training(loaded.workload, loaded.source)
    listed_candidates(loaded.workload, loaded.source, loaded.device_counts, loaded.system.devices_per_node, request.space)


def _require_training(workload: Workload, source: str) -> None:
    if workload.mode != "train" or workload.train is None:
        raise InputError(source, "mode", "search plans training layouts; this workload serves")
