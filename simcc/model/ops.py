"""The work items a layer runs: compute ops (FLOPs, bytes) and communication (collective, bytes).

Ops carry no time: costs/ turns them into seconds on a device, and the timing layer schedules
those seconds. Keeping the three apart is what lets the simulator replace the analytic composer
without re-deriving any cost.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

from simcc.specs.vocab import DTYPE_BYTES, Collective  # noqa: F401 (DTYPE_BYTES re-exported)

# Families whose FLOPs run on matrix units, at the matmul efficiency (attention has its own).
# Families costed against peak FLOPs at a matmul efficiency (moefication: the clustering of a
# dense->sparse switch, dominated by its distance products).
MATMUL_FAMILIES = ("gemm", "grouped_gemm", "conv", "lstm", "moefication", "gemm_backward", "grouped_gemm_backward")
# A GEMM's backward runs other shapes and operand layouts (dX = dY W: NN; dW = dY^T X: a reduction
# over tokens), which a CPU or GPU library does not run at the forward's efficiency: its own family,
# with its own calibrated curve, falling back to the forward's when a profile has none.
BACKWARD_FAMILY = {"gemm": "gemm_backward", "grouped_gemm": "grouped_gemm_backward"}
FORWARD_FAMILY = {backward: forward for forward, backward in BACKWARD_FAMILY.items()}


def _cached_hash(item: "Op") -> int:
    """An op's hash over all its fields (as its equality compares them), worked out once: plans and
    searches look the same ops up many times, and a grouped GEMM's fields hold every expert's tiles."""
    cached = item.__dict__.get("_hash")
    if cached is None:
        cached = hash(tuple(getattr(item, f.name) for f in fields(item)))
        object.__setattr__(item, "_hash", cached)
    return cached


@dataclass(frozen=True)
class PairReads:
    """What a grouped GEMM reads when its engine runs one matrix-vector product per (token, expert)
    pair, as some small-batch expert kernels do: every pair reads its expert's weights, so an
    expert picked by several of the step's tokens is read once per token (costs.compute applies it
    where the device's engine does)."""

    tokens: float  # tokens in the step: the engine picks its kernel by them
    extra_bytes: float  # busiest rank: weight bytes beyond reading each expert with tokens once
    mean_extra_bytes: float  # the same on an average rank


@dataclass(frozen=True)
class Op:
    name: str
    family: str  # gemm | grouped_gemm | attention | conv | lstm | elementwise | gate | permute | embedding
    flops: float
    bytes: float
    dtype: str
    saved_bytes: float = 0.0  # activations kept for the backward pass
    kernel_flops: float | None = None  # FLOPs of one kernel, for the efficiency curve (default: flops)
    launches: int = 1  # kernels launched (a recurrent layer launches one per time step)
    # The busiest rank's work is in flops/bytes; the mean rank's here (expert ops only).
    mean_flops: float | None = None
    mean_bytes: float | None = None
    # The GEMM kernels one launch runs, each as the output blocks its tiles cover (a grouped GEMM
    # tiles all its experts in one kernel, a batched one all its copies); the kernels do equal
    # FLOPs. Empty: shape unknown.
    kernels: tuple[tuple["GemmBlock", ...], ...] = ()
    pair_reads: PairReads | None = None  # grouped GEMMs: their weight reads as per-pair products
    block_scaled: bool = False  # GEMMs: FP8 operands with per-block scales (GemmOperands.scale_bytes)
    # Grouped GEMMs: run as one library GEMM per expert rather than one grouped kernel
    # (GemmOperands.per_expert_gemms), so at the dense GEMM's fraction.
    per_expert_gemms: bool = False
    # GEMMs over quantized stored weights: their format (a WEIGHT_FORMATS name, or `other` for a
    # bits-per-weight figure), for engines whose kernel speed depends on it; "" otherwise.
    weight_format: str = ""
    # GEMMs whose stored weights are narrower than the operand the kernel multiplies (weight-only
    # quantization), converted inside the kernel: a mixed-input kernel (Efficiency.weight_only_matmul).
    mixed_input: bool = False

    def __hash__(self) -> int:
        return _cached_hash(self)

    def __getstate__(self) -> dict:
        """Pickled without the cached hash: another process hashes strings differently."""
        return {key: value for key, value in self.__dict__.items() if key != "_hash"}

    @property
    def is_matmul(self) -> bool:
        return self.family in MATMUL_FAMILIES or self.family == "attention"


@dataclass(frozen=True)
class Comm:
    name: str
    collective: Collective
    bytes: float  # per-rank buffer size, as nccl-tests' "size"
    group: str  # tp | ep | dp | edp | pp
    algorithm: str = "auto"  # see costs.collectives.ALGORITHMS
    # >1: split into this many pieces, pipelined with the compute up to the partner collective
    # that carries the same degree (MoE dispatch ... combine).
    overlap_chunks: int = 1
    remote_share: float | None = None  # all-to-all: share leaving the node (topology-aware gating)
    # Sequence parallelism's gather before a column-parallel GEMM: the GEMM keeps only its input's
    # shard, so its backward gathers it again for the weight gradient besides reduce-scattering the
    # data gradient (Korthikanti et al. 2022, sec. 4.2.2).
    regathered: bool = False
    # Compute items of the same block (by name) that run alongside this collective on another
    # stream, hiding it up to their time (a shared expert during the token dispatch).
    alongside: tuple[str, ...] = ()
    # Sequence parallelism's collective beside a Transformer Engine linear (attention's QKV and
    # output projection, a dense FFN's two linears): the gather before a column-parallel one, the
    # reduce-scatter after a row-parallel one. TE gathers FP8 inputs already cast (model/graph.py,
    # with_input_casts).
    linear: bool = False
    # Pipelined with its GEMM in tp chunks (Transformer Engine's userbuffers, Megatron-Core's
    # --tp-comm-overlap): an all-gather with the GEMM after it, a reduce-scatter with the one before.
    gemm_overlap: bool = False
    # Bytes the backward's conjugate collective moves when they differ from `bytes` (an FP8 gather's
    # backward reduce-scatters the input gradient at the communication dtype; a reduce-scatter's
    # backward gathers the output gradient cast to FP8); None: the same bytes.
    backward_bytes: float | None = None
    # All-to-all over dropless loads: the busiest rank's bytes over this rank's. Each rank sends its
    # own copies, but the exchange ends when the rank whose experts drew the most has received them
    # (and, in the combine, sent them back) over its own link.
    busiest_share: float = 1.0


WorkItem = Op | Comm

# Output matrices of one GEMM kernel: (rows m, inner k, columns n, how many such matrices).
GemmBlock = tuple[float, float, float, int]

# Backward/forward ratios. GEMM: data-gradient + weight-gradient products, each as large as the
# forward one (Narayanan et al. 2021, appendix). Fused attention: 5 matmuls backward vs 2 forward
# (Dao 2023, FlashAttention-2, sec. 3.1). Elementwise: read saved input + incoming gradient, write one.
# A permutation's backward is the inverse permutation of the gradient, the same rows moved (Transformer
# Engine's fused moe_permute runs moe_unpermute on the gradient, and the reverse).
BACKWARD_FLOPS_RATIO = {"gemm": 2.0, "grouped_gemm": 2.0, "conv": 2.0, "lstm": 2.0, "attention": 2.5, "permute": 1.0}
BACKWARD_BYTES_RATIO = {"gemm": 2.0, "grouped_gemm": 2.0, "conv": 2.0, "lstm": 2.0, "attention": 2.0, "permute": 1.0}
ELEMENTWISE_BACKWARD_RATIO = 1.5
# Families whose backward is a data-gradient and a weight-gradient product (cuBLAS/oneDNN run them
# as separate GEMMs); fused attention's backward is one kernel (FlashAttention-2).
TWO_KERNEL_BACKWARD = ("gemm", "grouped_gemm", "conv", "lstm")


@lru_cache(maxsize=65536)  # items are immutable; a plan asks for the same layer's backward many times
def backward_of(item: WorkItem) -> WorkItem:
    if isinstance(item, Comm):
        # Conjugate collectives move the same bytes: all-reduce <-> all-reduce, AG <-> RS, A2A <-> A2A.
        swap = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather"}
        moved = item.bytes if item.backward_bytes is None else item.backward_bytes
        return replace(item, name=item.name + ".bwd", collective=swap.get(item.collective, item.collective),
                       bytes=moved, backward_bytes=None)
    f_ratio = BACKWARD_FLOPS_RATIO.get(item.family, ELEMENTWISE_BACKWARD_RATIO)
    b_ratio = BACKWARD_BYTES_RATIO.get(item.family, ELEMENTWISE_BACKWARD_RATIO)
    scale = lambda v: None if v is None else v * f_ratio  # noqa: E731
    if item.family in TWO_KERNEL_BACKWARD:
        # Two kernels, each the forward's size: they sit where the forward sits on an efficiency
        # curve (not at twice its FLOPs), and each is launched.
        single = item.kernel_flops if item.kernel_flops is not None else item.flops
        kernel_flops, launches = single, item.launches * 2
    else:
        kernel_flops, launches = scale(item.kernel_flops), item.launches
    # dX[m,k] = dY[m,n] W^T and dW[k,n] = X^T dY: two kernels as large as the forward one.
    kernels = tuple(kernel for forward in item.kernels
                    for kernel in (tuple((m, n, k, c) for m, k, n, c in forward), tuple((k, m, n, c) for m, k, n, c in forward)))
    return replace(
        item,
        name=item.name + ".bwd",
        family=BACKWARD_FAMILY.get(item.family, item.family),
        flops=item.flops * f_ratio,
        bytes=item.bytes * b_ratio,
        saved_bytes=0.0,
        kernel_flops=kernel_flops,
        launches=launches,
        mean_flops=scale(item.mean_flops),
        mean_bytes=None if item.mean_bytes is None else item.mean_bytes * b_ratio,
        kernels=kernels,
        pair_reads=None,  # per-pair matrix-vector products are an inference engine's forward kernel
    )


@dataclass(frozen=True)
class GemmOperands:
    """How a GEMM reads its operands when they are narrower than the compute dtype: FP8 inputs
    (activations and weights cast to fp8, the output at the compute dtype, as Transformer Engine's
    FP8 GEMMs run), and weights stored narrower still (a quantized format, dequantized in the
    kernel). The peak the GEMM runs at is the inputs' dtype's."""

    inputs: str | None = None  # dtype of the activation and weight operands; None: the compute dtype
    weight_bytes: float | None = None  # per stored weight, scales included; None: at the inputs' dtype
    dequant_flops: float = 0.0  # per weight
    scale_bytes: float = 0.0  # per input element (block-scaled FP8: one fp32 scale per 128)
    cast_reads: float = 1.0  # passes over the input its cast makes (current scaling: an amax pass first)
    # Kernels one tensor's cast launches, and whether a grouped GEMM's experts are cast one by one
    # (each expert's rows a tensor of their own) or in one fused launch for all of them.
    cast_launches: int = 1
    cast_per_expert: bool = False
    # Current scaling takes each tensor's amax from the tensor itself: a tensor gathered over the
    # TP group (sequence parallelism) needs the group's amax, one all-reduce before its cast.
    amax_from_tensor: bool = False
    # A grouped GEMM over these operands runs as one cuBLAS GEMM per expert (Precision.fp8_expert_gemm).
    per_expert_gemms: bool = False
    weight_format: str = ""  # quantized stored weights: their format (Op.weight_format)

    @property
    def block_scaled(self) -> bool:
        return self.scale_bytes > 0

    @property
    def mixed_input(self) -> bool:
        """Weights stored narrower than the operand the kernel multiplies, converted in its main loop."""
        return self.weight_bytes is not None

    def read(self, compute: str) -> tuple[str, float, float, float]:
        """(dtype of the op, bytes per activation element, bytes per weight, dequant FLOPs per weight)."""
        dtype = self.inputs or compute
        activation = DTYPE_BYTES[dtype] + self.scale_bytes
        weight = self.weight_bytes if self.weight_bytes is not None else DTYPE_BYTES[dtype]
        return dtype, activation, weight, self.dequant_flops


PLAIN = GemmOperands()
BLOCK_SCALE_BYTES = 4 / 128  # block-scaled FP8: an fp32 scale per 1 x 128 activation tile (DeepSeek-V3 sec. 3.3.2)


def gemm(name: str, m: float, k: float, n: float, dtype: str, saved: bool = True,
         operands: GemmOperands | None = None) -> Op:
    """C[m,n] = A[m,k] @ B[k,n]: 2mkn FLOPs, each operand read or written once; A and B (the
    weight) as `operands` says, C at `dtype`."""
    b = DTYPE_BYTES[dtype]
    operands = operands or PLAIN
    op_dtype, a_bytes, w_bytes, dequant = operands.read(dtype)
    return Op(name, "gemm", 2.0 * m * k * n + k * n * dequant, m * k * a_bytes + k * n * w_bytes + m * n * b, op_dtype,
              saved_bytes=m * k * a_bytes if saved else 0.0, kernels=(((m, k, n, 1),),),
              block_scaled=operands.block_scaled, weight_format=operands.weight_format, mixed_input=operands.mixed_input)


def grouped_gemm(name: str, busiest: list[float], mean: list[float], k: int, n: int, dtype: str,
                 active: float | None = None, mean_active: float | None = None,
                 operands: GemmOperands | None = None, step_tokens: float | None = None) -> Op:
    """One GEMM per local expert with its own token count; only experts with tokens read weights.
    `active` / `mean_active`: the expected experts with tokens in one step, when the token counts
    are expectations over steps (each step reads the weights of the experts it picked, not of every
    expert some step picked); by default, the experts with a positive count. `step_tokens`: the
    tokens the step routes, for engines that switch to per-pair products below a batch size."""
    b = DTYPE_BYTES[dtype]
    operands = operands or PLAIN
    op_dtype, a_bytes, w_bytes, dequant = operands.read(dtype)

    def totals(tokens: list[float], used: float | None) -> tuple[float, float, float]:
        used = sum(1 for t in tokens if t > 0) if used is None else used
        rows, weights = sum(tokens), used * k * n
        return (sum(2.0 * t * k * n for t in tokens) + weights * dequant,
                rows * (k * a_bytes + n * b) + weights * w_bytes, max(used, 1e-9))

    flops, moved, used = totals(busiest, active)
    mean_flops, mean_moved, _ = totals(mean, mean_active)
    # The kernel's blocks as one step runs them: each expert with tokens, or, when a step uses
    # fewer experts than the expectation spreads tokens over, that many sharing the step's rows.
    blocks = tuple((t, k, n, 1) for t in busiest if t > 0)
    launched = max(1, round(used))
    if launched < len(blocks):
        blocks = ((sum(busiest) / launched, k, n, 1),) * launched
    pairs = None
    if step_tokens is not None:
        mean_used = sum(1 for t in mean if t > 0) if mean_active is None else mean_active
        pairs = PairReads(step_tokens, max(0.0, sum(busiest) - used) * k * n * w_bytes,
                          max(0.0, sum(mean) - mean_used) * k * n * w_bytes)
    per_expert = operands.per_expert_gemms
    # Run as one library GEMM per expert, each expert with tokens is a launch of its own (their
    # streams run side by side, so the blocks still share the SMs as one grouped kernel's would).
    return Op(name, "grouped_gemm", flops, moved, op_dtype, saved_bytes=sum(busiest) * k * a_bytes,
              kernel_flops=flops / max(used, 1.0), mean_flops=mean_flops, mean_bytes=mean_moved,
              launches=launched if per_expert else 1, kernels=(blocks,), pair_reads=pairs,
              block_scaled=operands.block_scaled, per_expert_gemms=per_expert,
              weight_format=operands.weight_format, mixed_input=operands.mixed_input)


def elementwise(name: str, elements: float, reads: float, writes: float, dtype: str,
                flops_per_element: float = 1.0, saved_elements: float = 0.0, family: str = "elementwise") -> Op:
    b = DTYPE_BYTES[dtype]
    return Op(name, family, elements * flops_per_element, elements * (reads + writes) * b, dtype,
              saved_bytes=saved_elements * b)
