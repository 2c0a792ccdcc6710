"""Fine-grained activation recomputation: which ops of a block a module replays before the
backward pass, and how many saved bytes that frees (Megatron-Core's `--recompute-modules`;
Shazeer et al. 2017 recompute their experts' hidden activations in the backward pass to fit
MoE-143M's activations on 12 GB K40s).

A module frees what an op keeps for the backward pass when the module's ops can produce it again
from activations that stay saved. Each entry reads a block's forward ops by name and returns
(ops to replay, bytes freed). Ops a block does not have contribute nothing.
"""

from __future__ import annotations

from typing import Callable

from simcc.model.ops import Op, WorkItem

RecomputeModule = Callable[[list[WorkItem]], tuple[list[WorkItem], float]]

NORMS = ("attn.norm", "mla.norm", "ffn.norm", "moe.norm")


def _ops(items: list[WorkItem], names: tuple[str, ...]) -> list[Op]:
    return [item for item in items if isinstance(item, Op) and item.name in names]


def _saved(items: list[WorkItem], names: tuple[str, ...]) -> float:
    return sum(op.saved_bytes for op in _ops(items, names))


def _moe_act(items: list[WorkItem]) -> tuple[list[WorkItem], float]:
    """The experts' activation function: the down projection's input is not kept."""
    return list(_ops(items, ("moe.expert_act",))), _saved(items, ("moe.expert_down",))


def _expert_hidden(items: list[WorkItem]) -> tuple[list[WorkItem], float]:
    """The experts' hidden layer (up projection and activation), Shazeer et al.'s saving: only the
    dispatched tokens stay, the up projection's output and the activation's output go."""
    return list(_ops(items, ("moe.expert_up", "moe.expert_act"))), _saved(items, ("moe.expert_act", "moe.expert_down"))


def _layernorm(items: list[WorkItem]) -> tuple[list[WorkItem], float]:
    """The norms before attention and the MLP: their outputs (the next GEMM's inputs) are not kept;
    a norm's output is as large as its input, half of what it moves."""
    norms = _ops(items, NORMS)
    return list(norms), sum(op.bytes / 2 for op in norms)


def _whole_block(prefix: str) -> RecomputeModule:
    def module(items: list[WorkItem]) -> tuple[list[WorkItem], float]:
        """The whole block from its input: everything it keeps but the norm's saved input."""
        if not any(item.name.startswith(prefix) for item in items):
            return [], 0.0
        ops = [item for item in items if not (isinstance(item, Op) and item.name in NORMS)]
        return list(items), sum(op.saved_bytes for op in ops if isinstance(op, Op))
    return module


def _mla_up_proj(items: list[WorkItem]) -> tuple[list[WorkItem], float]:
    """MLA's query and key-value up-projections: the per-head queries, keys and values the core
    keeps are rebuilt from the saved latents."""
    up = _ops(items, ("mla.q_up", "mla.kv_up"))
    return list(up), sum(op.saved_bytes for op in up)


RECOMPUTE_MODULES: dict[str, RecomputeModule] = {
    "moe_act": _moe_act,
    "expert_hidden": _expert_hidden,
    "layernorm": _layernorm,
    "mlp": _whole_block("ffn."),
    "moe": _whole_block("moe."),
    "mla_up_proj": _mla_up_proj,
}
WHOLE_BLOCK = ("mlp", "moe")  # replay a whole block: the finer modules add nothing to it
SUBSUMES = {"expert_hidden": ("moe_act",)}


def recomputed(items: list[WorkItem], modules: tuple[str, ...]) -> tuple[list[WorkItem], float]:
    """The ops of one block the chosen modules replay, and the saved bytes they free, each op and
    each byte once (a whole-block module takes the block alone; expert_hidden covers moe_act)."""
    for name in modules:
        if name in WHOLE_BLOCK:
            replay, freed = RECOMPUTE_MODULES[name](items)
            if replay:
                return replay, freed
    covered = {inner for name in modules for inner in SUBSUMES.get(name, ())}
    replay: list[WorkItem] = []
    freed = 0.0
    for name in modules:
        if name in WHOLE_BLOCK or name in covered:
            continue
        ops, module_freed = RECOMPUTE_MODULES[name](items)
        replay += [op for op in ops if all(op is not other for other in replay)]
        freed += module_freed
    order = {id(item): index for index, item in enumerate(items)}
    return sorted(replay, key=lambda item: order[id(item)]), freed
