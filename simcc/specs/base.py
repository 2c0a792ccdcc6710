"""Shared pydantic base: unknown keys are errors, so a typo never silently falls back to a
default; no float may be infinite or NaN and no integer may exceed what a float holds exactly, so
a value accepted here never overflows or poisons a result later."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# Integers beyond 2**53 are not exact as floats, and every size ends up in float arithmetic.
LARGEST_INTEGER = 2**53

# Sizes no real system has, refused with the limit in the message, so that no input can make a
# run take unbounded time or memory. Each is far above the largest published configuration.
MAX_EXPERTS = 1 << 20  # Shazeer et al. 2017 went to 131,072
# An aux-loss gate is trained over the experts (routing/trained_gate.py): seconds of work up to here.
MAX_TRAINED_GATE_EXPERTS = 512
MAX_SAMPLED_ROUTES = 1 << 27  # logits one routing sample draws (drawn in blocks): seconds of work
MAX_EXPANDED_BLOCKS = 100_000  # blocks after expanding repeats (a 1,000-layer model has ~3,000)
MAX_TREE_BLOCKS = 1 << 20  # blocks of a threshold tree
MAX_FIRING_SAMPLES = 1 << 26  # threshold-tree inputs x leaf blocks drawn to measure firing
MAX_OVERLAP_DEGREE = 64  # expert chunks pipelined (Tutel sweeps up to 8)
MAX_TOKENS = 1 << 24  # a sequence, prompt or generation (16.7M tokens)
MAX_BATCH = 1 << 20  # sequences per step, requests per serving batch
MAX_WIDTH = 1 << 24  # a hidden size, vocabulary or channel count
MAX_PIPELINE_TASKS = 1 << 17  # micro-batches x pipeline chunks simulated per step (about a minute)

# No figure simcc reads is near this (a run's total tokens is ~1e13): products of such figures
# stay finite, so a result is never infinite.
LARGEST_FLOAT = 1e18
# Nor near this, at the other end: a positive figure no smaller keeps every product and quotient of
# a few of them a normal, non-zero float (a subnormal bandwidth would underflow to 0 and divide).
SMALLEST_POSITIVE_FLOAT = 1e-18

PositiveFloat = Annotated[float, Field(ge=SMALLEST_POSITIVE_FLOAT, le=LARGEST_FLOAT)]
NonNegativeFloat = Annotated[float, Field(ge=0, le=LARGEST_FLOAT)]
PositiveInt = Annotated[int, Field(gt=0, le=LARGEST_INTEGER)]
NonNegativeInt = Annotated[int, Field(ge=0, le=LARGEST_INTEGER)]
Fraction = Annotated[float, Field(ge=SMALLEST_POSITIVE_FLOAT, le=1)]


def int_up_to(limit: int) -> Any:
    """A positive integer type with its own ceiling. (A ceiling given as Field(le=...) on a
    PositiveInt field would lose to PositiveInt's own 2**53.)"""
    return Annotated[int, Field(gt=0, le=limit)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
