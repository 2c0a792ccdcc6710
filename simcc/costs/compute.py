"""Time of one compute op on one device: a roofline (FLOPs vs bytes) at achieved efficiency,
plus kernel-launch overhead. The only place compute time is derived."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simcc.errors import InputError
from simcc.memo import Memo
from simcc.model.ops import FORWARD_FAMILY, MATMUL_FAMILIES, GemmBlock, Op
from simcc.specs.hardware import Device, EfficiencyCurve
from simcc.specs.vocab import OTHER_FORMATS

# Elementwise FLOPs run on vector units, not matrix units: count them against the fp32 peak.
VECTOR_DTYPE = "fp32"
GROUPED_FAMILIES = ("grouped_gemm", "grouped_gemm_backward")
TENSOR_CORE_DTYPES = ("bf16", "fp16", "fp8", "int8")


@dataclass(frozen=True)
class OpCost:
    seconds: float  # busiest rank
    mean_seconds: float  # average rank (equal to seconds except for expert ops)
    bound: str  # "compute" | "memory" | "launch"


def peak_flops(device: Device, dtype: str, field: str = "precision.compute") -> float:
    value = getattr(device.peak_tflops, dtype, None)
    if value is None:
        available = [d for d, v in device.peak_tflops.model_dump().items() if v]
        raise InputError(device.name, field, f"device has no {dtype} peak; it supports {', '.join(available)}")
    return value * 1e12


def on_curve(curve: EfficiencyCurve, x: float) -> float:
    """Log-linear interpolation, clamped at the ends."""
    return float(np.interp(math.log10(max(x, 1e-9)), np.log10(curve.size), curve.fraction))


def measured_curve(device: Device, family: str) -> EfficiencyCurve | None:
    """The family's calibrated curve; a backward GEMM without one of its own takes its forward's."""
    curves = device.efficiency.curves
    return curves.get(family) or curves.get(FORWARD_FAMILY.get(family, ""))  # type: ignore[call-overload]


def efficiency(device: Device, family: str, kernel_flops: float, intensity: float, dtype: str = "",
               block_scaled: bool = False, per_expert_gemms: bool = False) -> float:
    """Achieved fraction of peak: the calibrated curve for the family when the profile has one
    (on its own axis: one kernel's FLOPs, or FLOPs per byte), else the profile's default. An FP8
    grouped GEMM run as one cuBLAS GEMM per expert takes the dense FP8 fraction; a block-scaled
    cuBLAS GEMM keeps the profile's share of it (the grouped FP8 fraction is measured on a
    block-scaled grouped kernel already)."""
    eff = device.efficiency
    curve = measured_curve(device, family)
    if curve is not None:
        return on_curve(curve, intensity if curve.axis == "intensity" else max(kernel_flops, 1.0))
    if family == "attention":
        return eff.attention
    grouped = family in GROUPED_FAMILIES
    grouped_kernel = grouped and not per_expert_gemms
    fp8, block_share = (eff.fp8_grouped_matmul if grouped_kernel else eff.fp8_matmul), eff.fp8_block_scaled_share
    if dtype == "fp8" and fp8 is not None:
        return fp8 * block_share if block_scaled and not grouped_kernel and block_share is not None else fp8
    if grouped and eff.grouped_matmul is not None:
        return eff.grouped_matmul
    return eff.matmul


# Output tiles cuBLAS-class kernels use for large GEMMs; each tile runs on one SM, in waves of
# sm_count tiles (NVIDIA, "Matrix Multiplication Background User's Guide": tile and wave quantization).
LARGE_TILES = ((256, 128), (128, 256), (128, 128))
SKINNY_BELOW, SKINNY_TILE_ROWS = 64, 16


def _kernel_quantization(blocks: tuple[GemmBlock, ...], sms: int) -> float:
    """Useful share of the SM-time one GEMM kernel occupies: partial tiles at the edges of each
    output block, and a last wave that leaves SMs idle. A kernel with fewer tiles than SMs splits
    its K loop across the idle ones (split-K), so only its tile edges are lost. The best tile
    shape is taken, as the library's heuristics pick one per shape. A skinny GEMM (a decode
    step's few tokens) runs a tile of as few rows as the tensor-core instruction takes, 16 (PTX
    ISA: mma.sync.m16n8k16), not a 128-row tile of padding."""
    shape = np.array([(m, n, copies) for m, _, n, copies in blocks], dtype=float).reshape(-1, 3)
    rows_out, cols_out, copies = shape[:, 0], shape[:, 1], shape[:, 2]
    useful = float((rows_out * cols_out * copies).sum())
    if useful <= 0:
        return 1.0  # nothing to tile (an expert rank that received no tokens)
    skinny = rows_out < SKINNY_BELOW
    skinny_rows = SKINNY_TILE_ROWS * np.maximum(1.0, np.ceil(rows_out / SKINNY_TILE_ROWS))
    best = 0.0
    for rows, cols in LARGE_TILES:
        tile_rows = np.where(skinny, np.minimum(rows, skinny_rows), rows)
        count = np.ceil(rows_out / tile_rows) * np.ceil(cols_out / cols) * copies
        tiles, occupied = float(count.sum()), float((count * tile_rows * cols).sum())
        slots = math.ceil(tiles / sms) * sms if tiles >= sms else tiles
        best = max(best, useful / occupied * tiles / slots)
    return best


def _flop_weighted_share(op: Op, slowdown: Callable[[GemmBlock], float]) -> float:
    """Share of the best shape left when each of the op's GEMM blocks takes `slowdown(block)` times
    its best-shape time, FLOP-weighted over the blocks (time adds, so harmonic); 1 without FLOPs."""
    blocks = [block for kernel in op.kernels for block in kernel]
    flops = sum(m * k * n * copies for m, k, n, copies in blocks)
    if flops <= 0:
        return 1.0
    return flops / sum(m * k * n * copies * slowdown((m, k, n, copies)) for m, k, n, copies in blocks)


def inner_loop_share(device: Device, op: Op) -> float:
    """Share of the best shape left after each output tile's K-loop pipeline fill and drain,
    K / (K + overhead), FLOP-weighted over the op's GEMM blocks. The overhead is fitted on
    tensor-core GEMMs; an fp32 GEMM (a router) runs on the vector units."""
    overhead = device.efficiency.gemm_k_overhead
    if overhead <= 0 or op.dtype not in TENSOR_CORE_DTYPES:
        return 1.0
    return _flop_weighted_share(op, lambda block: (block[1] + overhead) / block[1])


def expert_rows_share(device: Device, op: Op) -> float:
    """Share of the best shape left to a grouped GEMM's experts of few rows, M / (M + overhead),
    FLOP-weighted over its tiled blocks. Matrix-vector blocks (fewer rows than a tiled kernel
    takes) stream their weights and are left to the roofline. An engine that picks its expert
    kernel by the step's tokens (`expert_matvec_below_tokens`) tiles every expert of a step at or
    above that size, however few rows each has."""
    overhead = device.efficiency.grouped_gemm_m_overhead
    if overhead <= 0 or op.family not in GROUPED_FAMILIES:
        return 1.0
    switch = device.efficiency.expert_matvec_below_tokens
    tiled_from = 1 if switch and op.pair_reads is not None and op.pair_reads.tokens >= switch else SKINNY_BELOW
    return _flop_weighted_share(op, lambda block: (block[0] + overhead) / block[0] if block[0] >= tiled_from else 1.0)


def quantization(device: Device, op: Op) -> float:
    """Achieved share of the best-shape efficiency for this op's GEMM kernels (equal FLOPs each, so
    the time-weighted mean is harmonic); 1 when the device or the shape is not known."""
    if device.sm_count is None or not op.kernels:
        return 1.0
    return len(op.kernels) / sum(1.0 / _kernel_quantization(kernel, device.sm_count) for kernel in op.kernels)


def memory_efficiency(device: Device, family: str, moved: float) -> float:
    """Achieved fraction of memory bandwidth: the family's calibrated curve over bytes moved
    (gathers and scatters stream worse than copies), else the profile's single fraction."""
    curve = device.efficiency.memory_curves.get(family)  # type: ignore[call-overload]
    if curve is not None:
        return on_curve(curve, max(moved, 1.0))
    return device.efficiency.memory


def mixed_input_share(device: Device, op: Op) -> float:
    """Share of the dense kernel's rate a weight-only quantized GEMM keeps where it runs tiled on
    the tensor cores (a dense curve, measured or not, is the compute dtype's kernel, not the
    mixed-input one); 1 for other ops (only GEMMs carry mixed_input) and for matrix-vector
    products, which stream the weights."""
    share = device.efficiency.weight_only_matmul
    if share is None or not op.mixed_input or not _tiled(op):
        return 1.0
    return share


def quantized_product_fraction(device: Device, op: Op) -> float | None:
    """Fraction of the int8 peak this GEMM over quantized weights reaches where the device's engine
    multiplies them with integer dot products (Efficiency.quantized_matmul), by the weights' format;
    None where the engine dequantizes them to the compute dtype instead."""
    table = device.efficiency.quantized_matmul
    if not op.weight_format or not table:
        return None
    return table.get(op.weight_format, table.get(OTHER_FORMATS))


def _product_share(op: Op) -> float:
    """Share of the op's FLOPs that are the products themselves (2 m k n per output block), not
    the per-weight dequantization: integer dot products unpack each weight once per token, which
    the measured fraction already holds."""
    products = 2.0 * sum(m * k * n * copies for kernel in op.kernels for m, k, n, copies in kernel)
    return min(1.0, products / op.flops) if products > 0 and op.flops > 0 else 1.0


def _roofline(device: Device, op: Op, flops: float, moved: float) -> tuple[float, str]:
    launch = device.efficiency.kernel_launch_us * 1e-6 * op.launches
    integer_fraction = quantized_product_fraction(device, op)
    if integer_fraction is not None:
        compute = flops * _product_share(op) / (peak_flops(device, "int8") * integer_fraction)
    elif op.family in MATMUL_FAMILIES or op.family == "attention":
        kernel = op.kernel_flops if op.kernel_flops is not None else flops
        intensity = flops / moved if moved > 0 else math.inf
        fraction = efficiency(device, op.family, kernel, intensity, op.dtype, op.block_scaled, op.per_expert_gemms)
        if measured_curve(device, op.family) is None:  # a measured curve already holds its shapes' quantization
            fraction *= quantization(device, op) * inner_loop_share(device, op) * expert_rows_share(device, op)
        fraction *= mixed_input_share(device, op)
        compute = flops / (peak_flops(device, op.dtype) * fraction)
    else:
        compute = flops / peak_flops(device, VECTOR_DTYPE)
    memory = moved / (device.memory_bandwidth_gb_s * 1e9 * memory_efficiency(device, op.family, moved))
    if flops == 0 and moved == 0:
        return 0.0, "launch"
    bound = "compute" if compute >= memory else "memory"
    if device.sm_count is None or measured_curve(device, op.family) is not None:
        return max(compute, memory) + launch, bound  # a measured curve already holds the overlap it got
    return overlapped(compute, memory, resident_warps(op)) + launch, bound


# Warps an SM keeps resident while a kernel runs, which hide one another's memory waits. A
# tensor-core GEMM or fused-attention kernel runs one CTA of 256-384 threads per SM, its tile's
# pipeline stages filling most of the shared memory (CUTLASS's 128x128 and 128x256 tiles; 8 warps
# taken); a streaming kernel fills the SM's 2,048 threads (CUDA C++ Programming Guide, compute
# capability 8.x and 9.x: 64 resident warps per SM). A product with fewer rows than the smallest
# tensor-core tile (m16n8k16, PTX ISA) runs as a matrix-vector kernel, which streams the weights.
TILED_KERNEL_WARPS = 8
STREAMING_KERNEL_WARPS = 64
MMA_TILE_ROWS = 16


def _tiled(op: Op) -> bool:
    """Whether the op's product runs as tensor-core tiles: not when even its largest block has
    fewer rows than the smallest tile (a shape-less op is taken as tiled)."""
    rows = max((m for kernel in op.kernels for m, _, _, _ in kernel), default=None)
    return rows is None or rows >= MMA_TILE_ROWS


def resident_warps(op: Op) -> int:
    if op.family not in MATMUL_FAMILIES and op.family != "attention":
        return STREAMING_KERNEL_WARPS
    return TILED_KERNEL_WARPS if _tiled(op) else STREAMING_KERNEL_WARPS


def overlapped(compute: float, memory: float, warps: int) -> float:
    """Kernel time when compute and memory traffic overlap only as far as the resident warps let
    them (Sim, Dasgupta, Kim and Vuduc, PPoPP 2012, eqs. 1, 16, 17: T = T_comp + T_mem -
    min(F T_comp, T_mem), F = (N - 1)/N for N warps, the memory-waiting case): a kernel waiting on
    memory still pays one warp's share of its compute, T_mem + T_comp / N, so near the ridge it runs
    up to 1/N slower than max(T_comp, T_mem); a compute-bound one pays nothing extra."""
    hidden = (warps - 1) / warps
    return compute + memory - min(hidden * compute, memory)


# Costs memoised by op and device object: a plan costs the same op (one layer's GEMM, its
# backward) once per layer, micro-batch shape and sampled step.
_COSTS: Memo[OpCost] = Memo(200_000)


def op_cost(device: Device, op: Op) -> OpCost:
    return _COSTS.get((id(device), op), lambda: _op_cost(device, op), device)


def _op_cost(device: Device, op: Op) -> OpCost:
    moved, mean_moved = op.bytes, op.mean_bytes if op.mean_bytes is not None else op.bytes
    pairs = op.pair_reads
    if pairs is not None and pairs.tokens < device.efficiency.expert_matvec_below_tokens:
        moved, mean_moved = moved + pairs.extra_bytes, mean_moved + pairs.mean_extra_bytes
    seconds, bound = _roofline(device, op, op.flops, moved)
    if op.mean_flops is None:
        return OpCost(seconds, seconds, bound)
    mean, _ = _roofline(device, op, op.mean_flops, mean_moved)
    return OpCost(seconds, min(mean, seconds), bound)


def mfu(model_flops_per_second_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (Chowdhery et al. 2022): model FLOPs, not executed ones, over peak."""
    return model_flops_per_second_per_device / peak_flops
