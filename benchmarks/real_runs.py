"""Real torch runs that a calibrated CPU profile will be asked to predict.

`simcc profile` times kernels and one MoE layer at fixed shapes, and calibration fits to them; a
prediction is only worth trusting if it also holds at shapes the fit never saw. This script times,
on this machine's CPU:

1. a whole top-k MoE layer as simcc models it (simcc/model/kinds/moe_ffn.py): norm, router
   d x E, softmax + top-k, permute (index_select), per-expert up projection (gated optional),
   activation, down projection, un-permute weighted by the gates (index_add), residual; forward
   alone and forward + backward, at held-out shapes;
2. a real training step of a small attention + MoE model with expert parallelism 2: two processes
   over gloo, tokens dispatched and combined with all_to_all_single, dense gradients all-reduced,
   Adam; the whole step and its forward / backward / all-reduce / optimizer phases.

Held-out shapes: the profiler times hidden 1024 (quick 256) with ffn 2816 (quick 512), token
counts that are powers of two, 8 experts in its grouped GEMMs, 64 in its gate, k = 2, attention
with 4 heads of 64 at sequence 256/1024/2048 (quick 128/256), and its own MoE layer at
2048 x 768, ffn 2048, E 8, k 2 (quick 512 x 192, ffn 384, E 4). Every shape below avoids those
widths, token counts, expert counts and head sizes, and varies k from 1 to 4.

Each CSV row carries every setting needed to write the matching simcc workload. It measures
only: no simcc import.

Usage: .venv/bin/python benchmarks/real_runs.py --out runs.csv [--quick] [--threads N] [--repeats N] [--rounds N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

COLUMNS = (
    "run_id", "kind",
    # configuration: enough to build the simcc workload for the row
    "batch", "seq", "tokens", "hidden", "heads", "head_dim", "causal", "layers", "experts", "k",
    "expert_hidden", "gated", "activation", "norm", "dtype", "router_dtype", "optimizer", "threads",
    "processes", "ep",
    # measurement
    "measured_median_s", "p10_s", "p90_s", "repeats", "warmup", "load_before", "load_after",
    "forward_s", "backward_s", "allreduce_s", "optimizer_s", "other_rank_median_s", "load_ratio",
    "torch_version", "cpu",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer: `tokens` rows of width `hidden`, routed to k of `experts` FFNs."""

    tokens: int
    hidden: int
    experts: int
    k: int
    expert_hidden: int
    gated: bool
    activation: str  # relu | gelu | silu when not gated; swiglu when gated


@dataclass(frozen=True)
class TrainShape:
    """A small model of `layers` x (causal attention + MoE layer), its batch per process."""

    batch: int
    seq: int
    hidden: int
    heads: int
    layers: int
    experts: int  # split half per rank
    k: int
    expert_hidden: int
    gated: bool
    activation: str


LAYER_SHAPES = (
    LayerShape(384, 640, 4, 1, 1792, False, "relu"),
    LayerShape(1536, 384, 16, 4, 640, True, "swiglu"),
    LayerShape(3072, 896, 6, 2, 2304, False, "gelu"),
    LayerShape(768, 1536, 12, 3, 1152, True, "swiglu"),
    LayerShape(2560, 1280, 10, 2, 1920, False, "gelu"),
    LayerShape(3584, 512, 16, 1, 1408, False, "silu"),
)
LAYER_SHAPES_QUICK = (
    LayerShape(96, 80, 4, 1, 112, False, "relu"),
    LayerShape(160, 48, 6, 3, 96, True, "swiglu"),
    LayerShape(224, 112, 10, 2, 176, False, "gelu"),
)
TRAIN_SHAPES = (
    TrainShape(2, 192, 384, 4, 2, 4, 2, 768, False, "gelu"),  # head_dim 96
    TrainShape(1, 768, 640, 5, 2, 6, 1, 1280, True, "swiglu"),  # head_dim 128
)
TRAIN_SHAPES_QUICK = (
    TrainShape(1, 48, 96, 2, 1, 4, 2, 128, False, "gelu"),
    TrainShape(2, 40, 80, 2, 2, 6, 1, 96, True, "swiglu"),
)


# ----------------------------------------------------------------------------- timing helpers

def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile (nearest rank), as `simcc profile` reports them."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return statistics.median(ordered), pick(0.1), pick(0.9)


def time_runs(run: Callable[[], object], warmup: int, repeats: int,
              before_each: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each timed call after `warmup` untimed ones; `before_each` runs outside the clock."""
    for _ in range(warmup):
        if before_each:
            before_each()
        run()
    samples = []
    for _ in range(repeats):
        if before_each:
            before_each()
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return samples


def load_average() -> float:
    """The 1-minute load average: a run next to other busy processes is not a clean measurement."""
    return round(os.getloadavg()[0], 2)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- the MoE layer

class Experts(nn.Module):
    """`count` FFNs, each run on its contiguous slice of the expert-sorted rows (simcc's grouped
    GEMM: one up and one down GEMM per expert at that expert's load)."""

    def __init__(self, count: int, hidden: int, expert_hidden: int, gated: bool, activation: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        width = 2 * expert_hidden if gated else expert_hidden  # a gated FFN projects twice
        self.up = nn.ModuleList(nn.Linear(hidden, width, bias=False, dtype=dtype) for _ in range(count))
        self.down = nn.ModuleList(nn.Linear(expert_hidden, hidden, bias=False, dtype=dtype) for _ in range(count))
        self.gated, self.activation = gated, activation

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU: silu(a) * b
            a, b = h.chunk(2, dim=-1)
            return F.silu(a) * b
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.activation](h)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs, start = [], 0
        for up, down, n in zip(self.up, self.down, counts):
            outputs.append(down(self.act(up(rows[start:start + n]))))
            start += n
        return torch.cat(outputs)


@dataclass
class Routing:
    """Where each token copy goes: `token_of` maps expert-sorted rows back to tokens."""

    token_of: torch.Tensor
    weight: torch.Tensor  # gate weight of each expert-sorted row
    counts: list[int]  # rows per expert


def route(h: torch.Tensor, router: nn.Linear, k: int) -> Routing:
    """Router GEMM in fp32 (simcc's router_dtype), softmax, top-k, then sort the k copies of each
    token by expert so each expert's rows are contiguous."""
    probs = torch.softmax(router(h.float()), dim=-1)
    weight, chosen = torch.topk(probs, k, dim=-1)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=router.out_features).tolist()
    return Routing(order // k, weight.reshape(-1)[order].to(h.dtype), counts)


class MoELayer(nn.Module):
    """Pre-norm top-k MoE layer on one process: the op sequence of simcc's moe_ffn block."""

    def __init__(self, shape: LayerShape, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(shape.hidden, dtype=dtype)
        self.router = nn.Linear(shape.hidden, shape.experts, bias=False, dtype=torch.float32)
        self.experts = Experts(shape.experts, shape.hidden, shape.expert_hidden, shape.gated, shape.activation, dtype)
        self.k = shape.k
        self.last_counts: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        r = route(h, self.router, self.k)
        self.last_counts = r.counts
        rows = h.index_select(0, r.token_of)  # permute
        out = self.experts(rows, r.counts) * r.weight[:, None]
        return x + torch.zeros_like(x).index_add(0, r.token_of, out)  # un-permute, weighted; residual


# `simcc profile`'s own gemm_1024x1024x2816 (F.linear, 2 x 1024 x 1024 x 2816 FLOPs): timed in every
# round, it tells how fast the host runs now against when it was profiled (a shared machine drifts).
REFERENCE_GEMM = (1024, 1024, 2816)


def measure_reference(dtype: str, threads: int, warmup: int, repeats: int) -> dict:
    """The profiler's reference GEMM, timed as the profiler times it."""
    tokens, hidden, width = REFERENCE_GEMM
    dt = DTYPES[dtype]
    x, w = torch.randn(tokens, hidden, dtype=dt), torch.randn(width, hidden, dtype=dt)
    load_before = load_average()
    with torch.no_grad():
        median, p10, p90 = percentiles(time_runs(lambda: F.linear(x, w), warmup, repeats))
    return dict(run_id=f"reference_gemm_{tokens}x{hidden}x{width}_{dtype}", kind="reference_gemm", tokens=tokens,
                hidden=hidden, expert_hidden=width, dtype=dtype, threads=threads, processes=1, measured_median_s=median,
                p10_s=p10, p90_s=p90, repeats=repeats, warmup=warmup, load_before=load_before, load_after=load_average())


def measure_layer(shape: LayerShape, dtype: str, threads: int, warmup: int, repeats: int) -> list[dict]:
    """Forward (no_grad) and forward + backward (loss = output.sum()) of one layer."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    layer = MoELayer(shape, dt)
    x = torch.randn(shape.tokens, shape.hidden, dtype=dt)
    with torch.no_grad():
        layer(x)
    busiest = max(layer.last_counts) / (shape.tokens * shape.k / shape.experts)
    x_grad = x.clone().requires_grad_(True)  # the input's gradient too: a layer inside a model

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer(x_grad).sum().backward()

    def clear_grads() -> None:
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None

    config = dict(tokens=shape.tokens, hidden=shape.hidden, layers=1, experts=shape.experts, k=shape.k,
                  expert_hidden=shape.expert_hidden, gated=shape.gated, activation=shape.activation, norm="rmsnorm",
                  dtype=dtype, router_dtype="fp32", threads=threads, processes=1, ep=1, load_ratio=round(busiest, 4))
    name = (f"T{shape.tokens}_d{shape.hidden}_E{shape.experts}_k{shape.k}_f{shape.expert_hidden}"
            f"{'_gated' if shape.gated else ''}")
    rows = []
    cases = (("moe_layer_forward", forward, None), ("moe_layer_fwd_bwd", forward_backward, clear_grads))
    for kind, run, before in cases:
        load_before = load_average()
        samples = time_runs(run, warmup, repeats, before)
        median, p10, p90 = percentiles(samples)
        rows.append(dict(config, run_id=f"{kind}_{name}_{dtype}", kind=kind, measured_median_s=median, p10_s=p10,
                         p90_s=p90, repeats=repeats, warmup=warmup, load_before=load_before,
                         load_after=load_average()))
    return rows


# ----------------------------------------------------------------------------- the EP=2 train step

class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:  # type: ignore
        ctx.out_splits, ctx.in_splits = out_splits, in_splits
        out = x.new_empty(sum(out_splits), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        back = grad.new_empty(sum(ctx.in_splits), grad.shape[1])
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits)
        return back, None, None


class EPMoELayer(nn.Module):
    """MoE layer whose experts are split evenly over the ranks: permute locally, dispatch with
    all-to-all, group received rows by local expert, run them, ungroup, combine back, un-permute."""

    def __init__(self, shape: TrainShape, dtype: torch.dtype, rank: int, world: int) -> None:
        super().__init__()
        self.local = shape.experts // world
        self.rank, self.world, self.k, self.experts_total = rank, world, shape.k, shape.experts
        self.norm = nn.RMSNorm(shape.hidden, dtype=dtype)
        self.router = nn.Linear(shape.hidden, shape.experts, bias=False, dtype=torch.float32)
        self.experts = Experts(self.local, shape.hidden, shape.expert_hidden, shape.gated, shape.activation, dtype)
        self.received_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        r = route(h, self.router, self.k)
        rows = h.index_select(0, r.token_of)  # permute: sorted by expert, so by owning rank too
        counts = torch.tensor(r.counts, dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)  # rank j gets every sender's counts for its experts
        send = counts.view(self.world, self.local).sum(1).tolist()
        from_each = recv_counts.view(self.world, self.local)  # [sender, local expert]
        recv = from_each.sum(1).tolist()
        received = AllToAll.apply(rows, recv, send)  # dispatch
        self.received_rows = sum(recv)
        # Received rows come sender by sender; group them by local expert for the expert GEMMs.
        local_ids = torch.repeat_interleave(torch.arange(self.local).repeat(self.world), from_each.reshape(-1))
        group = torch.argsort(local_ids, stable=True)
        out = self.experts(received.index_select(0, group), from_each.sum(0).tolist())
        out = out.index_select(0, torch.argsort(group))  # back to sender order
        back = AllToAll.apply(out, send, recv)  # combine
        return x + torch.zeros_like(x).index_add(0, r.token_of, back * r.weight[:, None])


class Attention(nn.Module):
    """Pre-norm causal self-attention: fused QKV, scaled_dot_product_attention, output projection."""

    def __init__(self, hidden: int, heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(hidden, dtype=dtype)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, dtype=dtype)
        self.out = nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, seq, hidden))


class EPModel(nn.Module):
    """`layers` x (attention, EP MoE layer) on hidden states; no embedding or LM head."""

    def __init__(self, shape: TrainShape, dtype: torch.dtype, rank: int, world: int) -> None:
        super().__init__()
        self.attention = nn.ModuleList(Attention(shape.hidden, shape.heads, dtype) for _ in range(shape.layers))
        self.moe = nn.ModuleList(EPMoELayer(shape, dtype, rank, world) for _ in range(shape.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        for attention, moe in zip(self.attention, self.moe):
            x = moe(attention(x).reshape(batch * seq, hidden)).view(batch, seq, hidden)
        return x


def _train_worker(rank: int, world: int, port: int, shape_dict: dict, dtype: str, warmup: int, repeats: int,
                  result_path: str) -> None:
    """One rank: build the model (dense weights equal on every rank, experts each rank's own),
    then time warm-up + `repeats` steps; rank 0 writes the medians to `result_path`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        shape = TrainShape(**shape_dict)
        dt = DTYPES[dtype]
        torch.manual_seed(0)
        model = EPModel(shape, dt, rank, world)
        torch.manual_seed(1 + rank)  # own experts and own data per rank
        experts = [p for m in model.moe for p in m.experts.parameters()]
        with torch.no_grad():
            for p in experts:
                p.copy_(torch.randn_like(p) * p.std())
        expert_ids = {id(p) for p in experts}
        dense = [p for p in model.parameters() if id(p) not in expert_ids]
        buckets = [[p for p in dense if p.dtype == d] for d in sorted({p.dtype for p in dense}, key=str)]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(shape.batch, shape.seq, shape.hidden, dtype=dt)

        phases: list[tuple[float, float, float, float]] = []
        loads: list[float] = []
        for step in range(warmup + repeats):
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()  # start every step together
            t0 = time.perf_counter()
            loss = model(x).float().sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            for bucket in buckets:  # one flat buffer per dtype, as DDP's buckets would be
                grads = [p.grad for p in bucket]
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat)
                flat /= world
                for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(reduced)
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            if step >= warmup:
                phases.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
                share = shape.batch * shape.seq * shape.k  # even share of rows per rank
                loads.extend(m.received_rows / share for m in model.moe)
        steps = [sum(p) for p in phases]
        medians = [None, None]
        dist.all_gather_object(medians, statistics.median(steps))
        if rank == 0:
            median, p10, p90 = percentiles(steps)
            result = dict(measured_median_s=median, p10_s=p10, p90_s=p90, other_rank_median_s=medians[1],
                          forward_s=statistics.median(p[0] for p in phases),
                          backward_s=statistics.median(p[1] for p in phases),
                          allreduce_s=statistics.median(p[2] for p in phases),
                          optimizer_s=statistics.median(p[3] for p in phases),
                          load_ratio=round(statistics.mean(loads), 4))
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_train(shape: TrainShape, dtype: str, warmup: int, repeats: int) -> dict:
    """Spawn two ranks (EP = DP = 2, one thread each) and return rank 0's step and phase medians."""
    world = 2
    if shape.experts % world:
        raise ValueError(f"experts ({shape.experts}) must split evenly over {world} ranks")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.json")
        load_before = load_average()
        mp.spawn(_train_worker, args=(world, free_port(), asdict(shape), dtype, warmup, repeats, result_path),
                 nprocs=world, join=True)
        load_after = load_average()
        result = json.loads(Path(result_path).read_text())
    name = (f"b{shape.batch}x{shape.seq}_d{shape.hidden}_h{shape.heads}_L{shape.layers}_E{shape.experts}_k{shape.k}"
            f"_f{shape.expert_hidden}{'_gated' if shape.gated else ''}")
    return dict(result, run_id=f"ep2_train_step_{name}_{dtype}", kind="ep2_train_step", batch=shape.batch,
                seq=shape.seq, tokens=shape.batch * shape.seq, hidden=shape.hidden, heads=shape.heads,
                head_dim=shape.hidden // shape.heads, causal=True, layers=shape.layers, experts=shape.experts,
                k=shape.k, expert_hidden=shape.expert_hidden, gated=shape.gated, activation=shape.activation,
                norm="rmsnorm", dtype=dtype, router_dtype="fp32", optimizer="adam", threads=1, processes=world,
                ep=world, repeats=repeats, warmup=warmup, load_before=load_before, load_after=load_after)


# ----------------------------------------------------------------------------- output and CLI

def pooled(per_round: list[dict]) -> dict:
    """One case's rounds as one row: the median of each median, the widest percentiles, the
    repeats summed, the largest load seen."""
    row = dict(per_round[0])
    for column in ("measured_median_s", "forward_s", "backward_s", "allreduce_s", "optimizer_s", "other_rank_median_s"):
        if row.get(column) is not None:
            row[column] = statistics.median(r[column] for r in per_round)
    row.update(p10_s=min(r["p10_s"] for r in per_round), p90_s=max(r["p90_s"] for r in per_round),
               repeats=sum(r["repeats"] for r in per_round), load_before=max(r["load_before"] for r in per_round),
               load_after=max(r["load_after"] for r in per_round))
    return row


def write_csv(rows: list[dict], out: Path) -> None:
    """Write next to `out`, then rename over it: a reader never sees half a table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="raise", restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the layer runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; quick 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--only", choices=("layer", "train"), default=None, help="run one part only")
    parser.add_argument("--rounds", type=int, default=3, help="times every case is measured, round-robin (default 3)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    torch.set_num_threads(args.threads)
    cores, load = os.cpu_count() or 1, load_average()
    if load + args.threads > cores:  # oversubscribed OpenMP threads can inflate small ops many times over
        print(f"warning: load average {load} + {args.threads} threads exceeds {cores} cores; "
              "timings will include waiting for other processes", file=sys.stderr)
    common = dict(torch_version=torch.__version__, cpu=cpu_name())
    rows: list[dict] = []
    # Every case is measured once per round, round after round, and its rounds' medians are pooled:
    # a shared host whose speed drifts over minutes then shifts every case alike, instead of
    # landing on whichever cases ran during a slow spell.
    rounds: list[list[dict]] = []
    for _ in range(args.rounds):
        measured: list[dict] = [measure_reference(args.dtype, args.threads, warmup, repeats)]
        if args.only != "train":
            for shape in LAYER_SHAPES_QUICK if args.quick else LAYER_SHAPES:
                measured += measure_layer(shape, args.dtype, args.threads, warmup, repeats)
        if args.only != "layer":
            for shape in TRAIN_SHAPES_QUICK if args.quick else TRAIN_SHAPES:
                measured.append(measure_train(shape, args.dtype, warmup, repeats))
        rounds.append(measured)
    for per_round in zip(*rounds):
        row = dict(pooled(list(per_round)), **common)
        rows.append(row)
        phases = (f"fwd {row['forward_s'] * 1e3:.2f}  bwd {row['backward_s'] * 1e3:.2f}  allreduce "
                  f"{row['allreduce_s'] * 1e3:.2f}  adam {row['optimizer_s'] * 1e3:.2f}" if row["kind"] == "ep2_train_step"
                  else f"p10 {row['p10_s'] * 1e3:.2f}  p90 {row['p90_s'] * 1e3:.2f}  load {row['load_before']}")
        print(f"{row['run_id']:<60} {row['measured_median_s'] * 1e3:9.2f} ms  {phases}", flush=True)
    write_csv(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
