"""The layouts a search tries: every combination of parallel degrees and options that the model
and the device count allow, checked by integer arithmetic before anything is costed.

Recomputation is not an axis of its own: it only ever adds work, so of the policies that fit in
memory the lightest is at least as fast (none, then selective, then full). A candidate carries
its ladder of policies and the search keeps the first that fits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Iterator

from simcc.errors import InputError
from simcc.layout import context_parallel_refusal
from simcc.model.graph import units_of
from simcc.specs.blocks import AttentionBlock, BlockSpec, DenseFFNBlock, MLABlock, MoEFFNBlock
from simcc.specs.workload import Workload, sends_overlap

RECOMPUTE_LADDER = ("none", "selective", "full")  # each replays more and keeps less
DISPATCHERS = ("alltoall", "allgather", "deduplicated")
MAX_CANDIDATES = 50_000  # a few minutes on two cores; beyond, narrow an axis with --space or --devices
# Context parallelism by default: degrees up to 8 (Megatron-MoE-ModelZoo's Qwen3 long-context runs
# use CP 2-8 for 32k-128k tokens), tried for sequences of 8K tokens or more, where Megatron-Core's
# parallelism guide places it ("Long sequences (8K+ tokens)", docs.nvidia.com/megatron-core/
# developer-guide, user-guide/parallelism-guide.html); shorter ones keep cp 1 unless --space asks.
CONTEXT_PARALLEL_DEGREES = (1, 2, 4, 8)
CONTEXT_PARALLEL_FROM_TOKENS = 8192


@dataclass(frozen=True)
class SearchSpace:
    """The values each axis may take; None: every value the model and devices allow (powers of two
    up to the limits, see `axis_values`)."""

    tp: tuple[int, ...] | None = None
    cp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    vpp: tuple[int, ...] = (1, 2)
    ep: tuple[int, ...] | None = None
    expert_tp: tuple[int, ...] = (1,)
    micro_batch: tuple[int, ...] = (1, 2, 4)
    recompute: tuple[str, ...] = RECOMPUTE_LADDER
    zero_stage: tuple[int, ...] = (0, 1)
    sequence_parallel: tuple[bool, ...] = (True,)
    dispatcher: tuple[str, ...] | None = None  # None: the workload's own
    overlap_moe_comm: tuple[bool, ...] = (False, True)
    overlap_grad_reduce: tuple[bool, ...] = (True,)
    # None: as the schedule decides (on when interleaved, as Megatron-LM and PyTorch's looped
    # schedules run); true or false: every layout
    overlap_p2p: tuple[bool | None, ...] = (None,)


SPACE_AXES = tuple(f.name for f in fields(SearchSpace))
BOOLEAN_AXES = ("sequence_parallel", "overlap_moe_comm", "overlap_grad_reduce", "overlap_p2p")


def parse_axis(text: str) -> tuple[str, tuple]:
    """`AXIS=V1,V2` from the command line into typed values, one line on a bad one."""
    name, _, values = text.partition("=")
    name = name.strip()
    if name not in SPACE_AXES or not values.strip():
        raise InputError("--space", name or text, f"expected AXIS=V1,V2 with AXIS one of {', '.join(SPACE_AXES)}")
    items = [v.strip() for v in values.split(",")]
    try:
        if name in ("recompute", "dispatcher"):
            allowed = RECOMPUTE_LADDER if name == "recompute" else DISPATCHERS
            bad = [v for v in items if v not in allowed]
            if bad:
                raise ValueError(f"{bad[0]!r} is not one of {', '.join(allowed)}")
            return name, tuple(sorted(set(items), key=allowed.index))
        if name in BOOLEAN_AXES:
            truth = {"true": True, "false": False}
            if any(v.lower() not in truth for v in items):
                raise ValueError("expected true or false")
            return name, tuple(sorted({truth[v.lower()] for v in items}))
        numbers = sorted({int(v) for v in items})
        low = 0 if name == "zero_stage" else 1
        high = 3 if name == "zero_stage" else 1 << 20
        if any(not low <= n <= high for n in numbers):
            raise ValueError(f"expected whole numbers from {low} to {high}")
        return name, tuple(numbers)
    except ValueError as error:
        raise InputError("--space", name, str(error).replace("invalid literal for int() with base 10", "not a whole number")) from None


@dataclass(frozen=True)
class Candidate:
    """One layout on one device count; `recompute` lists the policies to try, lightest first."""

    devices: int
    tp: int
    pp: int
    vpp: int
    ep: int
    expert_tp: int
    micro_batch: int
    zero_stage: int
    sequence_parallel: bool
    dispatcher: str | None
    overlap_moe_comm: bool
    recompute: tuple[str, ...]
    overlap_grad_reduce: bool = True
    overlap_p2p: bool | None = None
    cp: int = 1

    @property
    def schedule(self) -> str:
        return "interleaved" if self.vpp > 1 else "1f1b"

    @property
    def dp(self) -> int:
        return self.devices // (self.tp * self.cp * self.pp)

    def parallelism(self, recompute: str) -> dict:
        """The workload's `parallelism` fields for this layout under one recompute policy. Activation
        offloading is left off: it never makes a step faster, and it rules out pp > 1 and recompute."""
        return {"tp": self.tp, "cp": self.cp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep, "expert_tp": self.expert_tp,
                "micro_batch": self.micro_batch, "zero_stage": self.zero_stage, "recompute": recompute,
                "sequence_parallel": self.sequence_parallel, "overlap_moe_comm": self.overlap_moe_comm,
                "overlap_grad_reduce": self.overlap_grad_reduce, "overlap_p2p": self.overlap_p2p,
                "schedule": self.schedule, "dp": None, "pipeline_layout": None,
                "offload_activation_layers": 0}

    def label(self, recompute: str) -> str:
        parts = [f"{self.devices} dev", f"tp{self.tp}"] + ([f"cp{self.cp}"] if self.cp > 1 else []) + [f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        parts += [f"dp{self.dp}"]
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.expert_tp}"] if self.ep > 1 and self.expert_tp > 1 else []
        parts += [f"mb{self.micro_batch}", f"zero{self.zero_stage}", f"recompute {recompute}"]
        parts += ["no sp"] if self.tp > 1 and not self.sequence_parallel else []
        parts += ["serial grad-reduce"] if not self.overlap_grad_reduce else []
        parts += ["p2p overlap"] if sends_overlap(self.schedule, self.overlap_p2p) and self.pp > 1 else []
        if self.ep > 1:
            parts += [self.dispatcher or "alltoall"] + (["overlap"] if self.overlap_moe_comm else [])
        return " ".join(parts)


def _powers_of_two(limit: int) -> tuple[int, ...]:
    return tuple(1 << i for i in range(int(math.log2(limit)) + 1)) if limit >= 1 else ()


def axis_values(workload: Workload, devices_per_node: int, space: SearchSpace) -> dict[str, tuple]:
    """Each axis's values before device counts are applied: tensor parallelism within a node and
    dividing every head count and width; pipeline depths that are powers of two or divide the
    layers; expert parallelism dividing every MoE layer's experts."""
    units = units_of(workload.model)
    specs = [block.spec for unit in units for block in unit.blocks]
    moe = [s for s in specs if isinstance(s, MoEFFNBlock)]
    widths = [s.heads for s in specs if isinstance(s, (AttentionBlock, MLABlock))]
    widths += [s.hidden for s in specs if isinstance(s, DenseFFNBlock)]
    tp = space.tp or tuple(t for t in _powers_of_two(devices_per_node) if all(w % t == 0 for w in widths))
    layers = len(units)
    pp = space.pp or tuple(p for p in range(1, layers + 1) if p & (p - 1) == 0 or layers % p == 0)
    experts = math.gcd(*[s.experts for s in moe]) if moe else 1
    ep = space.ep or tuple(e for e in _powers_of_two(experts) if experts % e == 0)
    dispatcher = space.dispatcher or ((moe[0].routing.dispatcher,) if moe else (None,))
    return {"tp": tp, "cp": _context_parallel(workload, specs, space), "pp": pp, "ep": ep if moe else (1,), "dispatcher": dispatcher, "moe": bool(moe),
            "overlap_moe_comm": space.overlap_moe_comm if moe else (False,), "layers": layers}


def _context_parallel(workload: Workload, specs: list[BlockSpec], space: SearchSpace) -> tuple[int, ...]:
    """Context-parallel degrees: the space's, else CONTEXT_PARALLEL_DEGREES for a long sequence
    whose every block the KV ring can split; each splitting the sequence into 2 x cp equal chunks."""
    assert workload.train is not None
    seq = workload.train.seq_len
    if space.cp is not None:
        values = space.cp
    elif seq >= CONTEXT_PARALLEL_FROM_TOKENS and not any(context_parallel_refusal(s, 2) for s in specs):
        values = CONTEXT_PARALLEL_DEGREES
    else:
        values = (1,)
    return tuple(c for c in values if seq % (2 * c) == 0 or c == 1)


def candidates(workload: Workload, device_counts: list[int], devices_per_node: int,
               space: SearchSpace) -> Iterator[Candidate]:
    """Every layout whose degrees divide the devices, the batch and the model (the checks
    `simcc.layout` makes, in integers, so that no candidate is built only to be refused)."""
    assert workload.train is not None
    values = axis_values(workload, devices_per_node, space)
    global_batch, layers = workload.train.global_batch, values["layers"]
    ladder = tuple(r for r in RECOMPUTE_LADDER if r in space.recompute)
    for devices in device_counts:
        for tp, cp in itertools.product(values["tp"], values["cp"]):
            if devices % (tp * cp) or tp > devices_per_node:
                continue
            for pp in values["pp"]:
                if devices % (tp * cp * pp) or pp > layers:
                    continue
                dp = devices // (tp * cp * pp)
                for vpp in space.vpp:
                    if vpp > 1 and (pp == 1 or pp * vpp > layers):
                        continue
                    for mb in space.micro_batch:
                        if global_batch % (mb * dp):
                            continue
                        microbatches = global_batch // (mb * dp)
                        if vpp > 1 and microbatches % pp:
                            continue
                        yield from _expert_choices(devices, tp, cp, pp, vpp, mb, dp, values, space, ladder)


def _expert_choices(devices: int, tp: int, cp: int, pp: int, vpp: int, mb: int, dp: int, values: dict,
                    space: SearchSpace, ladder: tuple[str, ...]) -> Iterator[Candidate]:
    for ep in values["ep"]:
        for etp in (space.expert_tp if ep > 1 else (1,)):
            if (dp * cp * tp) % (ep * etp):  # the experts' domain is the attention's dp x cp x tp
                continue
            # An option that cannot act keeps its first value: ZeRO and gradient-reduction overlap
            # need data-parallel replicas (with context parallelism, dp x cp ranks share the dense
            # weights), sequence parallelism tensor parallelism, dispatchers and their overlap
            # expert parallelism, and send overlap a pipeline.
            sharded = dp * cp > 1 or (values["moe"] and (dp * cp * tp) // (ep * etp) > 1)
            options = itertools.product(space.zero_stage if sharded else space.zero_stage[:1],
                                        space.sequence_parallel if tp > 1 else (False,),
                                        values["dispatcher"] if ep > 1 else values["dispatcher"][:1],
                                        values["overlap_moe_comm"] if ep > 1 else (False,),
                                        space.overlap_grad_reduce if sharded else space.overlap_grad_reduce[:1],
                                        space.overlap_p2p if pp > 1 else space.overlap_p2p[:1])
            for zero, sp, dispatcher, overlap, reduce, p2p in options:
                yield Candidate(devices, tp, pp, vpp, ep, etp, mb, zero, sp, dispatcher, overlap, ladder, reduce, p2p, cp)


def device_counts(text: str | None, devices_per_node: int, profile_devices: int, whole_nodes_only: bool) -> list[int]:
    """`N`, or `A..B`: A, 2A, 4A, ... up to B, and B itself; whole nodes of the profile (a single
    node's profile can only be searched at its own device count). None: the profile's own."""
    if text is None:
        return [profile_devices]
    low_text, dots, high_text = text.partition("..")
    try:
        low = int(low_text)
        high = int(high_text) if dots else low
    except ValueError:
        raise InputError("--devices", text, "expected a device count N or a range A..B of whole numbers") from None
    if not 1 <= low <= high <= 1 << 24:
        raise InputError("--devices", text, f"expected 1 <= A <= B <= {1 << 24:,}")
    counts = []
    count = low
    while count <= high:
        counts.append(count)
        count *= 2
    if counts[-1] != high:
        counts.append(high)
    for count in counts:
        if count % devices_per_node:
            raise InputError("--devices", text, f"{count} is not a whole number of {devices_per_node}-device nodes")
        if whole_nodes_only and count != profile_devices:
            raise InputError("--devices", text, f"the profile is one node of {profile_devices} devices; "
                             "search more devices with a cluster profile")
    return counts
