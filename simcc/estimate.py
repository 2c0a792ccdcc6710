"""Estimate one workload on one system: layout -> costed plan -> composed time -> report.

Returns plain sections of named values so that every output format renders the same numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from simcc.costs.compute import mfu, peak_flops
from simcc.errors import InputError
from simcc.costs.memory import MemoryBreakdown, training_memory
from simcc.layout import Layout, build_layout
from simcc.model.blocks import Batch, MoEStats
from simcc.model.anytime import expected_sandwich, scale_units, served_units
from simcc.model.graph import model_forward_flops, model_params, units_forward_flops, units_of
from simcc.costs.money import SECONDS_PER_DAY, run_totals
from simcc.specs.hardware import System
from simcc.specs.workload import Workload
from simcc.phases import Phase, PhaseStep, plan_schedule, schedule_field, sparse_workload
from simcc.sim.timeline import Timeline
from simcc.sim.training import simulate_training
from simcc.plan.training import Footprint, TrainingPlan, build_training_plan, chunk_works, footprint, stage_footprints
from simcc.model.graph import input_dependent_share
from simcc.model.threshold import FiringSample, request_compute_scales
from simcc.sim.serving import Request, percentile, poisson_requests, simulate_serving
from simcc.plan.serving import serving_costs

Sections = dict[str, dict[str, Any]]


@dataclass
class Estimate:
    workload: str
    hardware: str
    sections: Sections = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    moe_layers: list[dict[str, Any]] = field(default_factory=list)  # one row per MoE layer
    phases: list[dict[str, Any]] = field(default_factory=list)  # one row per schedule phase or switch

    def value(self, section: str, key: str) -> Any:
        return self.sections[section][key]


def _layout_section(layout: Layout, system: System) -> dict[str, Any]:
    return {"devices": system.devices, "nodes": system.nodes, "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
            "vpp": layout.vpp, "ep": layout.ep, "expert_tp": layout.expert_tp, "expert_dp": layout.expert_dp,
            "microbatches_per_step": layout.microbatches}


def _waste_fractions(routed: float, dropped: float, padded: float) -> tuple[float, float]:
    """Share of routed assignments dropped, and share of computed slots that were padding."""
    if not routed:
        return 0.0, 0.0
    return dropped / routed, padded / (routed - dropped + padded)


def _moe_section(stats: list[MoEStats]) -> dict[str, Any]:
    if not stats:
        return {}
    dropped, padded = _waste_fractions(sum(s.loads.routed for s in stats), sum(s.loads.dropped for s in stats),
                                       sum(s.loads.padded for s in stats))
    return {
        "moe_layers": len(stats),
        "load_cv": sum(s.loads.cv for s in stats) / len(stats),
        "max_over_mean_load": max(s.loads.max_over_mean for s in stats),
        "dropped_fraction": dropped,
        "padding_fraction": padded,
        "experts_per_token": sum(s.experts_per_token for s in stats) / len(stats),
        "all_to_all_mb_per_layer": stats[0].dispatch_bytes / 1e6,
    }


def _moe_layer_rows(plan: TrainingPlan, layout: Layout) -> list[dict[str, Any]]:
    """Per MoE layer, in model order: load, drops, padding, traffic and the wait it causes per step."""
    group = layout.groups["ep"]
    natural_remote = (group.size - min(group.per_node, group.size)) / group.size if group.nodes > 1 else 0.0
    rows = []
    chunks = sorted((c for st in plan.stages for c in st.chunks), key=lambda c: c.units[0].blocks[0].index if c.units else 0)
    for chunk in chunks:
        for stats, wait in zip(chunk.moe, chunk.moe_imbalance):
            loads = stats.loads
            remote = natural_remote if stats.remote_share is None or group.nodes == 1 else stats.remote_share
            moved = 4 * stats.dispatch_bytes  # dispatch + combine, forward and backward
            inside = max(0.0, (group.size - 1) / group.size - remote) if group.size > 1 else 0.0
            dropped, padded = _waste_fractions(loads.routed, loads.dropped, loads.padded)
            rows.append({
                "layer": len(rows),
                "tokens_per_expert_mean": loads.routed / stats.experts,
                "tokens_per_expert_max": loads.max_expert_tokens,
                "load_cv": loads.cv,
                "dropped_fraction": dropped,
                "padding_fraction": padded,
                "experts_per_token": stats.experts_per_token,
                "no_expert_fraction": loads.no_expert_fraction,
                "a2a_intra_mb": moved * inside / 1e6 * layout.microbatches,
                "a2a_inter_mb": moved * remote / 1e6 * layout.microbatches,
                "imbalance_wait_s": wait * layout.microbatches,
            })
    return rows


def _trained_forward_flops(workload: Workload, batch: Batch) -> float:
    """Forward model FLOPs one sequence costs per step; an anytime supernet counts every
    sub-network of its expected sandwich (TIPS: step cost ~ 3 x sum of the sampled subnets)."""
    if workload.anytime is None:
        return model_forward_flops(workload.model, batch)
    units = units_of(workload.model)
    return sum(times * units_forward_flops(scale_units(units, width), workload.model.hidden, batch)
               for width, times in expected_sandwich(workload.anytime))


def _memory_section(memory: MemoryBreakdown) -> dict[str, Any]:
    section: dict[str, Any] = {f"{k}_gb": v for k, v in memory.as_gb().items()}
    section["fits"] = memory.fits
    return section


def _check_precision(workload: Workload, system: System, source: str) -> None:
    for component in ("compute", "router"):
        dtype = getattr(workload.precision, component)
        if getattr(system.device.peak_tflops, dtype) is None:
            supported = [d for d, v in system.device.peak_tflops.model_dump().items() if v]
            raise InputError(source, f"precision.{component}",
                             f"{system.device.name} has no {dtype} peak; it supports {', '.join(supported)}")


@dataclass(frozen=True)
class SimulationOptions:
    steps: int = 4  # simulated training steps, each with a fresh expert-load draw
    timeline: Timeline | None = None  # filled with the simulated timeline when enabled
    request_count: int = 2000  # serving: Poisson requests to simulate
    requests: list[Request] | None = None  # serving: a trace instead of Poisson arrivals
    simulate_unfit: bool = True  # False: a training layout that does not fit in memory is not simulated


def estimate(workload: Workload, system: System, workload_source: str,
             options: SimulationOptions = SimulationOptions()) -> Estimate:
    _check_precision(workload, system, workload_source)
    layout = build_layout(workload, system, workload_source)
    peak = peak_flops(system.device, workload.precision.compute)
    params = model_params(workload.model)
    result = Estimate(workload.name, system.name)
    result.sections["layout"] = _layout_section(layout, system)
    result.sections["model"] = {"params_b": params.total / 1e9, "active_params_b": params.active / 1e9}
    activation = input_dependent_share(workload.model, workload.model.hidden)
    share, profile = activation
    if profile is not None:  # expected and tail compute per input (threshold activation)
        result.sections["model"].update({
            "input_dependent_flop_share": share, "blocks_fired_mean": profile.mean_fraction,
            "blocks_fired_p95": profile.quantile(0.95), "blocks_fired_p99": profile.quantile(0.99)})
    if workload.mode == "train":
        _estimate_training(workload, system, layout, peak, params.total, result, options, workload_source)
    else:
        _estimate_serving(workload, system, layout, peak, activation, result, options, workload_source)
    if system.price is None:
        result.notes.append(f"{system.name} has no price: $ figures are omitted")
    return result


def _worst_stage_memory(workload: Workload, system: System, layout: Layout,
                        footprints: list[Footprint]) -> MemoryBreakdown:
    """The stage that holds the most: weights by its parameters, activations by what one
    micro-batch leaves through its chunks, buffers by its largest transient."""
    memories = [training_memory(workload, system, layout, params, saved, buffers) for params, saved, buffers in footprints]
    return max(memories, key=lambda memory: memory.total)


def _unfit_note(memory: MemoryBreakdown, system: System) -> str:
    return f"does not fit: needs {memory.total / 1e9:.1f} GB per device, {system.device.name} has {memory.capacity / 1e9:.1f} GB"


def _estimate_training(workload: Workload, system: System, layout: Layout, peak: float, total_params: float,
                       result: Estimate, options: SimulationOptions, source: str) -> None:
    assert workload.train is not None
    train = workload.train
    works = None
    if not options.simulate_unfit and workload.anytime is None:  # fit first, before costing anything
        works = chunk_works(workload, layout)
        worst = _worst_stage_memory(workload, system, layout, stage_footprints(workload, layout, works))
        if not worst.fits:
            result.sections["memory"] = _memory_section(worst)
            result.notes.append(_unfit_note(worst, system))
            return
    plan = build_training_plan(workload, system, layout, sampled_steps=options.steps, works=works)
    worst = _worst_stage_memory(workload, system, layout, [footprint(stage.chunks) for stage in plan.stages])
    sim = simulate_training(plan, options.steps, options.timeline)
    step_s = sim.mean_step
    per_sequence = _trained_forward_flops(workload, Batch(1, train.seq_len, train.seq_len))
    model_flops_step = 3.0 * per_sequence * train.global_batch  # forward + backward (2x) = 3x forward
    tokens_step = train.global_batch * train.seq_len
    result.sections["model"]["forward_gflop_per_token"] = per_sequence / train.seq_len / 1e9
    # Capacity-to-computation ratio (Cho & Bengio 2014): parameters per forward FLOP of one token.
    result.sections["model"]["params_per_token_flop"] = total_params / (per_sequence / train.seq_len)

    # Breakdown of the critical (busiest) stage, measured from the simulated timeline.
    result.sections["step"] = {
        "step_s": step_s, "step_p95_s": sim.p95_step, "compute_s": sim.mean("compute"),
        "exposed_comm_s": sim.mean("blocking_comm") + sim.mean("sync_wait"), "imbalance_s": sim.mean("imbalance"),
        "bubble_s": sim.mean("bubble"), "optimizer_s": sim.mean("optimizer"),
        "simulated_steps": options.steps, "simulated_events": sim.events,
    }
    per_device = model_flops_step / step_s / system.devices
    result.sections["throughput"] = {
        "tokens_per_s": tokens_step / step_s,
        "model_tflops_per_device": per_device / 1e12,
        "mfu": mfu(per_device, peak),
    }
    result.sections["memory"] = _memory_section(worst)
    if not worst.fits:
        result.notes.append(_unfit_note(worst, system))
    result.sections["moe"] = _moe_section([s for st in plan.stages for c in st.chunks for s in c.moe])
    result.moe_layers = _moe_layer_rows(plan, layout)
    if train.total_tokens:
        seconds = train.total_tokens / (tokens_step / step_s)
        totals = run_totals(system, seconds, sim.mean("compute") / step_s)
        result.sections["run"] = {"total_tokens": train.total_tokens, "days": seconds / SECONDS_PER_DAY,
                                  "device_hours": totals.device_hours, "usd": totals.usd, "kwh": totals.kwh}
    if workload.named_schedules:
        _estimate_schedules(workload, system, layout, result, options, source)


def _phase_step(result: Estimate) -> PhaseStep:
    step = result.sections["step"]
    return PhaseStep(step["step_s"], step["compute_s"] / step["step_s"], result.sections["memory"]["total_gb"],
                     result.sections["memory"]["fits"])


def _estimate_schedules(workload: Workload, system: System, layout: Layout, result: Estimate,
                        options: SimulationOptions, source: str) -> None:
    """Each named schedule's whole run next to all-dense training; with a `serve:` section, the
    trained model served dense and as the MoE of the first schedule's last sparse phase."""
    quiet = SimulationOptions(steps=options.steps, request_count=options.request_count)
    step_of = lambda phase_workload: _phase_step(estimate(phase_workload, system, source, quiet))  # noqa: E731
    for name, schedule in workload.named_schedules.items():
        totals, rows = plan_schedule(name, schedule, workload, system, layout, source, _phase_step(result), step_of)
        result.sections[f"schedule {name}" if workload.schedules else "schedule"] = totals
        result.phases += rows
        if totals["usd"] is None:
            totals.pop("usd"), totals.pop("dense_baseline_usd")
        if not totals["fits"]:
            result.notes.append(f"schedule {name}: a phase does not fit in memory (peak {totals['peak_memory_gb']:.1f} GB)")
    if "moefication" not in system.device.efficiency.curves:
        result.notes.append("switches: the MoEfication clustering is costed at the profile's default matmul efficiency "
                            "(no measured curve): a lower bound; `simcc profile` + `simcc calibrate` on the device measure it")
    if workload.serve is not None:
        _serve_dense_and_sparse(workload, system, result, quiet, source)


def _serve_dense_and_sparse(workload: Workload, system: System, result: Estimate, options: SimulationOptions,
                            source: str) -> None:
    name, schedule = next(iter(workload.named_schedules.items()))
    sparse = [row for row in result.phases if row["schedule"] == name and row["mode"] == "sparse"]
    if not sparse:
        return
    last = Phase("sparse", sparse[-1]["tokens"], sparse[-1]["experts"], sparse[-1]["k"])
    served = workload.model_copy(update={"mode": "serve", "schedule": None, "schedules": None})
    dense = estimate(served, system, source, options)
    moe = estimate(sparse_workload(served, last, schedule, source, schedule_field(workload, name)), system, source, options)
    section: dict[str, Any] = {"moe_experts": last.experts, "moe_k": last.k}
    for label, served_result in (("dense", dense), ("moe", moe)):
        latency, throughput = served_result.sections["latency"], served_result.sections["throughput"]
        section.update({f"{label}_latency_p50_s": latency["latency_p50_s"], f"{label}_tpot_mean_s": latency["tpot_mean_s"],
                        f"{label}_output_tokens_per_s": throughput["output_tokens_per_s"]})
    section["moe_speedup_tpot"] = section["dense_tpot_mean_s"] / section["moe_tpot_mean_s"]
    result.sections["serving dense vs moe"] = section


def _estimate_serving(workload: Workload, system: System, layout: Layout, peak: float,
                      activation: tuple[float, FiringSample | None], result: Estimate,
                      options: SimulationOptions, source: str) -> None:
    assert workload.serve is not None
    serve = workload.serve
    costs = serving_costs(workload, system, layout)
    requests = options.requests or poisson_requests(serve.arrival_rate, options.request_count, serve, workload.seed)
    share, profile = activation
    if profile is not None and not options.requests:  # input-dependent compute: each request fires its own blocks
        scales = request_compute_scales(share, profile, len(requests), workload.seed)
        requests = [Request(r.arrival, r.prompt, r.output, float(s)) for r, s in zip(requests, scales)]
    sim = simulate_serving(costs, serve, requests, layout.dp, source)
    tokens_per_s = sim.output_tokens / sim.span * layout.dp if sim.span > 0 else 0.0
    requests_per_s = len(sim.latency) / sim.span * layout.dp if sim.span > 0 else 0.0
    result.sections["latency"] = {
        "requests_simulated": len(sim.latency) * layout.dp,
        "ttft_p50_s": percentile(sim.ttft, 50), "ttft_p95_s": percentile(sim.ttft, 95),
        "ttft_p99_s": percentile(sim.ttft, 99),
        "tpot_mean_s": statistics.fmean(sim.tpot) if sim.tpot else 0.0,
        "latency_p50_s": percentile(sim.latency, 50), "latency_p95_s": percentile(sim.latency, 95),
        "latency_p99_s": percentile(sim.latency, 99),
        "queueing_mean_s": statistics.fmean(sim.queueing), "queueing_p95_s": percentile(sim.queueing, 95),
    }
    if workload.anytime is not None:
        result.sections["model"]["serve_width"] = workload.anytime.serve_width
    per_token_flops = units_forward_flops(served_units(workload), workload.model.hidden, Batch(1, 1, serve.prompt_tokens + serve.output_tokens // 2))
    result.sections["throughput"] = {
        "requests_per_s": requests_per_s, "output_tokens_per_s": tokens_per_s,
        "busy_fraction": sim.busy / sim.span if sim.span > 0 else 0.0,
        "model_tflops_per_device": per_token_flops * tokens_per_s / system.devices / 1e12,
        "mfu": mfu(per_token_flops * tokens_per_s / system.devices, peak),
    }
    memory = costs.memory
    result.sections["memory"] = _memory_section(memory)
    if not memory.fits:
        result.notes.append(f"does not fit: needs {memory.total / 1e9:.1f} GB per device")
    if memory.offloaded_weights > 0 and sim.cache is not None:
        result.sections["expert_cache"] = {
            "resident_experts": costs.resident_experts, "hit_rate": sim.cache.hit_rate,
            "loading_share_of_busy_time": sim.loading / sim.busy if sim.busy else 0.0,
        }
        result.notes.append(f"{memory.offloaded_weights / 1e9:.2f} GB of expert weights stay on "
                            f"{system.storage.tier if system.storage else 'storage'} and load on demand (LRU cache)")
    if sim.busy / sim.span > 0.98 if sim.span else False:
        result.notes.append("the server was busy all the time: arrivals meet or exceed capacity, latency reflects queueing")
    result.sections["moe"] = _moe_section(costs.moe)
    if tokens_per_s > 0:
        million = 1e6 / tokens_per_s
        totals = run_totals(system, million, sim.busy / sim.span if sim.span else 1.0)
        result.sections["run"] = {"seconds_per_million_tokens": million, "usd_per_million_tokens": totals.usd,
                                  "kwh_per_million_tokens": totals.kwh}
