"""The optimizer step as one memory-bound op: the bytes it moves per parameter and the kernels it
launches, for a fused kernel or torch's unfused per-tensor loop.

One function serves both the training plan and calibration (the profiler times real optimizer
steps and calibrate predicts them with this op), so the measured and the predicted step describe
the same work.
"""

from __future__ import annotations

from simcc.model.ops import DTYPE_BYTES, Op
from simcc.specs.workload import Optimizer, Precision

# Bytes of optimizer state per parameter in fp32, whatever the weights: Adam's two moments;
# Adafactor's factored second moment is O(rows + cols) (Shazeer & Stern 2018), SGD keeps none.
MOMENT_BYTES = {"adam": 8, "adafactor": 0, "sgd": 0}
# What an unfused loop adds, in fp32 element accesses per parameter: torch.optim.Adam's
# single-tensor path runs exp_avg.lerp_(grad), exp_avg_sq.mul_().addcmul_(grad, grad),
# denom = (exp_avg_sq.sqrt() / c).add_(eps) and param.addcdiv_(exp_avg, denom): 19 accesses where
# a fused kernel makes 7, i.e. 12 more, in 8 kernels per tensor counting the step counter's
# increment (torch/optim/adam.py, _single_tensor_adam). Adafactor's loop squares the gradient,
# reduces rows and columns, forms the rsqrt scale and applies it (torch/optim/_adafactor.py): about
# 6 more accesses in 6 kernels. SGD without momentum is param.add_(grad): one kernel, nothing more.
UNFUSED_EXTRA_ACCESSES = {"adam": 12, "adafactor": 6, "sgd": 0}
UNFUSED_KERNELS_PER_TENSOR = {"adam": 8, "adafactor": 6, "sgd": 1}
UPDATE_FLOPS_PER_PARAM = 10  # a handful of multiply-adds, a sqrt and a divide: never the bound


def moment_bytes(optimizer: Optimizer) -> float:
    """Bytes of moments per parameter: Adam's two at the optimizer's moment dtype."""
    return MOMENT_BYTES[optimizer.type] * DTYPE_BYTES[optimizer.moments_dtype] / DTYPE_BYTES["fp32"]


def update_bytes_per_param(optimizer: Optimizer, precision: Precision) -> float:
    """Bytes the update itself moves per parameter (gradient read, state read and written, the
    low-precision copy written), with the unfused loop's temporaries."""
    weight, grad = DTYPE_BYTES[precision.weights], DTYPE_BYTES[precision.gradients]
    has_master = optimizer.master_weights and precision.weights != "fp32"
    main = 4 if has_master else weight  # the copy the update is applied to: read and written
    low_precision_copy = weight if has_master else 0
    update = grad + 2 * (main + moment_bytes(optimizer)) + low_precision_copy
    if optimizer.implementation == "unfused":
        update += 4 * UNFUSED_EXTRA_ACCESSES[optimizer.type]
    return update


def step_bytes_per_param(optimizer: Optimizer, precision: Precision) -> float:
    """The whole step as Megatron-LM runs it: the update, plus fp16 dynamic loss scaling
    (unscale every gradient and check it for inf/NaN: read + write; Micikevicius et al. 2018),
    clipping (one more read of every gradient for the global norm), and zeroing the contiguous
    gradient buffer for the next step's accumulation."""
    grad = DTYPE_BYTES[precision.gradients]
    unscale = 2 * grad if precision.compute == "fp16" else 0
    clip = grad if optimizer.clip_grad_norm else 0
    return update_bytes_per_param(optimizer, precision) + unscale + clip + grad


def optimizer_family(optimizer: Optimizer) -> str:
    """The kernel family a profile measures this step as (its own bandwidth curve)."""
    return "optimizer" if optimizer.implementation == "fused" else "optimizer_unfused"


def optimizer_step(parameters: float, tensors: float, optimizer: Optimizer, precision: Precision,
                   bytes_per_param: float | None = None) -> Op:
    """One device's optimizer step over `parameters` held in `tensors` tensors."""
    moved = parameters * (step_bytes_per_param(optimizer, precision) if bytes_per_param is None else bytes_per_param)
    launches = 1
    if optimizer.implementation == "unfused":
        launches = max(1, round(tensors)) * UNFUSED_KERNELS_PER_TENSOR[optimizer.type]
    return Op("optimizer.step", optimizer_family(optimizer), parameters * UPDATE_FLOPS_PER_PARAM, moved, "fp32",
              launches=launches)
