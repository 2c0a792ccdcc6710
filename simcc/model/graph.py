"""A model as pipeline units: each repeat iteration (or top-level block) is one unit; embedding
and LM head ride along with the first and last unit, as in Megatron's pipeline split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import simcc.model.blocks as B
from simcc.memo import Memo
from simcc.model.kinds import COSTINGS, costing_of
from simcc.model.kinds._shared import drawn_per_layer, layer_seeded
from simcc.model.ops import DTYPE_BYTES, Comm, GemmOperands, Op, WorkItem, elementwise
from simcc.model.threshold import FiringSample, firing_sample
from simcc.specs.blocks import BlockSpec, MTPBlock
from simcc.specs.workload import BlockItem, ModelSpec, ThresholdTreeBlock

# Kinds that ride with a neighbouring pipeline unit (their costing registration says so).
ATTACHED_KINDS = tuple(costing.spec_type.kind for costing in COSTINGS.values() if costing.attached)


@dataclass(frozen=True)
class Block:
    kind: str
    spec: BlockSpec  # the validated block spec
    index: int  # position in the expanded model, for seeding per-layer loads


@dataclass(frozen=True)
class Unit:
    blocks: tuple[Block, ...]


def _expand(items: list[BlockItem]) -> list[list[BlockItem]]:
    """Top-level items into units: a repeat contributes one unit per iteration."""
    units: list[list[BlockItem]] = []
    for item in items:
        if item.repeat is not None:
            inner = _flatten(item.blocks or [])
            units.extend([list(inner) for _ in range(item.repeat)])
        else:
            units.append([item])
    return units


def _flatten(items: list[BlockItem]) -> list[BlockItem]:
    flat: list[BlockItem] = []
    for item in items:
        if item.repeat is not None:
            for _ in range(item.repeat):
                flat.extend(_flatten(item.blocks or []))
        else:
            flat.append(item)
    return flat


# Expanded models by model object: a plan, its layout checks and its memory model each ask, and
# a search asks per candidate.
_UNITS: Memo[list[Unit]] = Memo(64)


def units_of(model: ModelSpec) -> list[Unit]:
    """Pipeline units, with attached blocks (embedding, LM head) merged into their neighbours.
    Callers read the list, never change it."""
    return _UNITS.get(id(model), lambda: _units(model), model)


# The same, for serving: by model object.
_SERVED_UNITS: Memo[list[Unit]] = Memo(64)


def inference_units(model: ModelSpec) -> list[Unit]:
    """The units a model serves with: as `units_of`, less the blocks only training runs
    (multi-token prediction modules, which DeepSeek-V3 discards at inference: arXiv 2412.19437,
    sec. 2.2), so that a model serves as it would without them."""
    if not any(isinstance(block.spec, MTPBlock) for block in blocks_of(model)):
        return units_of(model)
    return _SERVED_UNITS.get(id(model), lambda: _units(model, served=True), model)


def blocks_of(model: ModelSpec) -> list[Block]:
    """Every block of the expanded model in order: the positions `--layer N` counts."""
    return [block for unit in units_of(model) for block in unit.blocks]


def _units(model: ModelSpec, served: bool = False) -> list[Unit]:
    raw = _expand(model.blocks)
    if served:  # training-only blocks left out, and a unit that held only them
        raw = [kept for items in raw if (kept := [item for item in items if not isinstance(item.spec, MTPBlock)])]
    index = 0
    body: list[list[Block]] = []
    leading: list[Block] = []
    trailing: list[Block] = []
    for items in raw:
        made = []
        for item in items:
            made.append(Block(item.kind, item.spec, index))
            index += 1
        if len(made) == 1 and costing_of(made[0].spec).attached:
            (leading if not body else trailing).append(made[0])
        else:
            if trailing:  # an attached block between body units is an ordinary unit after all
                body.append(trailing)
                trailing = []
            body.append(made)
    if not body:
        body, leading, trailing = [leading + trailing], [], []
    body[0] = leading + body[0]
    body[-1] = body[-1] + trailing
    return [Unit(tuple(u)) for u in body]


def stage_units(units: list[Unit], chunks: int, layout: list[int] | None = None) -> list[list[Unit]]:
    """Split units into `chunks` contiguous pipeline chunks: `layout[i]` units each when given (the
    embedding and LM head, attached to the first and last unit, become units of their own there,
    so that a first or last chunk of 0 layers holds them), else as evenly as possible (earlier
    chunks take the remainder)."""
    if layout is not None:
        return _laid_out(units, layout)
    base, extra = divmod(len(units), chunks)
    result, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        result.append(units[start : start + size])
        start += size
    return result


def _laid_out(units: list[Unit], layout: list[int]) -> list[list[Unit]]:
    body = [list(unit.blocks) for unit in units]
    lead = _attached_prefix(body[0])
    leading, body[0] = body[0][:lead], body[0][lead:]
    trail = _attached_prefix(body[-1][::-1])
    keep = len(body[-1]) - trail
    trailing, body[-1] = body[-1][keep:], body[-1][:keep]
    result: list[list[Unit]] = []
    start = 0
    for size in layout:
        result.append([Unit(tuple(blocks)) for blocks in body[start : start + size]])
        start += size
    if leading:
        result[0].insert(0, Unit(tuple(leading)))
    if trailing:
        result[-1].append(Unit(tuple(trailing)))
    return result


def _attached_prefix(blocks: list[Block]) -> int:
    """How many blocks at the start are attached ones (embedding, LM head), leaving at least one."""
    count = 0
    while count < len(blocks) - 1 and costing_of(blocks[count].spec).attached:
        count += 1
    return count


_PARAMS: Memo[B.Params] = Memo(10_000)


def block_params(block: Block, hidden: int) -> B.Params:
    """By spec object: a model repeats its layers."""
    spec = block.spec
    return _PARAMS.get((id(spec), hidden), lambda: costing_of(spec).params(spec, hidden), spec)


# Works memoised by what they depend on: a model repeats its layers, and a search or sweep asks
# for the same layer under many layouts. Specs are frozen, so a key never goes stale; callers
# read a work, never change it.
_WORKS: Memo[B.BlockWork] = Memo(50_000)


def block_work(block: Block, hidden: int, batch: B.Batch, shard: B.Shard) -> B.BlockWork:
    costing = costing_of(block.spec)
    if costing.per_layer_seed and drawn_per_layer(shard):  # each layer its own draws, reproducibly
        shard = layer_seeded(shard, block.index)
    # By spec object (some specs hold lists and do not hash); dp and micro-batches are left out of
    # the key where the work does not read them.
    spec = block.spec
    key = (id(spec), hidden, batch, shard if costing.reads_data_parallel else without_data_parallel(shard))
    return _WORKS.get(key, lambda: with_input_casts(costing.work(spec, hidden, batch, shard), shard), spec)


_NO_DP: Memo[B.Shard] = Memo(10_000)


def without_data_parallel(shard: B.Shard) -> B.Shard:
    """The shard as every kind but `reads_data_parallel` ones sees it: a shared key for its work."""
    return _NO_DP.get(shard, lambda: replace(shard, dp=1, microbatches=1))


AMAX_BYTES = 4.0  # one fp32 amax per tensor


def with_input_casts(work: B.BlockWork, shard: B.Shard) -> B.BlockWork:
    """Before each GEMM that takes narrower inputs than the compute dtype (FP8), a pass casts its
    activation input: read at the compute dtype (twice under current scaling, whose amax needs
    the whole tensor first), written at the narrow one with its scales, an amax and a scale
    multiply per element (Transformer Engine's cast kernels; its backward casts and transposes the
    output gradient). Every block kind gets it here, once.

    Beside a Transformer Engine linear under sequence parallelism, TE casts before it gathers
    (transformer_engine/pytorch/module/layernorm_linear.py: the norm output is quantized, then
    all-gathered with the quantizer; base.py grad_output_preprocess gathers the output gradient
    the same way): the cast covers the local shard, the gather moves FP8 bytes and its backward
    reduce-scatters the input gradient at the communication dtype; the reduce-scatter after an
    FP8 row-parallel linear gathers its output gradient in FP8 in the backward. Under current
    scaling a gathered tensor's amax is all-reduced over the TP group before its cast (TE sets the
    input quantizer's amax reduction group for a column-parallel linear and the output-gradient
    quantizer's for a row-parallel one; csrc/quantizer.cpp waits on that all-reduce): one 4-byte
    all-reduce before each such cast, whose conjugate in the backward stands for the output
    gradient's (a layer gathers as many inputs forward as output gradients backward)."""
    compute = DTYPE_BYTES[shard.dtype]
    operands = shard.dense_gemm or GemmOperands()
    forward: list[WorkItem] = []
    narrow_before: float | None = None  # bytes per input element of the last GEMM so far, when narrow
    changed = False
    for item in work.forward:
        if isinstance(item, Op) and item.family in ("gemm", "grouped_gemm"):
            narrow = DTYPE_BYTES[item.dtype] + operands.scale_bytes
            narrow_before = narrow if DTYPE_BYTES[item.dtype] < compute else None
            if narrow_before is not None:
                elements = sum(m * k * copies for kernel in item.kernels for m, k, _, copies in kernel)
                previous = forward[-1] if forward else None
                # Transformer Engine's gather of this input, when the GEMM is its linear's
                gather = (previous if isinstance(previous, Comm) and previous.linear and previous.collective == "all_gather"
                          else None)
                cast = elementwise(f"{item.name}.cast", elements / shard.tp if gather else elements,
                                   operands.cast_reads, narrow / compute, shard.dtype, flops_per_element=2)
                cast = replace(cast, launches=cast_launches(item, operands))
                if gather is not None:
                    fp8_gather = replace(gather, bytes=gather.bytes * narrow / DTYPE_BYTES[shard.comm_dtype],
                                         backward_bytes=gather.bytes)
                    amax = ([Comm(f"{item.name}.amax", "all_reduce", AMAX_BYTES, "tp")]
                            if operands.amax_from_tensor else [])
                    forward[-1:] = [*amax, cast, fp8_gather]
                else:
                    forward.append(cast)
                changed = True
        elif isinstance(item, Comm) and item.linear and item.collective == "reduce_scatter" and narrow_before:
            item = replace(item, backward_bytes=item.bytes * narrow_before / DTYPE_BYTES[shard.comm_dtype])
            changed = True
        forward.append(item)
    return replace(work, forward=forward) if changed else work


def cast_launches(gemm: Op, operands: GemmOperands) -> int:
    """Kernels that cast one GEMM's activation input: the quantizer's per tensor, once for each
    expert with rows when the quantizer casts a grouped input expert by expert."""
    experts = sum(copies for m, _, _, copies in gemm.kernels[0] if m > 0) if gemm.kernels else 1
    tensors = max(1, experts) if gemm.family == "grouped_gemm" and operands.cast_per_expert else 1
    return operands.cast_launches * tensors


def units_params(units: list[Unit], hidden: int) -> B.Params:
    total = B.Params()
    for unit in units:
        for block in unit.blocks:
            total = total.add(block_params(block, hidden))
    return total


def model_params(model: ModelSpec) -> B.Params:
    return units_params(units_of(model), model.hidden)


_FORWARD_FLOPS: dict[tuple[str, B.Batch], float] = {}  # a sweep asks again for every layout


def model_forward_flops(model: ModelSpec, batch: B.Batch) -> float:
    """Forward matmul FLOPs at the reporting convention (Narayanan et al. 2021, appendix): full
    attention score products, exactly balanced experts, no padding or recomputation."""
    key = (model.model_dump_json(), batch)
    if key not in _FORWARD_FLOPS:
        if len(_FORWARD_FLOPS) >= 256:
            _FORWARD_FLOPS.clear()
        _FORWARD_FLOPS[key] = units_forward_flops(units_of(model), model.hidden, batch)
    return _FORWARD_FLOPS[key]


def _reported_matmuls(units: list[Unit], hidden: int, batch: B.Batch) -> Iterator[tuple[Block, Op]]:
    """Every forward matrix product at the reporting convention (full score squares, exactly
    balanced experts), with its block: what model FLOPs count, in either convention."""
    shard = B.Shard(executed=False)
    for unit in units:
        for block in unit.blocks:
            for item in block_work(block, hidden, batch, shard).forward:
                if isinstance(item, Op) and item.is_matmul:
                    yield block, item


def units_forward_flops(units: list[Unit], hidden: int, batch: B.Batch) -> float:
    return sum(item.flops for _, item in _reported_matmuls(units, hidden, batch))


# The attention products whose causal half Megatron-Bridge counts: a fused core, or the unfused
# score and context GEMMs.
ATTENTION_PRODUCTS = ("attn.scores", "attn.context")


# By units list (a model's units_of list is one object) and batch: a sweep asks for every layout.
_MEGATRON_FLOPS: Memo[float] = Memo(256)


def megatron_forward_flops(units: list[Unit], hidden: int, batch: B.Batch) -> float:
    """Forward FLOPs as Megatron-Bridge's model-FLOPs formula counts them (Megatron-Bridge,
    src/megatron/bridge/training/utils/flop_utils.py, transformer_flops; Megatron-Core MoE recipes
    report TFLOP/s by it): the same weight GEMMs and logits, but a causal layer's score and context
    products at half (only the unmasked half is needed) and no router GEMM (the formula has no
    router term). With a sliding window simcc's windowed pairs are halved; the formula itself
    ignores windows."""
    return _MEGATRON_FLOPS.get((id(units), hidden, batch), lambda: _megatron_forward_flops(units, hidden, batch), units)


def _megatron_forward_flops(units: list[Unit], hidden: int, batch: B.Batch) -> float:
    total = 0.0
    for block, item in _reported_matmuls(units, hidden, batch):
        if item.name.startswith("moe.router"):
            continue  # the router's products are named moe.router* (routing/gating.py, router_products)
        # an MTP module's own layer is causal like the model's (its inner specs carry the flag)
        causal = any(getattr(spec, "causal", False) for spec in (block.spec, *getattr(block.spec, "layer_specs", ())))
        core = item.family == "attention" or item.name in ATTENTION_PRODUCTS
        total += item.flops / 2 if causal and core else item.flops
    return total


def input_dependent_share(model: ModelSpec, hidden: int) -> tuple[float, FiringSample | None]:
    """Share of the model's forward FLOPs spent in threshold trees, and the first tree's profile."""
    units = units_of(model)
    if not any(isinstance(b.spec, ThresholdTreeBlock) for u in units for b in u.blocks):
        return 0.0, None
    total = conditional = 0.0
    profile = None
    for unit in units:
        for block in unit.blocks:
            flops = sum(i.flops for i in block_work(block, hidden, B.Batch(1, 1, 1), B.Shard()).forward if isinstance(i, Op))
            total += flops
            if isinstance(block.spec, ThresholdTreeBlock):
                conditional += flops
                profile = profile or firing_sample(block.spec, block.index)
    return (conditional / total if total else 0.0), profile
