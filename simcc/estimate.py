"""Estimate one workload on one system: layout -> costed plan -> simulated time -> typed result.

Each section of the result is built by one small function from what the plan and the simulator
found; nothing here re-derives a cost. Renderers turn the typed `Estimate` into every format.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from simcc.costs.compute import mfu, peak_flops
from simcc.costs.memory import MemoryBreakdown, worst_stage_memory
from simcc.costs.money import SECONDS_PER_DAY, run_totals
from simcc.errors import InputError
from simcc.layout import DIMENSIONS, Layout, build_layout, dimension_of
from simcc.model.anytime import expected_sandwich, path_scores, scale_units, served_units
from simcc.model.blocks import Batch, MoEStats, Params
from simcc.model.graph import (Unit, blocks_of, input_dependent_share, megatron_forward_flops, model_forward_flops,
                               model_params, units_forward_flops, units_of)
from simcc.model.ops import Op
from simcc.model.threshold import FiringSample, request_compute_scales
from simcc.phases import TRAINING_FLOPS_PER_FORWARD, Phase, PhaseStep, plan_schedule, schedule_field, sparse_workload
from simcc.plan.serving import ServingCosts, decode_context, disaggregation_link, serving_costs, step_batch, with_hybrid_steps
from simcc.plan.training import (
    Cost,
    Footprint,
    TrainingPlan,
    build_training_plan,
    chunk_works,
    footprint,
    forward_work,
    layer_costs,
    micro_batch,
    stage_footprints,
)
from simcc.results import (
    AnytimeWidthRow,
    BlockCostRow,
    CommSection,
    DenseVsMoESection,
    DisaggregatedSection,
    Estimate,
    ExpertCacheSection,
    GoodputSection,
    LatencySection,
    LayerSection,
    LayoutSection,
    MemorySection,
    MoELayerRow,
    MoESection,
    ModelSection,
    ServingRunSection,
    ServingThroughput,
    StepSection,
    TrainingRunSection,
    TrainingThroughput,
)
from simcc.sim.serving import (DisaggregatedResult, Request, ServingResult, choose_widths, percentile, poisson_requests,
                               simulate_disaggregated, simulate_serving)
from simcc.sim.timeline import Timeline
from simcc.sim.training import TrainingSimulation, simulate_training
from simcc.specs.hardware import System
from simcc.specs.workload import ServeSpec, Workload


@dataclass(frozen=True)
class SimulationOptions:
    steps: int = 1  # simulated training steps: 1 plays the expected loads, more draw fresh loads per step
    timeline: Timeline | None = None  # filled with the simulated timeline when enabled
    request_count: int = 2000  # serving: Poisson requests to simulate
    requests: list[Request] | None = None  # serving: a trace instead of Poisson arrivals
    simulate_unfit: bool = True  # False: a training layout that does not fit in memory is not simulated
    slo_ttft_s: float | None = None  # serving: latency objectives; either one set reports goodput
    slo_tpot_s: float | None = None


@dataclass(frozen=True)
class _Run:
    """What every part of one estimate needs."""

    workload: Workload
    system: System
    layout: Layout
    source: str  # the workload file, for error messages
    options: SimulationOptions
    params: Params  # the whole model's
    activation: tuple[float, FiringSample | None]  # input-dependent FLOP share and firing (threshold trees)


def _run(workload: Workload, system: System, source: str, options: SimulationOptions) -> _Run:
    """The layout and the model-wide figures every section reads, each computed once."""
    return _Run(workload, system, build_layout(workload, system, source), source, options, model_params(workload.model),
                input_dependent_share(workload.model, workload.model.hidden))


def estimate(workload: Workload, system: System, workload_source: str,
             options: SimulationOptions = SimulationOptions(), plan: TrainingPlan | None = None) -> Estimate:
    """`plan`: this training workload's plan on this system, when the caller already built it (a
    search costs every candidate's plan to bound it, then simulates the promising ones)."""
    _check_precision(workload, system, workload_source)
    run = _run(workload, system, workload_source, options)
    result = Estimate(workload.name, system.name, _layout_section(run.layout, system), _model_section(run))
    if workload.mode == "train":
        _estimate_training(run, result, plan)
    else:
        _estimate_serving(run, result)
    if system.price is None:
        result.notes.append(f"{system.name} has no price: $ figures are omitted")
    return result


def _check_precision(workload: Workload, system: System, source: str) -> None:
    for component in ("compute", "router"):
        dtype = getattr(workload.precision, component)
        if getattr(system.device.peak_tflops, dtype) is None:
            supported = [d for d, v in system.device.peak_tflops.model_dump().items() if v]
            raise InputError(source, f"precision.{component}",
                             f"{system.device.name} has no {dtype} peak; it supports {', '.join(supported)}")


PASSES = ("forward", "backward", "both")


def _layer_batch(workload: Workload) -> Batch:
    """What one block is costed for alone: a training micro-batch, or a serving prefill batch."""
    if workload.train is not None:
        return micro_batch(workload)  # one rank's share of each sequence under context parallelism
    assert workload.serve is not None
    return step_batch(workload.serve.batch, workload.serve.prompt_tokens, workload.serve.prompt_tokens)


def estimate_layer(workload: Workload, system: System, workload_source: str, index: int,
                   passes: str = "forward") -> Estimate:
    """One block of the model, alone: its forward, backward (with recomputation) or both, for one
    training micro-batch or one serving prefill batch on one device."""
    _check_precision(workload, system, workload_source)
    run = _run(workload, system, workload_source, SimulationOptions())
    layout = run.layout
    blocks = blocks_of(workload.model)
    if not 0 <= index < len(blocks):
        raise InputError(workload_source, "--layer", f"expected 0..{len(blocks) - 1} (the model's blocks), got {index}")
    batch = _layer_batch(workload)
    forward, backward = layer_costs(workload, system, layout, index, batch)
    chosen: list[Cost] = {"forward": forward, "backward": backward, "both": forward + backward}[passes]
    result = Estimate(workload.name, system.name, _layout_section(layout, system), _model_section(run))
    result.layer = LayerSection(
        layer=index, kind=blocks[index].kind, tokens=batch.tokens, passes=passes,
        seconds=sum(c.seconds for c in chosen), compute_s=sum(c.seconds for c in chosen if c.stream == "compute"),
        comm_s=sum(c.seconds for c in chosen if c.stream == "comm"),
        forward_s=sum(c.seconds for c in forward), backward_s=sum(c.seconds for c in backward),
        gflop=sum(c.flops for c in chosen) / 1e9)
    return result


def estimate_blocks(workload: Workload, system: System, workload_source: str) -> Estimate:
    """Every block of the expanded model, each costed alone as `estimate_layer` costs one, with its
    forward, backward and recomputation apart (`estimate --layers`). Serving costs a prefill batch
    forward only."""
    _check_precision(workload, system, workload_source)
    run = _run(workload, system, workload_source, SimulationOptions())
    batch = _layer_batch(workload)
    layout = run.layout
    result = Estimate(workload.name, system.name, _layout_section(layout, system), _model_section(run))
    training = workload.train is not None
    for block in blocks_of(workload.model):
        forward, backward = layer_costs(workload, system, layout, block.index, batch)
        work = forward_work([Unit((block,))], workload, layout, batch)
        # the backward list starts with the replayed forward items (plan/training.py, _cost_work)
        replay, backward = (backward[:len(work.replay)], backward[len(work.replay):]) if training else ([], [])
        moved = sum(item.bytes for item in work.items if isinstance(item, Op))
        result.block_costs.append(BlockCostRow(
            layer=block.index, kind=block.kind, forward_gflop=sum(c.flops for c in forward) / 1e9,
            backward_gflop=sum(c.flops for c in backward) / 1e9, forward_gb_moved=moved / 1e9,
            forward_s=sum(c.seconds for c in forward), backward_s=sum(c.seconds for c in backward),
            recompute_s=sum(c.seconds for c in replay),
            comm_s=sum(c.seconds for c in forward + backward + replay if c.stream == "comm"),
            saved_gb=work.saved_bytes / 1e9 if training else 0.0))
    return result


# ------------------------------------------------------------------------------------------ sections

def _layout_section(layout: Layout, system: System) -> LayoutSection:
    return LayoutSection(system.devices, system.nodes, layout.dp, layout.tp, layout.cp, layout.pp, layout.vpp,
                         layout.ep, layout.expert_tp, layout.expert_dp, layout.microbatches)


def _model_section(run: _Run) -> ModelSection:
    params = run.params
    share, firing = run.activation
    if firing is None:
        return ModelSection(params.total / 1e9, params.active / 1e9)
    return ModelSection(params.total / 1e9, params.active / 1e9, input_dependent_flop_share=share,
                        blocks_fired_mean=firing.mean_fraction, blocks_fired_p95=firing.quantile(0.95),
                        blocks_fired_p99=firing.quantile(0.99))


def _memory_section(memory: MemoryBreakdown) -> MemorySection:
    largest, size = memory.largest_part()
    return MemorySection(**{f"{name}_gb": value for name, value in memory.as_gb().items()}, fits=memory.fits,
                         largest_part=largest, largest_share=size / memory.total if memory.total > 0 else 0.0)


def _waste_fractions(routed: float, dropped: float, padded: float) -> tuple[float, float]:
    """Share of routed assignments dropped, and share of computed slots that were padding."""
    if not routed:
        return 0.0, 0.0
    return dropped / routed, padded / (routed - dropped + padded)


def _moe_section(stats: list[MoEStats]) -> MoESection | None:
    if not stats:
        return None
    dropped, padded = _waste_fractions(sum(s.loads.routed for s in stats), sum(s.loads.dropped for s in stats),
                                       sum(s.loads.padded for s in stats))
    return MoESection(
        moe_layers=len(stats),
        load_cv=sum(s.loads.cv for s in stats) / len(stats),
        max_over_mean_load=max(s.loads.max_over_mean for s in stats),
        busiest_rank_over_mean=sum(s.loads.busiest_share for s in stats) / len(stats),
        dropped_fraction=dropped,
        padding_fraction=padded,
        experts_per_token=sum(s.experts_per_token for s in stats) / len(stats),
        all_to_all_mb_per_layer=stats[0].dispatch_bytes / 1e6,
    )


def _comm_section(plan: TrainingPlan, sim: TrainingSimulation) -> CommSection:
    """Link time per step by parallel dimension on the stage with the most (every micro-batch's
    forward and backward collectives, its gradient reductions, parameter gathers and pipeline
    sends), next to what the simulated critical stage waited for."""
    per_stage = []
    for stage in plan.stages:
        link = dict.fromkeys(DIMENSIONS, 0.0)
        for chunk in stage.chunks:
            once = [c for bucket in chunk.grad_buckets for c in bucket] + chunk.param_sync
            for cost, times in [(c, plan.microbatches) for c in chunk.forward + chunk.backward] + [(c, 1) for c in once]:
                if cost.stream == "comm":  # with what ran hidden behind compute (a KV ring's steps)
                    link[dimension_of(cost.group)] += (cost.seconds + cost.hidden) * times
        if plan.pp > 1:  # an activation out and a gradient back per micro-batch and chunk
            link["pp"] += 2 * stage.p2p.seconds * plan.microbatches * len(stage.chunks)
        per_stage.append(link)
    busiest = max(per_stage, key=lambda link: sum(link.values()))
    return CommSection(**{f"{d}_{kind}_s": busiest[d] if kind == "link" else sim.mean_exposed(d)
                          for d in DIMENSIONS for kind in ("link", "exposed")})


def _moe_layer_rows(plan: TrainingPlan, layout: Layout) -> list[MoELayerRow]:
    """Per MoE layer, in model order: load, drops, padding, traffic and the wait it causes per step."""
    group = layout.groups["ep"]
    natural_remote = (group.size - min(group.per_node, group.size)) / group.size if group.nodes > 1 else 0.0
    rows: list[MoELayerRow] = []
    chunks = sorted((c for st in plan.stages for c in st.chunks), key=lambda c: c.units[0].blocks[0].index if c.units else 0)
    for chunk in chunks:
        ep_comm = chunk.moe_ep_comm or [(0.0, 0.0)] * len(chunk.moe)
        for stats, wait, (a2a, hidden) in zip(chunk.moe, chunk.moe_imbalance, ep_comm):
            loads = stats.loads
            remote = natural_remote if stats.remote_share is None or group.nodes == 1 else stats.remote_share
            combine = stats.dispatch_bytes if stats.combine_bytes is None else stats.combine_bytes
            moved = 2 * (stats.dispatch_bytes + combine)  # dispatch + combine, forward and backward
            inside = max(0.0, (group.size - 1) / group.size - remote) if group.size > 1 else 0.0
            if stats.intra_share is not None:
                inside = stats.intra_share
            dropped, padded = _waste_fractions(loads.routed, loads.dropped, loads.padded)
            rows.append(MoELayerRow(
                layer=len(rows),
                tokens_per_expert_mean=loads.routed / stats.experts,
                tokens_per_expert_max=loads.max_expert_tokens,
                load_cv=loads.cv,
                busiest_rank_over_mean=loads.busiest_share,
                dropped_fraction=dropped,
                padding_fraction=padded,
                experts_per_token=stats.experts_per_token,
                no_expert_fraction=loads.no_expert_fraction,
                a2a_intra_mb=moved * inside / 1e6 * layout.microbatches,
                a2a_inter_mb=moved * remote / 1e6 * layout.microbatches,
                imbalance_wait_s=wait * layout.microbatches,
                a2a_s=a2a * layout.microbatches,
                a2a_hidden_s=hidden * layout.microbatches,
            ))
    return rows


# ------------------------------------------------------------------------------------------ training

def _trained_forward_flops(workload: Workload, batch: Batch,
                           counted: Callable[[list[Unit], int, Batch], float] = units_forward_flops) -> float:
    """Forward model FLOPs one sequence costs per step (by `counted`'s convention); an anytime
    supernet counts every sub-network of its expected sandwich (TIPS: step cost ~ 3 x sum of the
    sampled subnets)."""
    if workload.anytime is None and counted is units_forward_flops:
        return model_forward_flops(workload.model, batch)  # memoised across a sweep
    units = units_of(workload.model)
    if workload.anytime is None:
        return counted(units, workload.model.hidden, batch)
    return sum(times * counted(scale_units(units, width), workload.model.hidden, batch)
               for width, times in expected_sandwich(workload.anytime))


def _worst_stage_memory(run: _Run, footprints: list[Footprint]) -> MemoryBreakdown:
    return worst_stage_memory(run.workload, run.system, run.layout, footprints)


# What shrinks each part of training memory (the fields of MemoryBreakdown), for the unfit note.
MEMORY_REMEDIES = {
    "activations": "recompute (parallelism.recompute or recompute_modules), a smaller micro_batch, or more tp/pp",
    "optimizer": "a ZeRO stage >= 1 over more data-parallel ranks",
    "gradients": "ZeRO stage 2 or 3",
    "weights": "ZeRO stage 3, or more tp/pp/ep",
    "kv_cache": "a smaller serve.batch or shorter contexts",
}


def _unfit_note(memory: MemoryBreakdown, system: System) -> str:
    """Why it does not fit: the largest part, its share, and what shrinks it."""
    largest, size = memory.largest_part()
    return (f"does not fit: needs {memory.total / 1e9:.1f} GB per device, {system.device.name} has "
            f"{memory.capacity / 1e9:.1f} GB; {largest} take the most ({size / 1e9:.1f} GB, "
            f"{size / memory.total:.0%}): {MEMORY_REMEDIES[largest]}")


def _estimate_training(run: _Run, result: Estimate, plan: TrainingPlan | None = None) -> None:
    workload, options = run.workload, run.options
    works = None
    if plan is None and not options.simulate_unfit and workload.anytime is None:  # fit first, before costing anything
        works = chunk_works(workload, run.layout)
        worst = _worst_stage_memory(run, stage_footprints(workload, run.layout, works))
        if not worst.fits:
            result.memory = _memory_section(worst)
            result.notes.append(_unfit_note(worst, run.system))
            return
    # One step plays the expected expert loads (averaged over draws: the mean without one draw's
    # noise); more steps each draw their own loads, for the spread between steps.
    if plan is None:
        sampled = options.steps if options.steps > 1 else 0
        plan = build_training_plan(workload, run.system, run.layout, sampled_steps=sampled, works=works)
    worst = _worst_stage_memory(run, [footprint(stage.chunks) for stage in plan.stages])
    sim = simulate_training(plan, options.steps, options.timeline)
    _training_sections(run, result, sim)
    result.memory = _memory_section(worst)
    if not worst.fits:
        result.notes.append(_unfit_note(worst, run.system))
    result.moe = _moe_section([s for st in plan.stages for c in st.chunks for s in c.moe])
    result.moe_layers = _moe_layer_rows(plan, run.layout)
    result.comm = _comm_section(plan, sim)
    if workload.parallelism.offload_activation_layers:
        result.notes.append(_offload_note(plan))
    if workload.named_schedules:
        _estimate_schedules(run, result)


def _offload_note(plan: TrainingPlan) -> str:
    """What activation offloading moves and what it costs (its waits are part of compute_s)."""
    copies = [c for stage in plan.stages for chunk in stage.chunks for c in chunk.forward + chunk.backward
              if c.name.startswith("offload.")]
    moved = sum(c.bytes for c in copies if c.name == "offload.to_host")
    waited = sum(c.seconds for c in copies) * plan.microbatches
    return (f"activation offloading: {moved / 1e9:.2f} GB to host and back per micro-batch; the copies wait "
            f"{waited:.3f} s per step beyond the neighbouring layers' compute (counted in compute_s)")


def _training_sections(run: _Run, result: Estimate, sim: TrainingSimulation) -> None:
    """Step breakdown, throughput at the model-FLOPs convention, and the whole run's days, $ and kWh."""
    train, system = run.workload.train, run.system
    assert train is not None
    step_s = sim.mean_step
    per_sequence = _trained_forward_flops(run.workload, Batch(1, train.seq_len, train.seq_len))
    model_flops_step = TRAINING_FLOPS_PER_FORWARD * per_sequence * train.global_batch
    tokens_step = train.global_batch * train.seq_len
    total_params = run.params.total
    result.model = replace(result.model, forward_gflop_per_token=per_sequence / train.seq_len / 1e9,
                           params_per_token_flop=total_params / (per_sequence / train.seq_len))
    if run.workload.anytime is not None:
        spec = run.workload.anytime
        trained = dict(expected_sandwich(spec))
        result.anytime_widths = [AnytimeWidthRow(w, score, trained_per_step=trained.get(w, 0.0))
                                 for w, score in zip(spec.widths, path_scores(spec).stationary)]
    result.step = StepSection(
        step_s=step_s, step_p95_s=sim.p95_step, compute_s=sim.mean("compute"),
        exposed_comm_s=sim.mean("blocking_comm") + sim.mean("sync_wait"), imbalance_s=sim.mean("imbalance"),
        bubble_s=sim.mean("bubble"), optimizer_s=sim.mean("optimizer"),
        simulated_steps=len(sim.steps), simulated_events=sim.events,
    )
    per_device = model_flops_step / step_s / system.devices
    megatron_step = TRAINING_FLOPS_PER_FORWARD * train.global_batch * _trained_forward_flops(
        run.workload, Batch(1, train.seq_len, train.seq_len), megatron_forward_flops)
    result.throughput = TrainingThroughput(tokens_step / step_s, per_device / 1e12,
                                           mfu(per_device, mfu_peak(run.workload, system)),
                                           megatron_step / step_s / system.devices / 1e12)
    if train.total_tokens:
        seconds = train.total_tokens / (tokens_step / step_s)
        totals = run_totals(system, seconds, sim.mean("compute") / step_s)
        result.run = TrainingRunSection(train.total_tokens, seconds / SECONDS_PER_DAY, totals.device_hours, totals.usd,
                                        totals.kwh)


def _phase_step(result: Estimate) -> PhaseStep:
    assert result.step is not None and result.memory is not None
    assert result.model.forward_gflop_per_token is not None
    return PhaseStep(result.step.step_s, result.step.compute_s / result.step.step_s, result.memory.total_gb,
                     result.memory.fits, result.model.forward_gflop_per_token * 1e9)


def _estimate_schedules(run: _Run, result: Estimate) -> None:
    """Each named schedule's whole run next to all-dense training; with a `serve:` section, the
    trained model served dense and as the MoE of the first schedule's last sparse phase."""
    workload, system, source = run.workload, run.system, run.source
    quiet = SimulationOptions(steps=run.options.steps, request_count=run.options.request_count)
    step_of = lambda phase_workload: _phase_step(estimate(phase_workload, system, source, quiet))  # noqa: E731
    for name, schedule in workload.named_schedules.items():
        totals, rows = plan_schedule(name, schedule, workload, system, run.layout, source, _phase_step(result), step_of)
        result.schedules[f"schedule {name}" if workload.schedules else "schedule"] = totals
        result.phases += rows
        if not totals.fits:
            result.notes.append(f"schedule {name}: a phase does not fit in memory (peak {totals.peak_memory_gb:.1f} GB)")
        flops, time = totals.sparse_flops_ratio, totals.sparse_step_ratio
        if flops is not None and time is not None and time > flops * 1.05:
            result.notes.append(
                f"schedule {name}: a sparse step executes {flops:.2f}x the dense FLOPs but takes {time:.2f}x the dense "
                f"step time (whole run: {totals.flops_saved_vs_dense:.2f}x fewer FLOPs, {totals.speedup_vs_dense:.2f}x "
                f"faster): each MoEfied FFN layer takes {totals.sparse_layer_time_ratio:.2f}x its dense time, "
                f"{totals.sparse_layer_overhead_share:.0%} of it in the router, top-k and token permutation, and its "
                f"experts' GEMMs are narrow (small per-expert batches run below the dense GEMM's efficiency)")
    if "moefication" not in system.device.efficiency.curves:
        result.notes.append("switches: the MoEfication clustering is costed at the profile's default matmul efficiency "
                            "(no measured curve): a lower bound; `simcc profile` + `simcc calibrate` on the device measure it")
    if workload.serve is not None:
        result.dense_vs_moe = _serve_dense_and_sparse(run, result, quiet)


def _serve_dense_and_sparse(run: _Run, result: Estimate, options: SimulationOptions) -> DenseVsMoESection | None:
    workload, source = run.workload, run.source
    name, schedule = next(iter(workload.named_schedules.items()))
    sparse = [row for row in result.phases if row.schedule == name and row.mode == "sparse"]
    if not sparse:
        return None
    last_row = sparse[-1]
    assert last_row.experts is not None and last_row.k is not None
    last = Phase("sparse", last_row.tokens, last_row.experts, last_row.k)
    served = workload.model_copy(update={"mode": "serve", "schedule": None, "schedules": None})
    dense = estimate(served, run.system, source, options)
    moe = estimate(sparse_workload(served, last, schedule, source, schedule_field(workload, name)), run.system, source,
                   options)
    assert dense.latency and moe.latency and isinstance(dense.throughput, ServingThroughput) \
        and isinstance(moe.throughput, ServingThroughput)
    return DenseVsMoESection(
        moe_experts=last_row.experts, moe_k=last_row.k,
        dense_latency_p50_s=dense.latency.latency_p50_s, dense_tpot_mean_s=dense.latency.tpot_mean_s,
        dense_output_tokens_per_s=dense.throughput.output_tokens_per_s,
        moe_latency_p50_s=moe.latency.latency_p50_s, moe_tpot_mean_s=moe.latency.tpot_mean_s,
        moe_output_tokens_per_s=moe.throughput.output_tokens_per_s,
        moe_speedup_tpot=dense.latency.tpot_mean_s / moe.latency.tpot_mean_s,
    )


# ------------------------------------------------------------------------------------------ serving

def _requests(run: _Run) -> list[Request]:
    """The trace given, else Poisson arrivals; a model whose compute depends on the input (threshold
    activation) gives each request its own compute scale."""
    serve, options = run.workload.serve, run.options
    assert serve is not None
    requests = options.requests or poisson_requests(serve.arrival_rate, options.request_count, serve, run.workload.seed)
    share, firing = run.activation
    if firing is not None and not options.requests:
        scales = request_compute_scales(share, firing, len(requests), run.workload.seed)
        requests = [Request(r.arrival, r.prompt, r.output, float(s)) for r, s in zip(requests, scales)]
    return requests


def _estimate_serving(run: _Run, result: Estimate) -> None:
    workload, system, layout = run.workload, run.system, run.layout
    assert workload.serve is not None
    split = workload.serve.disaggregated
    link = disaggregation_link(split, system, layout, run.source) if split is not None else None
    costs = serving_costs(workload, system, layout)
    requests = _requests(run)
    serve = workload.serve
    if serve.chunked_prefill_tokens is not None or serve.lengths is not None:
        costs = with_hybrid_steps(costs, workload, system, layout, max(r.prompt for r in requests))
        result.notes.append(_prefill_note(serve, requests))
    if costs.widths:  # an anytime network under a latency budget: a width per request
        requests = _budgeted_widths(run, result, costs, requests)
    replicas = layout.dp
    if split is not None and link is not None:
        pools = simulate_disaggregated(costs, serve, requests, link, run.source)
        sim, replicas = pools.serving, pools.groups
        result.disaggregated = _disaggregated_section(pools, split.kv_link)
        idle = layout.dp - split.prefill_replicas - split.decode_replicas
        if idle:
            result.notes.append(f"disaggregated: {idle} of {layout.dp} replicas are in neither pool (idle, still costed)")
    else:
        sim = simulate_serving(costs, workload.serve, requests, layout.dp, run.source)
    result.latency = _latency_section(sim, replicas)
    if workload.anytime is not None and not costs.widths:
        result.model = replace(result.model, serve_width=workload.anytime.fixed_serve_width)
    result.throughput = _serving_throughput(run, sim, requests, replicas)
    result.goodput = _goodput(run, sim, replicas)
    memory = costs.memory
    result.memory = _memory_section(memory)
    if not memory.fits:
        result.notes.append(f"does not fit: needs {memory.total / 1e9:.1f} GB per device")
    _expert_cache(run, result, costs, sim)
    if sim.span and sim.busy / sim.span > 0.98:
        result.notes.append("the server was busy all the time: arrivals meet or exceed capacity, latency reflects queueing")
    result.moe = _moe_section(costs.moe)
    tokens_per_s = result.throughput.output_tokens_per_s
    if tokens_per_s > 0:
        million = 1e6 / tokens_per_s
        totals = run_totals(system, million, sim.busy / sim.span if sim.span else 1.0)
        result.run = ServingRunSection(million, totals.usd, totals.kwh)


def _prefill_note(serve: ServeSpec, requests: list[Request]) -> str:
    """Which prefill mode and request lengths the serving run used."""
    mode = (f"chunked prefill, {serve.chunked_prefill_tokens:,} tokens per step (decodes first)"
            if serve.chunked_prefill_tokens is not None else "whole-prompt prefill")
    lengths = serve.lengths
    if lengths is None:
        source = "lengths from the serve section or the trace"
    elif lengths.dataset is not None:
        source = f"lengths drawn from {lengths.dataset}"
    else:
        source = "lengths drawn from " + ", ".join(f"{side} {spec.distribution}" for side, spec in
                                                   (("prompt", lengths.prompt), ("output", lengths.output)) if spec)
    prompts = [r.prompt for r in requests]
    outputs = [r.output for r in requests]
    return (f"{mode}; {source}: prompt median {statistics.median(prompts):,.0f} (max {max(prompts):,}), "
            f"output median {statistics.median(outputs):,.0f} (max {max(outputs):,}) tokens")


def _disaggregated_section(pools: DisaggregatedResult, kv_link: str) -> DisaggregatedSection:
    """Each pool's busy share, the KV handed over per request, and TPOT's spread (one group of
    instances; every group alike)."""
    span = pools.serving.span
    ports = pools.prefill_instances + pools.decode_instances

    def share(seconds: float, count: int) -> float:
        return seconds / (count * span) if span > 0 else 0.0

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    return DisaggregatedSection(
        prefill_instances=pools.prefill_instances * pools.groups, decode_instances=pools.decode_instances * pools.groups,
        kv_link=kv_link, prefill_busy_share=share(pools.prefill_busy, pools.prefill_instances),
        decode_busy_share=share(pools.decode_busy, pools.decode_instances),
        kv_mb_per_device_mean=mean(pools.shard_bytes) / 1e6,
        kv_gb_per_device_total=sum(pools.shard_bytes) * pools.groups / 1e9,
        kv_transfer_mean_s=mean(pools.transfer), kv_transfer_p99_s=percentile(pools.transfer, 99),
        kv_link_busy_share=share(2 * sum(pools.transfer), ports),  # each transfer holds a sender and a receiver port
        handoff_mean_s=mean(pools.handoff), handoff_p99_s=percentile(pools.handoff, 99),
        tpot_p50_s=percentile(pools.serving.tpot, 50), tpot_p99_s=percentile(pools.serving.tpot, 99),
    )


def _latency_section(sim: ServingResult, replicas: int) -> LatencySection:
    return LatencySection(
        requests_simulated=len(sim.latency) * replicas,
        ttft_p50_s=percentile(sim.ttft, 50), ttft_p95_s=percentile(sim.ttft, 95), ttft_p99_s=percentile(sim.ttft, 99),
        tpot_mean_s=statistics.fmean(sim.tpot) if sim.tpot else 0.0,
        latency_p50_s=percentile(sim.latency, 50), latency_p95_s=percentile(sim.latency, 95),
        latency_p99_s=percentile(sim.latency, 99),
        queueing_mean_s=statistics.fmean(sim.queueing), queueing_p95_s=percentile(sim.queueing, 95),
    )


def _budgeted_widths(run: _Run, result: Estimate, costs: ServingCosts, requests: list[Request]) -> list[Request]:
    """Each request's width under the anytime latency budget, the mix in the report, and a note for
    requests no width fits (they run the narrowest: dropping them would hide the overload)."""
    spec, serve = run.workload.anytime, run.workload.serve
    assert spec is not None and spec.serve_latency_budget_s is not None and serve is not None
    budget = spec.serve_latency_budget_s
    choice = choose_widths(requests, costs, serve, budget)
    widths = [r.width for r in choice.requests]
    result.anytime_widths = [
        AnytimeWidthRow(t.width, score, served_share=widths.count(t.width) / len(widths),
                        predicted_latency_s=t.latency(serve.prompt_tokens, serve.output_tokens, 1.0, serve))
        for t, score in zip(costs.widths, path_scores(spec).stationary)]
    if choice.over_budget:
        narrowest = costs.widths[0]
        result.notes.append(
            f"{choice.over_budget} of {len(widths)} requests exceed anytime.serve_latency_budget_s ({budget:g} s) even "
            f"at the narrowest width {narrowest.width:g}: served at {narrowest.width:g} (predicted "
            f"{narrowest.latency(serve.prompt_tokens, serve.output_tokens, 1.0, serve):.3g} s for a nominal request)")
    return choice.requests


def _serving_throughput(run: _Run, sim: ServingResult, requests: list[Request], replicas: int) -> ServingThroughput:
    """`replicas`: how many alike copies of the simulated server (a replica, or a group of
    disaggregated instances) serve the whole stream."""
    workload, system = run.workload, run.system
    assert workload.serve is not None
    serve = workload.serve
    tokens_per_s = sim.output_tokens / sim.span * replicas if sim.span > 0 else 0.0
    requests_per_s = len(sim.latency) / sim.span * replicas if sim.span > 0 else 0.0
    per_token_flops = _served_flops_per_token(workload, requests, step_batch(1, 1, decode_context(serve)))
    per_device = per_token_flops * tokens_per_s / system.devices
    return ServingThroughput(requests_per_s, tokens_per_s, sim.busy / sim.span if sim.span > 0 else 0.0,
                             per_device / 1e12, mfu(per_device, mfu_peak(workload, system)))


def mfu_peak(workload: Workload, system: System) -> float:
    """The peak MFU divides by: that of the dtype the weight GEMMs run in (`precision.matmul`,
    FP8 under Transformer Engine), else the compute dtype's. Against the bf16 peak, an FP8 run's
    model FLOPs can exceed 100%: PaLM's MFU (Chowdhery et al. 2022, appendix B) divides by the
    theoretical peak of the hardware the run uses."""
    return peak_flops(system.device, workload.precision.matmul or workload.precision.compute)


def _served_flops_per_token(workload: Workload, requests: list[Request], batch: Batch) -> float:
    """Model FLOPs of one served token: at the one served width, or averaged over the widths a
    latency budget chose, weighted by the output tokens each produced."""
    units = served_units(workload)
    if not any(r.width is not None for r in requests):
        return units_forward_flops(units, workload.model.hidden, batch)
    tokens: dict[float, int] = {}
    for r in requests:
        assert r.width is not None
        tokens[r.width] = tokens.get(r.width, 0) + r.output
    total = sum(tokens.values())
    return sum(count / total * units_forward_flops(scale_units(units, width), workload.model.hidden, batch)
               for width, count in tokens.items())


def _goodput(run: _Run, sim: ServingResult, replicas: int) -> GoodputSection | None:
    """Requests whose first token and later tokens each came within their objective, and the
    rate of requests and output tokens they make up (all replicas)."""
    ttft_slo, tpot_slo = run.options.slo_ttft_s, run.options.slo_tpot_s
    if ttft_slo is None and tpot_slo is None:
        return None
    met = [(ttft, tpot, tokens) for ttft, tpot, tokens in sim.finished
           if (ttft_slo is None or ttft <= ttft_slo) and (tpot_slo is None or tpot <= tpot_slo)]
    per_second = replicas / sim.span if sim.span > 0 else 0.0
    share = len(met) / len(sim.finished) if sim.finished else 0.0
    return GoodputSection(ttft_slo, tpot_slo, share, len(met) * per_second, sum(t for _, _, t in met) * per_second)


def _expert_cache(run: _Run, result: Estimate, costs: ServingCosts, sim: ServingResult) -> None:
    """Expert weights left on the storage tier load on demand: the cache's hit rate and load time."""
    cache = sim.cache
    if cache is None or (costs.memory.offloaded_weights <= 0 and run.workload.serve.expert_cache is None):
        return
    result.expert_cache = ExpertCacheSection(costs.resident_experts, cache.hit_rate,
                                             sim.loading / sim.busy if sim.busy else 0.0, cache.policy,
                                             cache.per_layer, cache.prefetch_hit_share, cache.bytes_per_output_token,
                                             cache.decode_hidden_seconds, cache.decode_load_seconds[-1],
                                             cache.decode_wasted_seconds)
    storage = run.system.storage
    result.notes.append(f"{costs.memory.offloaded_weights / 1e9:.2f} GB of expert weights stay on "
                        f"{storage.tier if storage else 'storage'} and load on demand "
                        f"({'LRU cache' if cache.per_layer is None else f'{cache.policy.upper()} cache per layer'})")
