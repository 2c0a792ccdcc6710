"""`simcc search`: the lower bound is a lower bound, the pruning never loses the best layout, and
the command answers as a user would expect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simcc.costs.memory import worst_stage_memory
from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.plan.training import ChunkPlan, Cost, StagePlan, TrainingPlan, build_training_plan, chunk_works, stage_footprints
from simcc.search.run import Budget, Loaded, Models, SearchRequest, candidate_workload, run_part, run_search
from simcc.search.space import SearchSpace, candidates, device_counts, parse_axis
from simcc.sim.bound import step_lower_bound
from simcc.sim.training import simulate_training


def _uniform_plan(p: int, m: int, forward: float, backward: float, optimizer: float) -> TrainingPlan:
    chunk = ChunkPlan([], forward=[Cost("f", "compute", forward)], backward=[Cost("b", "compute", backward)])
    stage = StagePlan([chunk], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", optimizer))
    return TrainingPlan([stage] * p, m, p, 1, "1f1b", True)


@pytest.mark.parametrize("p,m", [(1, 4), (4, 8), (8, 8)])
def test_bound_of_uniform_1f1b_is_its_makespan(p, m):
    # The last stage waits (p - 1) forwards, runs m (f + b), and the drain takes (p - 1) backwards:
    # (m + p - 1)(f + b), the 1F1B makespan of equal stages (Narayanan et al. 2021); the optimizer
    # (0.5 s) hides in the drain except with one stage.
    plan = _uniform_plan(p, m, 1.0, 2.0, 0.5)
    expected = (m + p - 1) * 3.0 + (0.5 if p == 1 else 0.0)
    assert step_lower_bound(plan) == pytest.approx(expected)
    assert simulate_training(plan, steps=1).steps[0].seconds >= expected - 1e-9


def test_bound_of_merged_pairs_plays_the_overlap_as_simulated():
    # One stage, three micro-batches: F0 alone 2.4 s, (F1, B0) and (F2, B1) merged at 6 s each
    # (their all-to-alls hidden), B2 alone 4.8 s: 19.2 s, which the simulator also finds.
    def segments(scale: float) -> list[Cost]:
        return [Cost("c1", "compute", scale), Cost("a2a", "comm", 0.4 * scale, group="ep", link="intra"),
                Cost("c2", "compute", scale)]

    chunk = ChunkPlan([], forward=segments(1.0), backward=segments(2.0))
    stage = StagePlan([chunk], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
    plan = TrainingPlan([stage], 3, 1, 1, "1f1b", True, True, True, 0.0)
    assert step_lower_bound(plan) == pytest.approx(2.4 + 6 + 6 + 4.8)
    assert simulate_training(plan, steps=1).steps[0].seconds == pytest.approx(2.4 + 6 + 6 + 4.8)


def test_bound_counts_a_link_the_stage_does_not_wait_for():
    # 10 s of gradient reduction in the background on a 3 s step of compute: the link bounds it.
    chunk = ChunkPlan([], forward=[Cost("f", "compute", 1.0)],
                      backward=[Cost("b", "compute", 2.0), Cost("grad_bucket0", "bucket", 0.0, bucket=0)])
    chunk.grad_buckets = [[Cost("grad", "comm", 10.0, group="dp", link="inter")]]
    stage = StagePlan([chunk], Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
    plan = TrainingPlan([stage], 1, 1, 1, "1f1b", True)
    assert step_lower_bound(plan) == pytest.approx(10.0)
    assert simulate_training(plan, steps=1).steps[0].seconds >= 10.0


SMALL_SPACES = [
    # a dense model on one node: tensor, pipeline, interleaving, micro-batch, ZeRO, recompute
    ("gpt_22b_dense_train_8xa100", ["train.global_batch=16"], "dgx_a100_x1", None,
     SearchSpace(tp=(2, 4, 8), pp=(1, 2, 4), micro_batch=(1, 2), zero_stage=(0, 1))),
    # an MoE model over two nodes: expert parallelism, dispatchers, EP-communication overlap
    ("qwen3_30b_a3b_train_16xh100", ["train.global_batch=64", "model.blocks.1.repeat=8"], "dgx_h100_x8", "16",
     SearchSpace(tp=(1, 2), pp=(1, 2), vpp=(1,), ep=(4, 8, 16), micro_batch=(1, 2), zero_stage=(1,),
                 dispatcher=("alltoall", "deduplicated"), overlap_moe_comm=(False, True))),
]


def _exhaustive(workload_name, sets, hardware, devices, space):
    """Every layout of the space under every recompute policy that fits, simulated: per candidate,
    (label, step seconds, bound) of each policy that fits, lightest first."""
    loaded = Loaded(SearchRequest(workload_name, tuple(sets), hardware, (), devices, space))
    models = Models(loaded.workload.model)
    rows = []
    for candidate in candidates(loaded.workload, loaded.device_counts, loaded.system.devices_per_node, space):
        system = loaded.system_for(candidate.devices)
        rows.append([])
        for recompute in candidate.recompute:
            workload = candidate_workload(loaded.workload, candidate, recompute, models)
            try:
                layout = build_layout(workload, system, loaded.source)
            except InputError:
                continue
            works = chunk_works(workload, layout)
            if not worst_stage_memory(workload, system, layout, stage_footprints(workload, layout, works)).fits:
                continue
            plan = build_training_plan(workload, system, layout, works=works)
            step = estimate(workload, system, loaded.source, SimulationOptions(), plan=plan).step.step_s
            rows[-1].append((candidate.label(recompute), step, step_lower_bound(plan)))
    return [variants for variants in rows if variants]


@pytest.mark.parametrize("workload,sets,hardware,devices,space", SMALL_SPACES)
def test_search_finds_what_an_exhaustive_sweep_finds_and_the_bound_holds(workload, sets, hardware, devices, space):
    per_candidate = _exhaustive(workload, sets, hardware, devices, space)
    assert len(per_candidate) >= 10  # the space is not trivially small
    for variants in per_candidate:
        for label, step, bound in variants:
            assert bound <= step * (1 + 1e-9), label  # the lower bound is a lower bound
            assert step >= variants[0][1] * (1 - 1e-9), label  # more recomputation is never faster
    result = run_part(SearchRequest(workload, tuple(sets), hardware, (), devices, space, top=3))
    every = [step for variants in per_candidate for _, step, _ in variants]
    assert result.ranked[0].step_s == pytest.approx(min(every), rel=1e-9)  # no layout beats the winner
    best = sorted(variants[0][1] for variants in per_candidate)[:3]
    assert [e.step_s for e in result.ranked] == pytest.approx(best, rel=1e-9)  # pruning lost none of the top 3
    assert result.counts.pruned > 0  # and it pruned something


def test_parts_merge_into_the_whole_answer():
    request = SearchRequest(*SMALL_SPACES[0][:1], tuple(SMALL_SPACES[0][1]), SMALL_SPACES[0][2], (), None,
                            SMALL_SPACES[0][4], top=4)
    whole = run_part(request)
    parts = run_search(request, jobs=2)
    assert [e.step_s for e in parts.ranked] == pytest.approx([e.step_s for e in whole.ranked], rel=1e-9)
    assert [e.label for e in parts.front] == [e.label for e in whole.front]
    assert parts.counts.candidates == whole.counts.candidates


def test_front_trades_time_for_money_over_device_counts():
    request = SearchRequest("qwen3_30b_a3b_train_16xh100", ("train.global_batch=64", "model.blocks.1.repeat=8"),
                            "dgx_h100_x8", (), "8..32", SearchSpace(tp=(1,), pp=(1, 2), vpp=(1,), ep=(8,), micro_batch=(1,),
                                                                   zero_stage=(1,), overlap_moe_comm=(False,)))
    result = run_part(request)
    front = result.front
    assert len(front) >= 2
    steps = [e.step_s for e in front]
    costs = [e.usd_for(e.step_s) for e in front]
    assert steps == sorted(steps) and costs == sorted(costs, reverse=True)  # faster costs more along the front
    assert {e.devices for e in front} <= {8, 16, 32}


def test_budget_drops_what_it_cannot_afford():
    base = SearchRequest("gpt_22b_dense_train_8xa100", ("train.global_batch=16",), "dgx_a100_x1", (), None,
                         SearchSpace(tp=(4, 8), pp=(1, 2), micro_batch=(1,), zero_stage=(0,)))
    free = run_part(base)
    fastest_days = free.ranked[0].row["days"]
    tight = run_part(SearchRequest(*[getattr(base, f) for f in ("workload", "workload_sets", "hardware", "hardware_sets",
                                                                "devices", "space", "top")],
                                   Budget(max_days=fastest_days * 0.5)))
    assert tight.ranked == [] and tight.counts.over_budget > 0
    limit = free.ranked[1].row["days"] * 0.9999  # the runner-up and slower layouts break it
    loose = run_part(SearchRequest(*[getattr(base, f) for f in ("workload", "workload_sets", "hardware", "hardware_sets",
                                                                "devices", "space", "top")],
                                   Budget(max_days=limit)))
    assert [e.label for e in loose.ranked] == [free.ranked[0].label]
    assert all(e.row["days"] <= limit for e in loose.simulated)


def test_axes_and_device_counts_parse_or_refuse_in_one_line():
    assert parse_axis("tp=4,1,2") == ("tp", (1, 2, 4))
    assert parse_axis("recompute=full,none") == ("recompute", ("none", "full"))
    assert parse_axis("overlap_moe_comm=true") == ("overlap_moe_comm", (True,))
    for bad in ("tp=a", "tp=0", "zero_stage=4", "dispatcher=magic", "colour=red", "tp="):
        with pytest.raises(InputError):
            parse_axis(bad)
    assert device_counts("1024..4096", 8, 1024, False) == [1024, 2048, 4096]
    assert device_counts("16..40", 8, 16, False) == [16, 32, 40]
    for bad in ("0..8", "8..4", "x", "12", "1..2e9"):
        with pytest.raises(InputError):
            device_counts(bad, 8, 8, False)
    with pytest.raises(InputError, match="one node"):
        device_counts("16", 8, 8, True)


def _simcc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True, timeout=300)


def test_cli_prints_the_winner_why_and_the_front():
    done = _simcc("search", "gpt_22b_dense_train_8xa100", "-H", "dgx_a100_x1", "--set", "train.global_batch=16",
                  "--space", "tp=4,8", "--space", "pp=1,2", "--top", "3")
    assert done.returncode == 0, done.stderr
    assert "fastest 3" in done.stdout and "why the winner wins" in done.stdout and "Pareto front" in done.stdout
    as_json = _simcc("search", "gpt_22b_dense_train_8xa100", "-H", "dgx_a100_x1", "--set", "train.global_batch=16",
                     "--space", "tp=4,8", "--space", "pp=1,2", "--format", "json")
    data = json.loads(as_json.stdout)
    ranks = [row["rank"] for row in data["layouts"] if row["rank"] is not None]
    assert ranks == sorted(ranks) and ranks[0] == 1 and data["counts"]["simulated"] >= len(ranks)


@pytest.mark.parametrize("args, named", [
    (["--devices", "12"], "--devices"),
    (["--space", "tp=three"], "--space"),
    (["--max-days", "nan"], "--max-days"),
    (["--max-usd", "-5"], "--max-usd"),
    (["--top", "0"], "--top"),
    (["--space", "tp=1024"], "--space"),  # no layout of the space divides the 8 devices
])
def test_cli_refuses_bad_options_in_one_line(args, named):
    done = _simcc("search", "gpt_22b_dense_train_8xa100", "-H", "dgx_a100_x1", *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr


def test_cli_refuses_a_serving_workload():
    done = _simcc("search", "mixtral_8x7b_serve_edge", "-H", "apple_m2_max")
    assert done.returncode == 2 and "training" in done.stderr


def test_ray_tasks_give_the_same_answer():
    pytest.importorskip("ray")
    request = SearchRequest("gpt_22b_dense_train_8xa100", ("train.global_batch=16",), "dgx_a100_x1", (), None,
                            SearchSpace(tp=(4, 8), pp=(1, 2), micro_batch=(1, 2)), top=3)
    by_ray = run_search(request, executor="ray")
    here = run_part(request)
    assert [e.label for e in by_ray.ranked] == [e.label for e in here.ranked]
    assert by_ray.counts.candidates == here.counts.candidates


def test_cli_refuses_a_plot_over_its_own_workload_before_searching(tmp_path):
    from pathlib import Path

    workload = tmp_path / "w.yaml"
    workload.write_text((Path(__file__).parent.parent / "workloads" / "gpt_22b_dense_train_8xa100.yaml").read_text())
    before = workload.read_bytes()
    done = _simcc("search", str(workload), "-H", "dgx_a100_x1", "--plot", str(workload))
    assert done.returncode == 2 and "--plot" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert workload.read_bytes() == before
