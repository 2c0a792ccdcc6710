"""The published-measurement suite (`simcc validate --suite published`): each case is a shipped
workload on a shipped profile (or a collective on a profile's links), a measured figure from a
paper, simcc's untuned prediction, and which part of the predicted time dominates. Like
Calculon's validation harness: one error per published case, then median and worst."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from simcc.errors import InputError
from simcc.costs.memory import GB, MemoryBreakdown
from simcc.results import Estimate, Record
from simcc.specs.base import PositiveFloat, StrictModel
from simcc.specs.vocab import Collective

if TYPE_CHECKING:
    from simcc.layout import Layout
    from simcc.specs.blocks import MoEFFNBlock
    from simcc.specs.hardware import System
    from simcc.specs.workload import Workload

SUITES = {"published": "published_suite.yaml", "moe": "moe_suite.yaml", "serving": "serving_suite.yaml",
          "mechanisms": "mechanisms_suite.yaml"}
RATIO_METRICS = ("throughput_ratio", "activation_memory_ratio")
# Serving cases: tokens/s of the workload's serve.batch requests generating together (decode, as
# llama-bench's tg and llama-batched-bench's S_TG count them), or of their prompts (prefill: pp).
# ttft_s, tpot_s: one prefill, one decode step; request_latency_s: a batch's prefill and then its
# remaining output tokens' decode steps, as a fixed-batch latency benchmark times it.
SERVING_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "tpot_s", "request_latency_s")
# A routing mechanism's claim: the balance of the workload's first MoE layer over one global batch
# of tokens (CV of the experts' assignment counts; the busiest expert's over the mean), as Shazeer
# et al. 2017's table 6 measures its gates.
BALANCE_METRICS = ("expert_load_cv", "expert_load_max_over_mean")
# Expert-parallel kernel microbenchmarks (DeepEP V1, deepseek-ai/DeepEP tests/legacy/): the first
# MoE layer's forward dispatch or combine for one micro-batch on one rank, as the layer's costed
# plan has it (`simcc estimate --layer`). _us: that time; _gb_s: DeepEP's "bottleneck bandwidth",
# the bytes its test counts per rank over that time (see `_deepep_bytes`).
EP_KERNEL_METRICS = ("dispatch_us", "combine_us", "dispatch_gb_s", "combine_gb_s")
# One MoE layer's forward or backward alone, in milliseconds, as Megatron-LM's MoE layer benchmark
# times its MoELayer (tests/functional_tests/test_cases/common/moe_perf): router, dispatch, experts
# and combine; the norm before it and the residual add after it belong to the transformer layer.
MOE_LAYER_METRICS = ("moe_layer_forward_ms", "moe_layer_backward_ms")
OUTSIDE_MOE_LAYER = ("moe.norm", "moe.residual")


class Case(StrictModel):
    name: str
    source: str  # where the measured figure comes from
    # throughput_ratio: tokens/s of `set` over `reference_set`; activation_memory_ratio: activation
    # memory per device of `set` over `reference_set` (a paper's stated saving of a memory technique)
    # tflops_per_device: simcc's model-FLOPs convention (Narayanan et al. 2021, full score square);
    # megatron_tflops_per_device: Megatron-Bridge's (causal products at half, no router)
    metric: Literal[("step_s", "tflops_per_device", "megatron_tflops_per_device", "peak_allocated_gib",  # type: ignore[valid-type]
                     *RATIO_METRICS, "busbw_gb_s", "latency_us", *SERVING_METRICS, *BALANCE_METRICS,
                     *EP_KERNEL_METRICS, *MOE_LAYER_METRICS)]
    measured: PositiveFloat
    hardware: str
    workload: str | None = None  # estimate cases
    set: list[str] = []
    reference_set: list[str] | None = None  # ratio metrics: the row the ratio is taken against
    collective: Collective | None = None
    ranks: int | None = Field(default=None, ge=2)
    bytes: PositiveFloat | None = None

    @model_validator(mode="after")
    def _kind(self) -> "Case":
        collective_metric = self.metric in ("busbw_gb_s", "latency_us")
        if collective_metric and (self.collective is None or self.ranks is None or self.bytes is None):
            raise ValueError(f"{self.metric} cases need collective, ranks and bytes")
        if not collective_metric and self.workload is None:
            raise ValueError(f"{self.metric} cases need a workload")
        if (self.metric in RATIO_METRICS) != (self.reference_set is not None):
            raise ValueError(f"reference_set goes with the ratio metrics ({', '.join(RATIO_METRICS)}), and only with them")
        return self


class Suite(StrictModel):
    suite: str
    cases: list[Case] = Field(min_length=1)


def suite_path(name: str) -> Path:
    from simcc.specs.loader import shipped_workload_dir

    if name not in SUITES:
        raise InputError("--suite", name, f"unknown suite; expected one of {', '.join(SUITES)}")
    return shipped_workload_dir() / "validation" / SUITES[name]


def load_suite(name: str) -> Suite:
    from simcc.specs.loader import read_yaml, validate

    path = suite_path(name)
    return validate(Suite, read_yaml(path), str(path))


@dataclass(frozen=True)
class CaseResult(Record):
    """One case: predicted next to measured, the signed error, the part of the predicted step that
    dominates, and the predicted memory per device (OVER where a measured run would not fit)."""

    case: str
    metric: str
    measured: float
    predicted: float
    error: float  # predicted / measured - 1
    dominant: str
    memory: str  # "52.8/80 GB", with OVER when it does not fit; empty for collectives
    source: str
    memory_gb: float | None = None  # predicted per device (estimate cases)


@dataclass(frozen=True)
class SuiteSummary(Record):
    cases: int
    median_abs_error: float
    worst_abs_error: float
    within_10pct: int
    within_25pct: int


def _estimate(workload: str, hardware: str, overrides: list[str], steps: int) -> Estimate:
    from simcc.estimate import SimulationOptions, estimate
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides(overrides)
    spec, source = load_workload(workload, workload_sets)
    return estimate(spec, load_hardware(hardware, hardware_sets), source, SimulationOptions(steps=steps))


def _collective(case: Case) -> tuple[float, str]:
    from simcc.costs.collectives import bus_bandwidth, collective_time, latency_floor
    from simcc.layout import CommGroup
    from simcc.specs.loader import load_hardware

    system = load_hardware(case.hardware)
    assert case.ranks is not None and case.bytes is not None and case.collective is not None
    group = CommGroup(case.ranks, min(case.ranks, system.devices_per_node))
    seconds = collective_time(case.collective, case.bytes, group, system)
    latency = latency_floor(case.collective, group, system)
    regime = f"latency {latency / seconds:.0%}" if latency > 0.5 * seconds else f"bandwidth {1 - latency / seconds:.0%}"
    if case.metric == "latency_us":
        return seconds * 1e6, regime
    return bus_bandwidth(case.collective, case.bytes, seconds, case.ranks) / 1e9, regime


def _tokens_per_s(result: Estimate) -> float:
    if result.tokens_per_s is None:
        raise InputError(result.workload, "memory", "the case does not fit in memory, so it was not simulated")
    return result.tokens_per_s


def _serving(case: Case) -> tuple[float, str, MemoryBreakdown]:
    """A serving metric at the workload's batch from the step tables the serving simulator
    schedules (no queueing: a benchmark runs its batch alone), expert-cache loads included; the
    dominant part is those loads when they are most of the time, else the weights streamed."""
    from simcc.layout import build_layout
    from simcc.plan.serving import serving_costs
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    assert case.workload is not None
    workload_sets, hardware_sets = split_overrides(case.set)
    workload, source = load_workload(case.workload, workload_sets)
    if workload.serve is None:
        raise InputError(source, "mode", f"a {case.metric} case needs a serving workload (mode: serve)")
    system = load_hardware(case.hardware, hardware_sets)
    costs = serving_costs(workload, system, build_layout(workload, system, source))
    batch, serve = workload.serve.batch, workload.serve
    assert costs.cache is not None
    decode_loads = costs.cache.decode_load_seconds[costs.decode.batch_sizes.index(batch)]
    prefill_loads = costs.cache.prefill_load_seconds * batch
    decode, prefill = costs.decode.at(batch) + decode_loads, costs.prefill.at(batch) + prefill_loads
    later = serve.output_tokens - 1  # decode steps after the prefill's first token
    seconds, loads = {
        "decode_tokens_per_s": (decode, decode_loads), "tpot_s": (decode, decode_loads),
        "prefill_tokens_per_s": (prefill, prefill_loads), "ttft_s": (prefill, prefill_loads),
        "request_latency_s": (prefill + later * decode, prefill_loads + later * decode_loads),
    }[case.metric]
    rates = {"decode_tokens_per_s": batch / decode, "prefill_tokens_per_s": batch * serve.prompt_tokens / prefill}
    predicted = rates.get(case.metric, seconds)
    dominant = f"expert loads {loads / seconds:.0%}" if loads > 0.5 * seconds else f"weights {costs.memory.weights / 1e9:.1f} GB"
    return predicted, dominant, costs.memory


BALANCE_DRAWS = 16  # batches drawn from the layer's shares; the busiest expert is their mean


def _first_moe_layer(case: Case) -> tuple[Workload, str, int, MoEFFNBlock]:
    """The case's training workload (its `set` applied), its source, and its first MoE block's
    position and spec: what the routing and expert-parallel kernel cases measure."""
    from simcc.model.graph import blocks_of
    from simcc.specs.blocks import MoEFFNBlock
    from simcc.specs.loader import load_workload, split_overrides

    assert case.workload is not None
    workload, source = load_workload(case.workload, split_overrides(case.set)[0])
    found = next(((i, b.spec) for i, b in enumerate(blocks_of(workload.model)) if isinstance(b.spec, MoEFFNBlock)), None)
    if found is None or workload.train is None:
        raise InputError(source, "model.blocks", f"a {case.metric} case needs a training workload with a moe_ffn block")
    index, layer = found
    assert isinstance(layer, MoEFFNBlock)
    return workload, source, index, layer


def _balance(case: Case) -> tuple[float, str]:
    """The first MoE layer's routing shares (a trained gate for aux_loss) drawn over batches of
    the workload's global batch of tokens: CV and max/mean of the assignment counts per batch."""
    import numpy as np

    from simcc.model.kinds._shared import ffn_params
    from simcc.routing.gating import route

    workload, _, _, layer = _first_moe_layer(case)
    assert workload.train is not None
    share = route(layer, 1, workload.seed, ffn_params(workload.model.hidden, layer.expert_hidden, layer.gated).dense).share
    assignments = int(workload.train.global_batch * workload.train.seq_len * layer.k)
    counts = np.random.default_rng(workload.seed).multinomial(assignments, share, size=BALANCE_DRAWS).astype(float)
    mean = assignments / layer.experts
    cv = float(np.mean(counts.std(axis=1) / mean))
    max_over_mean = float(np.mean(counts.max(axis=1) / mean))
    return (cv if case.metric == "expert_load_cv" else max_over_mean), f"{layer.experts} experts, k {layer.k}"


# DeepEP's FP8 tokens carry one fp32 scale per 128 channels (deep_ep per_token_cast_to_fp8); its
# tests count them: fp8_factor = (1 + 4 / 128) / 2 of the BF16 bytes (tests/legacy/test_internode.py).
FP8_SCALE_BYTES_PER_ELEMENT = 4 / 128


def _deepep_bytes(layer: MoEFFNBlock, tokens: float, hidden: int, ep: int, ep_nodes: int, combine: bool) -> float:
    """Bytes per rank DeepEP's normal-kernel tests divide by the kernel time, in expectation over
    their routing (scores |randn| + 1, top-k within the top min(nodes, 4) nodes). Across nodes the
    RDMA bytes: one copy per token per distinct node it reaches, its own included (num_rdma_token_sent,
    tests/legacy/test_internode.py); in one node the NVLink bytes: the tokens a rank receives, one per
    token per distinct rank (recv_x.numel(), tests/legacy/test_intranode.py). Combine: the same rows
    back in BF16."""
    from simcc.routing.load import distinct_remote_nodes
    from simcc.specs.vocab import DTYPE_BYTES

    width = ep_nodes if ep_nodes > 1 else ep  # the fan-out the bottleneck link sees
    limit = layer.routing.max_nodes_per_token if ep_nodes > 1 else None
    reached = distinct_remote_nodes(layer.experts, layer.k, width, limit) * width / (width - 1)  # own one too
    dtype = "bf16" if combine else (layer.routing.dispatch_dtype or "bf16")
    per_element = DTYPE_BYTES[dtype] + (FP8_SCALE_BYTES_PER_ELEMENT if dtype == "fp8" else 0.0)
    return tokens * reached * hidden * per_element


def _first_moe_layer_laid_out(case: Case) -> tuple[Workload, str, int, MoEFFNBlock, System, Layout]:
    """`_first_moe_layer`, with the case's hardware and the layout of the workload on it: what a
    case that costs the layer's own items needs."""
    from simcc.layout import build_layout
    from simcc.specs.loader import load_hardware, split_overrides

    workload, source, index, layer = _first_moe_layer(case)
    system = load_hardware(case.hardware, split_overrides(case.set)[1])
    return workload, source, index, layer, system, build_layout(workload, system, source)


def _ep_kernel(case: Case) -> tuple[float, str]:
    """The first MoE layer's moe.dispatch or moe.combine for one micro-batch on one rank, timed on
    that rank's own bytes: DeepEP's tests time each rank's kernel and divide its own bytes by it, so
    a rank does not wait here for the exchange's busiest receiver as a layer does."""
    from simcc.plan.training import cost_item, layer_work, micro_batch

    workload, source, index, layer, system, layout = _first_moe_layer_laid_out(case)
    if layout.ep < 2:
        raise InputError(source, "parallelism.ep", f"a {case.metric} case needs expert parallelism (ep >= 2)")
    batch = micro_batch(workload)
    name = "moe.combine" if case.metric.startswith("combine") else "moe.dispatch"
    comm = next(i for i in layer_work(workload, layout, index, batch).items if i.name == name)
    cost = cost_item(replace(comm, busiest_share=1.0), system, layout)
    dominant = f"{name} over {cost.link or 'intra'}, {cost.bytes / 1e6:.1f} MB"
    if case.metric.endswith("_us"):
        return cost.seconds * 1e6, dominant
    if layer.routing.dispatcher != "deduplicated":
        raise InputError(source, "routing.dispatcher", f"{case.metric} is DeepEP's normal-kernel bandwidth: it needs "
                         f"dispatcher deduplicated, got {layer.routing.dispatcher}")
    moved = _deepep_bytes(layer, batch.tokens, workload.model.hidden, layout.ep, layout.groups["ep"].nodes,
                          combine=name == "moe.combine")
    return moved / cost.seconds / 1e9, dominant


def _moe_layer(case: Case) -> tuple[float, str]:
    """The first MoE layer's forward or backward for one micro-batch on one rank, its ops in
    sequence as the step plan costs them, without the norm and residual around the MoE module."""
    from simcc.plan.training import layer_costs, micro_batch

    workload, _, index, _, system, layout = _first_moe_layer_laid_out(case)
    forward, backward = layer_costs(workload, system, layout, index, micro_batch(workload))
    costs = forward if case.metric == "moe_layer_forward_ms" else backward
    inside = [c for c in costs if c.name.removesuffix(".bwd") not in OUTSIDE_MOE_LAYER]
    slowest = max(inside, key=lambda c: c.seconds)
    return sum(c.seconds for c in inside) * 1e3, f"{slowest.name} {slowest.seconds * 1e3:.2f} ms"


def run_case(case: Case, steps: int = 1) -> CaseResult:
    """Predicted value, signed error and the dominant part for one case."""
    memory, memory_gb = "", None  # a run that was measured fitted: the memory model should agree
    if case.metric in ("busbw_gb_s", "latency_us"):
        predicted, dominant = _collective(case)
    elif case.metric in BALANCE_METRICS:
        predicted, dominant = _balance(case)
    elif case.metric in EP_KERNEL_METRICS:
        predicted, dominant = _ep_kernel(case)
    elif case.metric in MOE_LAYER_METRICS:
        predicted, dominant = _moe_layer(case)
    elif case.metric in SERVING_METRICS:
        predicted, dominant, served = _serving(case)
        memory_gb = served.total / GB
        memory = f"{memory_gb:.1f}/{served.capacity / GB:.0f} GB" + ("" if served.fits else " OVER")
    else:
        assert case.workload is not None
        result = _estimate(case.workload, case.hardware, case.set, steps)
        assert result.step is not None and result.memory is not None and result.throughput is not None
        dominant = result.step.dominant()
        mem = result.memory
        memory, memory_gb = f"{mem.total_gb:.1f}/{mem.capacity_gb:.0f} GB" + ("" if mem.fits else " OVER"), mem.total_gb
        if case.metric == "step_s":
            predicted = result.step.step_s
        elif case.metric == "tflops_per_device":
            predicted = result.throughput.model_tflops_per_device
        elif case.metric == "megatron_tflops_per_device":
            predicted = result.throughput.megatron_tflops_per_device
        elif case.metric == "peak_allocated_gib":
            # what torch.cuda.max_memory_allocated counts: tensors, not the CUDA context, allocator
            # fragmentation and workspaces the profile's reserve stands for
            predicted = (mem.total_gb - mem.reserve_gb) * 1e9 / 2**30
        elif case.metric == "throughput_ratio":
            reference = _estimate(case.workload, case.hardware, case.reference_set or [], steps)
            predicted = _tokens_per_s(result) / _tokens_per_s(reference)
        else:
            reference = _estimate(case.workload, case.hardware, case.reference_set or [], steps)
            assert reference.memory is not None
            predicted = mem.activations_gb / reference.memory.activations_gb
    return CaseResult(case.name, case.metric, case.measured, predicted, predicted / case.measured - 1.0, dominant,
                      memory, case.source, memory_gb)


def run_suite(suite: Suite, steps: int = 1) -> list[CaseResult]:
    return [run_case(case, steps) for case in suite.cases]


def summary(rows: list[CaseResult]) -> SuiteSummary:
    errors = [abs(r.error) for r in rows]
    return SuiteSummary(len(rows), statistics.median(errors), max(errors), sum(e <= 0.10 for e in errors),
                        sum(e <= 0.25 for e in errors))
