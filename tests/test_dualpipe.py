"""DualPipe and DualPipeV (DeepSeek-V3 report sec. 3.2.1, Table 2; deepseek-ai/DualPipe): the
per-rank order, the bubble it leaves on a uniform pipeline, the chunk placement's parameters, the
activation peak, the input-/weight-gradient split, and hostile inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simcc.costs.memory import dual_in_flight, in_flight_microbatches
from simcc.layout import build_layout
from simcc.model.graph import model_params
from simcc.plan.training import (ChunkPlan, Cost, StagePlan, TrainingPlan, build_training_plan, chunk_placement,
                                 split_backward, stage_params)
from simcc.sim.timeline import Timeline
from simcc.sim.training import _simulate, dual_items, simulate_training, task_order
from simcc.specs.loader import load_hardware, load_workload

DUAL = [("dualpipe", 2), ("dualpipe", 4), ("dualpipe", 8), ("dualpipev", 1), ("dualpipev", 2), ("dualpipev", 4)]


def _stages(schedule: str, p: int) -> int:
    """Table 2's PP: pipeline stages along a micro-batch's path (DualPipeV: two per rank)."""
    return p if schedule == "dualpipe" else 2 * p


def _toy(schedule: str, p: int, m: int, forward: float = 1.0, dgrad: float = 1.0, wgrad: float = 1.0,
         overlap: bool = False) -> TrainingPlan:
    """Every chunk alike, no communication: F = forward, B = dgrad + wgrad, W = wgrad."""
    chunk = ChunkPlan([], forward=[Cost("f", "compute", forward)],
                      backward=[Cost("b", "compute", dgrad + wgrad, wgrad=wgrad)])
    stage = StagePlan([chunk, chunk], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
    vpp = 1 if schedule == "dualpipe" else 2
    return TrainingPlan([stage] * p, m, p, vpp, schedule, True, True, overlap)


def _play(schedule: str, p: int, m: int) -> list[list[tuple[str, int, int]]]:
    """Run every rank's order as far as its dependencies allow, round after round (a pair starts
    once both its inputs are in); returns the completed tasks per rank. A stuck rank is a deadlock."""
    placement = chunk_placement(schedule, p, 2 if schedule == "dualpipev" else 1)
    ends = {d: max(pos for places in placement for dd, pos in places if dd == d) for places in placement for d, _ in places}
    items = [dual_items(schedule, p, m, r) for r in range(p)]
    done_f: set[tuple[int, int]] = set()  # (micro-batch, position)
    done_b: set[tuple[int, int]] = set()
    done_i: set[tuple[int, int, int]] = set()  # (rank, micro-batch, chunk) input-gradient parts
    ran: list[list[tuple[str, int, int]]] = [[] for _ in range(p)]
    cursor = [0] * p

    def ready(rank: int, task: tuple[str, int, int]) -> bool:
        kind, mb, chunk = task
        direction, position = placement[rank][chunk]
        if kind == "F":
            return position == 0 or (mb, position - 1) in done_f
        if kind in "BI":
            return (mb, position) in done_f and (position == ends[direction] or (mb, position + 1) in done_b)
        return (rank, mb, chunk) in done_i  # W after its own input-gradient part

    progress = True
    while progress:
        progress = False
        for rank in range(p):
            while cursor[rank] < len(items[rank]) and all(ready(rank, t) for t in items[rank][cursor[rank]]):
                for kind, mb, chunk in items[rank][cursor[rank]]:
                    position = placement[rank][chunk][1]
                    if kind == "F":
                        done_f.add((mb, position))
                    elif kind in "BI":
                        done_b.add((mb, position))
                        done_i.add((rank, mb, chunk))
                    ran[rank].append((kind, mb, chunk))
                cursor[rank] += 1
                progress = True
    assert cursor == [len(i) for i in items], "deadlock: a rank waits on a task no rank can run"
    return ran


@pytest.mark.parametrize("schedule,p", DUAL)
@pytest.mark.parametrize("extra", [0, 2, 6])
def test_every_task_runs_once_in_dependency_order(schedule, p, extra):
    m = 2 * p + extra
    ran = _play(schedule, p, m)
    placement = chunk_placement(schedule, p, 2 if schedule == "dualpipev" else 1)
    for rank, tasks in enumerate(ran):
        # DualPipe: direction d's micro-batches are d*m/2 .. on its chunk d; DualPipeV: all m through both chunks.
        expected = ([(mb, 0) for mb in range(m // 2)] + [(mb, 1) for mb in range(m // 2, m)]
                    if schedule == "dualpipe" else [(mb, c) for mb in range(m) for c in (0, 1)])
        forwards = sorted((mb, c) for k, mb, c in tasks if k == "F")
        full = [(mb, c) for k, mb, c in tasks if k == "B"]
        inputs = [(mb, c) for k, mb, c in tasks if k == "I"]
        weights = [(mb, c) for k, mb, c in tasks if k == "W"]
        assert forwards == sorted(expected)
        assert sorted(full + inputs) == sorted(expected)  # one backward each, whole or split
        assert sorted(inputs) == sorted(weights)  # every split backward's W runs, after its I (_play)
        assert len(placement[rank]) == 2
    for rank in range(p):  # a merged pair: a forward and another micro-batch's backward
        for item in dual_items(schedule, p, m, rank):
            if len(item) == 2:
                (fk, fmb, _), (bk, bmb, _) = item
                assert (fk, bk) == ("F", "B") and fmb != bmb
    assert task_order(schedule, p, 1, m, 0) == [t for item in dual_items(schedule, p, m, 0) for t in item]


@pytest.mark.parametrize("schedule,p", [("dualpipe", 4), ("dualpipe", 8), ("dualpipe", 16),
                                        ("dualpipev", 2), ("dualpipev", 4), ("dualpipev", 8)])
@pytest.mark.parametrize("times", [2, 3, 8])  # m = 2p, 3p, 8p micro-batches; 8p is extrapolated
def test_uniform_bubble_is_table_2s(schedule, p, times):
    """F = 1, each GEMM's backward a data-gradient and a weight-gradient kernel of the forward's
    size (model/ops.py), so B = 2, W = 1; nothing to overlap, so F&B = F + B = 3. Table 2:
    bubble (PP/2 - 1)(F&B + B - 3W) = (PP/2 - 1)(3 + 2 - 3) = PP - 2 per rank.
    By hand for DualPipe PP = 4, m = 8, rank 0 (F0 F0 F0 F1 I1 W1 F1 | F0&B1 F1&B0 B1 F1&B0 B1 |
    I0 W0 I0 W0): busy from 0 to 10, then waits 1 for micro-batch 0's gradient from rank 1
    (whose B0 ends at 11), runs F1&B0 and B1 to 16, waits 1 for micro-batch 1's, then runs to
    26: 24 of compute (8 x (1 + 2)) and a bubble of 2 = PP - 2."""
    m = times * p
    stages = _stages(schedule, p)
    step = simulate_training(_toy(schedule, p, m), 1).steps[0]
    chunks_per_microbatch = 1 if schedule == "dualpipe" else 2  # a DualPipeV micro-batch passes both of a rank's chunks
    assert step.seconds == pytest.approx(3.0 * m * chunks_per_microbatch + (stages / 2 - 1) * (3 + 2 - 3))
    for account in step.stages:  # every rank, not only the critical one, idles PP - 2
        assert step.seconds - account.busy == pytest.approx(stages - 2)


@pytest.mark.parametrize("p", [4, 8, 16])
def test_dualpipe_beats_1f1b_at_the_same_pipeline(p):
    """1F1B's bubble is (p - 1)(F + B) = 3(p - 1); DualPipe's p - 2 (above)."""
    m = 4 * p
    one_f_one_b = ChunkPlan([], forward=[Cost("f", "compute", 1.0)], backward=[Cost("b", "compute", 2.0, wgrad=1.0)])
    stage = StagePlan([one_f_one_b], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
    plain = simulate_training(TrainingPlan([stage] * p, m, p, 1, "1f1b", True, True), 1).steps[0]
    dual = simulate_training(_toy("dualpipe", p, m), 1).steps[0]
    assert plain.bubble == pytest.approx(3.0 * (p - 1))
    assert dual.bubble == pytest.approx(p - 2.0) and dual.bubble < plain.bubble / 3


def test_pairs_hide_each_others_all_to_alls():
    """With EP-communication overlap a DualPipe pair's all-to-alls hide behind the other half's
    compute (the merged-pair mechanism 1F1B uses), so the step shrinks; never below the compute."""
    def moe(overlap: bool) -> TrainingPlan:
        costs = lambda s: [Cost("c1", "compute", s), Cost("a2a", "comm", 0.4 * s, group="ep", link="intra"),  # noqa: E731
                           Cost("c2", "compute", s, wgrad=s / 2)]
        chunk = ChunkPlan([], forward=costs(1.0), backward=costs(2.0))
        stage = StagePlan([chunk, chunk], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
        return TrainingPlan([stage] * 4, 16, 4, 1, "dualpipe", True, True, overlap)

    hidden, exposed = (simulate_training(moe(o), 1).steps[0].seconds for o in (True, False))
    assert 16 * 6.0 <= hidden < exposed


@pytest.mark.parametrize("schedule,p", DUAL)
def test_activation_peak_from_the_order_is_pp_plus_one(schedule, p):
    """Walk each rank's order: a forward adds its chunk's activations, a whole backward or a
    weight gradient frees them (an input-gradient part keeps what W reads). The peak is PP + 1
    chunks on every rank (Table 2), split as memory's `dual_in_flight` says; with merged pairs
    (layer against layer) it is PP on all but the middle ranks, which run one pair apart."""
    stages = _stages(schedule, p)
    for rank in range(p):
        for paired in (False, True):
            live, peak = [0, 0], (0, (0, 0))
            for item in dual_items(schedule, p, 4 * p, rank):
                merged = paired and len(item) == 2
                for kind, _, chunk in item:
                    live[chunk] += 1 if kind == "F" else (-1 if kind in "BW" else 0)
                    if not merged and sum(live) > peak[0]:
                        peak = (sum(live), tuple(live))
                if merged and sum(live) > peak[0]:
                    peak = (sum(live), tuple(live))
            middle = (min(rank, p - 1 - rank) if schedule == "dualpipe" else rank) == (p // 2 if schedule == "dualpipe" else p) - 1
            assert peak[0] == (stages + 1 if not paired or middle else stages)
            assert sum(dual_in_flight(schedule, p, rank, paired)) == peak[0]
            if not paired:
                assert dual_in_flight(schedule, p, rank, False) == peak[1]


def _deepseek(overrides: list[str], nodes: int = 128):
    spec, source = load_workload("deepseek_v3_shape_train", overrides)
    system = load_hardware("dgx_h100_x128", [f"nodes={nodes}"])
    return spec, system, build_layout(spec, system, source)


def test_parameters_follow_the_chunk_placement():
    """DualPipe: rank r holds chunks r and pp-1-r of pp, so the ranks together hold the model twice
    (Table 2: parameters 2x); DualPipeV: chunks r and 2pp-1-r of 2pp, the model once (1x)."""
    total = None
    held = {}
    for schedule, vpp in (("1f1b", 1), ("dualpipe", 1), ("dualpipev", 2)):
        spec, _, layout = _deepseek([f"parallelism.schedule={schedule}", f"parallelism.vpp={vpp}"])
        total = model_params(spec.model).total
        per_stage = stage_params(spec, layout)
        held[schedule] = sum(p.total for p in per_stage)
        if schedule == "dualpipe":  # mirrors hold the same pair of chunks
            assert [p.total for p in per_stage] == pytest.approx([p.total for p in per_stage[::-1]])
    assert held["1f1b"] == pytest.approx(total)
    assert held["dualpipe"] == pytest.approx(2 * total)
    assert held["dualpipev"] == pytest.approx(total)


def test_memory_holds_pp_plus_one_chunks():
    spec, _, layout = _deepseek(["parallelism.schedule=dualpipe"])
    assert in_flight_microbatches(spec, layout) == pytest.approx((layout.pp + 1) / 2)  # through both chunks
    spec, _, layout = _deepseek(["parallelism.schedule=dualpipev", "parallelism.vpp=2"])
    assert in_flight_microbatches(spec, layout) == pytest.approx((2 * layout.pp + 1) / 2)


def test_backward_splits_into_input_and_weight_gradients_without_changing_its_seconds():
    spec, system, layout = _deepseek(["parallelism.schedule=dualpipe"])
    plan = build_training_plan(spec, system, layout)
    chunk = plan.stages[1].chunks[0]
    inputs, weights = split_backward(chunk.backward)
    whole = sum(c.seconds for c in chunk.backward)
    assert sum(c.seconds for c in inputs) + sum(c.seconds for c in weights) == pytest.approx(whole, rel=1e-12)
    assert all(c.stream == "compute" for c in weights if c.stream != "bucket")  # W is local GEMM work
    assert sum(c.stream == "bucket" for c in weights) == len(chunk.grad_buckets)  # gradients complete after W
    gemm_backward = sum(c.seconds for c in chunk.backward if c.wgrad > 0)
    assert sum(c.seconds for c in weights) == pytest.approx(gemm_backward / 2)  # dW as large as dX
    # DualPipe adds each chunk's gradients to its mirror rank's; DualPipeV has no mirror
    assert any(c.name == "grad_all_reduce.mirror" for bucket in chunk.grad_buckets for c in bucket)
    spec, system, layout = _deepseek(["parallelism.schedule=dualpipev", "parallelism.vpp=2"])
    v_chunk = build_training_plan(spec, system, layout).stages[1].chunks[0]
    assert not any(c.name == "grad_all_reduce.mirror" for bucket in v_chunk.grad_buckets for c in bucket)


@pytest.mark.parametrize("overrides", [["parallelism.schedule=dualpipe", "parallelism.overlap_moe_comm=true",
                                        "train.global_batch=32768"],
                                       ["parallelism.schedule=dualpipev", "parallelism.vpp=2", "parallelism.pp=4",
                                        "train.global_batch=32768"]])
def test_a_long_step_extrapolated_from_two_short_ones_is_the_whole_simulation(overrides):
    spec, system, layout = _deepseek(overrides)
    plan = build_training_plan(spec, system, layout)
    fast, whole = simulate_training(plan, 1), _simulate(plan, 1, Timeline())
    assert fast.events < whole.events
    assert fast.steps[0].seconds == pytest.approx(whole.steps[0].seconds, rel=1e-12)
    for a, b in zip(fast.steps[0].stages, whole.steps[0].stages):
        assert a.busy == pytest.approx(b.busy, rel=1e-12)


def _estimate(*sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "simcc", "estimate", "deepseek_v3_shape_train", "-H", "dgx_h100_x128"]
    for text in sets:
        args += ["--set", text]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sets,expected", [
    (["parallelism.schedule=dualpipe", "parallelism.pp=3"], "even pp (got pp=3)"),
    (["parallelism.schedule=dualpipe", "parallelism.vpp=2"], "needs vpp 1 (got vpp=2)"),
    (["parallelism.schedule=dualpipev"], "needs vpp 2 (got vpp=1)"),
    (["parallelism.schedule=dualpipev", "parallelism.vpp=3"], "needs vpp 2 (got vpp=3)"),
    (["parallelism.schedule=dualpipe", "train.global_batch=1920"], "even number of micro-batches"),  # 15
    (["parallelism.schedule=dualpipe", "parallelism.pp=16", "train.global_batch=1024"], "at least 2 x pp = 32 (got 16)"),
    (["parallelism.schedule=dualpipev", "parallelism.vpp=2", "train.global_batch=1920"], "at least 2 x pp = 16 micro-batches per pipeline (got 15)"),
])
def test_hostile_inputs_get_one_line(sets, expected):
    result = _estimate(*sets)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]
