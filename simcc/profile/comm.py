"""Time collectives over torch.distributed: NCCL across GPUs, gloo across local CPU processes.

Under torchrun (RANK and WORLD_SIZE set) every launched process joins; otherwise simcc starts
`ranks` local processes itself. Sizes follow nccl-tests: `bytes` is the per-rank buffer. Each
repetition's time is the slowest rank's (an all-reduce of the durations with MAX).
"""

from __future__ import annotations

import os
import socket
import statistics
import time

from simcc.specs.vocab import COLLECTIVES as COMM_COLLECTIVES

COMM_COLUMNS = ("collective", "bytes", "ranks", "ranks_per_node", "median_s", "p10_s", "p90_s", "repeats",
                "backend", "device_type", "device_name", "torch_version")
BUDGET_S = 0.3  # timed seconds per size, split into repetitions


def message_sizes(quick: bool) -> list[int]:
    """Every 4x from 4 KB: 4 KB .. 4 MB quick, .. 256 MB full."""
    top = 4 << 20 if quick else 256 << 20
    sizes, size = [], 4 << 10
    while size <= top:
        sizes.append(size)
        size *= 4
    return sizes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _operation(collective: str, numel: int, rank: int, world: int, device: str):
    import torch
    import torch.distributed as dist

    x = torch.ones(numel, device=device)
    if collective == "all_reduce":
        return lambda: dist.all_reduce(x)
    if collective == "all_gather":
        out = torch.empty(numel * world, device=device)
        return lambda: dist.all_gather_into_tensor(out, x)
    if collective == "reduce_scatter":
        out = torch.empty(numel // world, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(out, x)
    if collective == "all_to_all":
        out = torch.empty(numel, device=device)
        return lambda: dist.all_to_all_single(out, x)

    def ping_pong() -> None:  # p2p: rank 0 and 1 bounce the buffer; one way is half the round trip
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
            dist.send(x, 0)
    return ping_pong


def _time_collective(collective: str, size: int, rank: int, world: int, device: str) -> dict:
    """Median and spread of the slowest rank's time (every rank sees the same samples)."""
    import torch
    import torch.distributed as dist

    numel = max(world, size // 4 // world * world)  # fp32 elements, divisible by the ranks
    run = _operation(collective, numel, rank, world, device)
    for _ in range(2):
        run()
    dist.barrier()
    start = time.perf_counter()
    run()
    probe = torch.tensor([time.perf_counter() - start], device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    repeats = max(3, min(200, int(BUDGET_S / max(float(probe), 1e-6))))
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        took = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        samples.append(float(took) / (2 if collective == "p2p" else 1))
    samples.sort()
    return {"collective": collective, "bytes": numel * 4, "ranks": 2 if collective == "p2p" else world,
            "median_s": statistics.median(samples), "p10_s": samples[len(samples) // 10],
            "p90_s": samples[(len(samples) * 9) // 10], "repeats": repeats}


def _measure(rank: int, world: int, backend: str, device: str, quick: bool) -> list[dict]:
    """Every collective and size; a full run makes two passes and keeps the lower median of each,
    as the kernel profiler does, so a burst of other work spoils one pass, not the table."""
    cases = [(c, size) for c in COMM_COLLECTIVES for size in message_sizes(quick)]
    best: dict[tuple[str, int], dict] = {}
    for _ in range(1 if quick else 2):
        for case in cases:
            row = _time_collective(*case, rank, world, device)
            if case not in best or row["median_s"] < best[case]["median_s"]:
                best[case] = row
    return [best[case] for case in cases]


def _worker(rank: int, world: int, port: int, backend: str, device: str, quick: bool, out: str, local: int) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation notices
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    if device == "cuda":
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        rows = _measure(rank, world, backend, device, quick)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        import pandas as pd

        from simcc.profile.kernels import device_description
        from simcc.io import write_atomically

        device_type, name = device_description(device)
        table = pd.DataFrame(rows).assign(ranks_per_node=lambda f: f["ranks"].clip(upper=local), backend=backend,
                                          device_type=device_type, device_name=name, torch_version=torch.__version__)
        write_atomically(out, table[list(COMM_COLUMNS)].to_csv(index=False))


def run_comm_profile(ranks: int, device: str, quick: bool, out: str) -> None:
    """Measure collectives: join a torchrun launch if there is one, else start `ranks` local processes."""
    import torch.multiprocessing as mp

    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        _worker(int(os.environ["RANK"]), world, 0, backend, device, quick, out, local)
        return
    mp.spawn(_worker, args=(ranks, _free_port(), backend, device, quick, out, ranks), nprocs=ranks, join=True)
