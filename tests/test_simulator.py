"""The discrete-event simulator against hand-derived cases."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import simpy

from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.sim.links import FairShareLink
from simcc.sim.timeline import Timeline
from simcc.sim.training import _simulate, simulate_training, task_order
from simcc.specs.loader import load_hardware, load_workload
from simcc.plan.training import ChunkPlan, Cost, StagePlan, TrainingPlan, build_training_plan

from conftest import with_intra_fits


def _finish_times(starts_and_work: list[tuple[float, float | tuple[float, ...]]]) -> list[float]:
    """When each sender's last flow ends; a tuple of works is sent back to back, each flow
    starting the instant the one before it ends."""
    env = simpy.Environment()
    link = FairShareLink(env, "l")
    finished: list[float] = [0.0] * len(starts_and_work)

    def flow(i: int, start: float, work: float | tuple[float, ...]):
        yield env.timeout(start)
        for piece in work if isinstance(work, tuple) else (work,):
            yield link.transfer(piece)
        finished[i] = env.now

    for i, (start, work) in enumerate(starts_and_work):
        env.process(flow(i, start, work))
    env.run()
    return finished


def test_one_message_takes_latency_plus_bytes_over_bandwidth():
    latency, size, bandwidth = 5e-6, 64e6, 40e9
    assert _finish_times([(0.0, latency + size / bandwidth)]) == [pytest.approx(latency + size / bandwidth)]


def test_two_equal_flows_on_one_link_take_twice_as_long():
    assert _finish_times([(0.0, 1.0), (0.0, 1.0)]) == [pytest.approx(2.0), pytest.approx(2.0)]


def test_bandwidth_is_shared_not_queued():
    # B joins at 0.5: A has 0.5 left, both run at half speed -> A ends at 1.5, B (1.0 of work) at 2.0.
    assert _finish_times([(0.0, 1.0), (0.5, 1.0)]) == [pytest.approx(1.5), pytest.approx(2.0)]
    # first-come-first-served would have finished A at 1.0; a short flow is not stuck behind a long one
    assert _finish_times([(0.0, 10.0), (0.0, 1.0)]) == [pytest.approx(11.0), pytest.approx(2.0)]


def test_flows_sharing_a_link_finish_at_hand_derived_times():
    # both at half speed: the 1 s flow ends at 2 s, leaving the 2 s flow 1 s of work at full speed
    assert _finish_times([(0.0, 1.0), (0.0, 2.0)]) == [pytest.approx(2.0, abs=1e-12), pytest.approx(3.0, abs=1e-12)]
    # a flow started the instant another ends shares from then on: A's second flow (t=2) and B's
    # remaining 2 s run at half speed until 4; B's last 1 s runs alone until 5
    assert _finish_times([(0.0, (1.0, 1.0)), (0.0, 3.0)]) == [pytest.approx(4.0, abs=1e-12), pytest.approx(5.0, abs=1e-12)]


def _private_attributes(source: str, on_self: bool) -> set[str]:
    """Non-dunder names starting with `_` read or written as attributes in `source`; only those on
    `self` with on_self, only those on anything else without."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            if (isinstance(node.value, ast.Name) and node.value.id == "self") == on_self:
                names.add(node.attr)
        elif on_self and isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.endswith("__"):
            names.add(node.name)
    return names


def test_links_use_only_public_simpy_api():
    """simpy's private fields may change in any release, and pyproject no longer caps simpy's version.
    A flow subclasses simpy.Event, so `self._x` counts too when `_x` is one of simpy's own names."""
    import inspect
    from pathlib import Path

    import simcc.sim.links as links

    source = inspect.getsource(links)
    simpy_private = set().union(*(_private_attributes(f.read_text(), on_self)
                                  for f in Path(simpy.__file__).parent.rglob("*.py") for on_self in (True, False)))
    assert {"_ok", "_value"} <= simpy_private  # what firing an event by hand takes
    assert _private_attributes(source, on_self=False) == set()
    assert _private_attributes(source, on_self=True) & simpy_private == set()
    assert ".callbacks =" not in source  # append to an event's callbacks; only simpy marks it processed


def _plan(p: int, m: int, v: int, schedule: str, forward: float = 1.0, backward: float = 2.0) -> TrainingPlan:
    chunk = ChunkPlan([], forward=[Cost("f", "compute", forward / v)], backward=[Cost("b", "compute", backward / v)])
    stage = StagePlan([chunk] * v, Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.5))
    return TrainingPlan([stage] * p, m, p, v, schedule, True)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 8), (2, 4), (4, 8), (8, 32), (4, 64), (8, 200)])  # the last two extrapolated
def test_pipeline_bubble_fraction_emerges(schedule, p, m):
    sim = simulate_training(_plan(p, m, 1, schedule), steps=1)
    step = sim.steps[0]
    pipeline = step.seconds - 0.5
    assert pipeline == pytest.approx(3.0 * (m + p - 1))
    assert step.bubble / pipeline == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (4, 2, 8), (4, 4, 8), (4, 2, 96)])  # the last extrapolated
def test_interleaving_divides_the_bubble_by_virtual_stages(p, v, m):
    sim = simulate_training(_plan(p, m, v, "interleaved"), steps=1)
    assert sim.steps[0].seconds - 0.5 == pytest.approx(3.0 * m + 3.0 * (p - 1) / v)


@pytest.mark.parametrize("schedule, v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
@pytest.mark.parametrize("p, per_run, runs", [(4, 8, 2), (4, 8, 3), (2, 4, 7), (4, 4, 9)])  # 7 and 9 extrapolated
def test_each_pipeline_run_of_a_step_fills_and_drains(schedule, v, p, per_run, runs):
    """Gradient accumulation over several schedule runs (torch pipelining's local_batch): every run
    pays the pipeline's fill and drain, so R runs of m micro-batches take R times one run,
    3 (m + p - 1) for 1F1B and GPipe and 3 m + 3 (p - 1) / v interleaved, plus one optimizer step."""
    plan = replace(_plan(p, per_run * runs, v, schedule), runs=runs)
    one = 3.0 * (per_run + p - 1) if schedule != "interleaved" else 3.0 * per_run + 3.0 * (p - 1) / v
    step = simulate_training(plan, steps=1).steps[0]
    assert step.seconds - 0.5 == pytest.approx(runs * one)
    assert step.bubble == pytest.approx(runs * (one - 3.0 * per_run))  # the stage idles through each run's fill and drain
    whole = simulate_training(replace(plan, runs=1), steps=1).steps[0]
    assert whole.seconds < step.seconds
    from simcc.sim.bound import step_lower_bound
    assert step_lower_bound(plan) <= step.seconds  # a search's bound still holds


def test_a_local_batch_splits_the_step_into_pipeline_runs(tmp_path):
    """train.local_batch: global_batch / (local_batch x dp) runs of local_batch / micro_batch
    micro-batches each; the memory in flight is one run's; a local batch that does not divide a
    replica's share, or leaves the interleaved schedule a run that is not a multiple of pp, is
    refused in one line naming the field."""
    from simcc.costs.memory import in_flight_microbatches
    from simcc.errors import InputError

    sets = ["parallelism.pp=4", "parallelism.vpp=1", "parallelism.schedule=1f1b", "parallelism.micro_batch=1",
            "train.global_batch=256"]
    workload, src = load_workload("mixtral_8x7b_train_64xh100", sets + ["train.local_batch=4"])
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, src)
    assert layout.microbatches == 256 // layout.dp and layout.pipeline_runs == 256 // layout.dp // 4
    assert layout.microbatches_per_run == 4 and in_flight_microbatches(workload, layout) == 4
    plan = build_training_plan(workload, system, layout)
    assert plan.runs == layout.pipeline_runs and plan.microbatches_per_run == 4
    for bad, message in (("train.local_batch=5", "train.local_batch: local_batch=5 must be a multiple of micro_batch=1 "
                          "and divide the 16 sequences"),):
        with pytest.raises(InputError, match=message):
            w, s = load_workload("mixtral_8x7b_train_64xh100", sets + [bad])
            build_layout(w, system, s)
    with pytest.raises(InputError, match="train.local_batch: interleaved schedule needs micro-batches per pipeline run"):
        w, s = load_workload("mixtral_8x7b_train_64xh100",
                             ["parallelism.pp=4", "parallelism.vpp=2", "parallelism.schedule=interleaved",
                              "parallelism.micro_batch=1", "train.global_batch=256", "train.local_batch=2"])
        build_layout(w, system, s)


def test_schedules_run_every_task_once():
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 3)):
        for stage in range(4):
            order = task_order(schedule, 4, v, 8, stage)
            assert sorted(order) == sorted([(k, mb, c) for k in "FB" for mb in range(8) for c in range(v)])


def test_pipeline_sends_overlap_compute_but_delay_dependents():
    plan = _plan(2, 1, 1, "1f1b")
    plan.stages = [StagePlan(s.chunks, Cost("p2p", "comm", 0.25, link="inter"), s.optimizer) for s in plan.stages]
    # one micro-batch through two stages: F0, send, F1, B1, send, B0, then the optimizer
    assert simulate_training(plan, steps=1).steps[0].seconds == pytest.approx(1 + 0.25 + 1 + 2 + 0.25 + 2 + 0.5)


@pytest.mark.parametrize("overlap_p2p, expected", [(True, 10.0), (False, 10.5)])
def test_a_stage_that_waits_for_its_sends_starts_its_next_task_later(overlap_p2p, expected):
    # GPipe, 2 stages, 2 micro-batches, F = 1, B = 2, sends 0.25, optimizer 0.5. In the background:
    # stage 1 runs F0 1.25-2.25, F1 2.25-3.25, B0 3.25-5.25, B1 5.25-7.25; stage 0 gets grad0 at 5.5,
    # grad1 at 7.5, ends B1 at 9.5. Waiting: stage 0 starts F1 at 1.25, so every later step on stage 1
    # slips by 0.25 and its own grad0 send delays B1 by 0.25 more: stage 0 gets grad1 at 8.0, ends at 10.0.
    plan = _plan(2, 2, 1, "gpipe")
    plan.stages = [StagePlan(s.chunks, Cost("p2p", "comm", 0.25, link="inter"), s.optimizer) for s in plan.stages]
    plan.overlap_p2p = overlap_p2p
    assert simulate_training(plan, steps=1).steps[0].seconds == pytest.approx(expected)


@pytest.mark.parametrize("schedule, given, expected", [
    (["parallelism.schedule=interleaved"], [], True),  # Megatron-LM's and PyTorch's looped schedules
    (["parallelism.schedule=1f1b", "parallelism.vpp=1"], [], False),  # Megatron-LM turns it off
    (["parallelism.schedule=interleaved"], ["parallelism.overlap_p2p=false"], False),  # 2022's blocking sends
    (["parallelism.schedule=1f1b", "parallelism.vpp=1"], ["parallelism.overlap_p2p=true"], True),
])
def test_send_overlap_follows_the_schedule_unless_given(schedule, given, expected):
    from simcc.plan.training import build_training_plan

    workload, source = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.overlap_p2p=null", *schedule, *given])
    system = load_hardware("dgx_h100_x8")
    assert workload.parallelism.effective_overlap_p2p is expected
    assert build_training_plan(workload, system, build_layout(workload, system, source)).overlap_p2p is expected


def _moe_case(overrides=()):
    workload, src = load_workload("mixtral_8x7b_train_64xh100", list(overrides))
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, src)
    return workload, system, layout


def test_expert_parallel_layer_runs_at_its_busiest_rank():
    skew = ["model.blocks.1.blocks.1.moe_ffn.load.distribution=zipf", "model.blocks.1.blocks.1.moe_ffn.load.alpha=1.5"]
    workload, system, layout = _moe_case(skew)
    plan = build_training_plan(workload, system, layout, sampled_steps=2)
    forward, _ = plan.stages[0].chunks[0].step_work(0)
    up = next(c for c in forward if c.name == "moe.expert_up")
    assert up.imbalance > 0.2 * up.seconds  # the busiest rank carries far more than the mean
    sim = simulate_training(plan, steps=2)
    assert sim.mean("imbalance") > 0
    # each step draws its own loads, so steps differ
    assert sim.steps[0].seconds != sim.steps[1].seconds


def test_runs_are_reproducible_by_seed():
    workload, system, layout = _moe_case(["model.blocks.1.blocks.1.moe_ffn.load.distribution=cv",
                                          "model.blocks.1.blocks.1.moe_ffn.load.cv=0.3"])
    first = estimate(workload, system, "w").step.step_s
    again = estimate(workload, system, "w").step.step_s
    other, _ = load_workload("mixtral_8x7b_train_64xh100", ["seed=9", "model.blocks.1.blocks.1.moe_ffn.load.distribution=cv",
                                                            "model.blocks.1.blocks.1.moe_ffn.load.cv=0.3"])
    assert first == again
    assert estimate(other, system, "w").step.step_s != first


def test_trace_has_a_track_per_stage(tmp_path):
    workload, system, _ = _moe_case()
    trace = Timeline(enabled=True)
    estimate(workload, system, "w", SimulationOptions(steps=1, timeline=trace))
    chrome = trace.to_chrome()
    names = {e["args"]["name"] for e in chrome["traceEvents"] if e.get("name") == "process_name"}
    assert {"stage0", "stage1", "stage2", "stage3"} <= names
    assert {"link stage0.intra", "link stage0.inter"} <= names  # EP all-to-all in the node, PP sends across
    spans = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert any(e["name"] == "moe.dispatch" for e in spans) and any(e["name"] == "p2p" or e["name"] == "pp.send" for e in spans)
    json.dumps(chrome)


def test_simulation_cost_does_not_grow_with_data_parallel_width():
    small = _moe_case()
    workload, _, _ = small
    big_system = load_hardware("dgx_h100_x128")
    wide, src = load_workload("mixtral_8x7b_train_64xh100", ["train.global_batch=4096"])
    small_events = estimate(workload, small[1], "w").step.simulated_events
    big_events = estimate(wide, big_system, src).step.simulated_events
    # 16x the devices, same micro-batches per pipeline; only the longer gradient reduction keeps a
    # few more segments from playing as one event.
    assert big_events <= 1.1 * small_events


@pytest.mark.parametrize("overrides", [
    [],  # interleaved pp4, ZeRO gathers, gradient buckets in the background
    ["parallelism.overlap_grad_reduce=false", "parallelism.pp=2", "parallelism.vpp=1", "parallelism.schedule=1f1b"],
    ["model.blocks.1.blocks.1.moe_ffn.routing.overlap_degree=4"],  # dispatch/combine pipelined with experts
])
def test_segments_played_as_one_event_give_the_segment_by_segment_timeline(overrides):
    workload, system, layout = _moe_case(overrides)
    plan = build_training_plan(workload, system, layout, sampled_steps=2)
    folded = simulate_training(plan, 2)
    each = simulate_training(plan, 2, Timeline(enabled=True))  # a kept trace plays every segment
    assert folded.events < each.events
    for a, b in zip(folded.steps, each.steps):
        assert a.seconds == pytest.approx(b.seconds, rel=1e-9)
        for part in ("compute", "imbalance", "blocking_comm", "sync_wait", "optimizer"):
            assert getattr(a.critical, part) == pytest.approx(getattr(b.critical, part), rel=1e-9, abs=1e-12)


def _overlap_plan(chunks: int, latency: float = 0.0) -> TrainingPlan:
    forward = [Cost("moe.dispatch", "comm", 1.0, link="intra", overlap_chunks=chunks, latency=latency),
               Cost("moe.expert", "compute", 4.0),
               Cost("moe.combine", "comm", 1.0, link="intra", overlap_chunks=chunks, latency=latency)]
    chunk = ChunkPlan([], forward=forward, backward=[])
    return TrainingPlan([StagePlan([chunk], Cost("p2p", "comm", 0.0), Cost("opt", "compute", 0.0))], 1, 1, 1, "1f1b", True)


def test_chunked_all_to_all_overlaps_expert_compute():
    assert simulate_training(_overlap_plan(1), 1).steps[0].seconds == pytest.approx(6.0)
    # four pieces: first dispatch piece, four compute pieces, last combine piece are exposed
    assert simulate_training(_overlap_plan(4), 1).steps[0].seconds == pytest.approx(0.25 + 4.0 + 0.25)
    # each piece pays the latency floor again
    assert simulate_training(_overlap_plan(4, latency=0.1), 1).steps[0].seconds == pytest.approx(
        (0.1 + 0.9 / 4) + 4.0 + (0.1 + 0.9 / 4))


def test_overlap_degree_never_slows_a_real_moe_step():
    workload, system, layout = _moe_case()
    times = []
    for degree in (1, 2, 4):
        w, src = load_workload("mixtral_8x7b_train_64xh100", [f"model.blocks.1.blocks.1.moe_ffn.routing.overlap_degree={degree}"])
        times.append(estimate(w, system, src, SimulationOptions(steps=1)).step.exposed_comm_s)
    assert times[0] > times[1] > times[2]


def test_gradient_buckets_overlap_the_backward_pass():
    def run(overlap: bool):
        w, src = load_workload("gpt_22b_dense_train_8xa100", ["parallelism.tp=1", "parallelism.micro_batch=1", "train.global_batch=8",
                                                               "parallelism.recompute=full", "model.blocks.1.repeat=8",
                                                               f"parallelism.overlap_grad_reduce={str(overlap).lower()}"])
        system = load_hardware("dgx_a100_x1")
        layout = build_layout(w, system, src)
        plan = build_training_plan(w, system, layout)
        bucket_seconds = sum(c.seconds for chunk in plan.stages[0].chunks for b in chunk.grad_buckets for c in b)
        return simulate_training(plan, 1), bucket_seconds

    overlapped, buckets = run(True)
    serial, _ = run(False)
    assert serial.mean("sync_wait") == pytest.approx(buckets)  # reduced only after the backward
    assert overlapped.mean("sync_wait") < 0.5 * buckets  # most buckets hide behind earlier layers' backward
    assert overlapped.mean_step < serial.mean_step


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_pipeline_sends_scatter_over_tensor_ranks_and_gather_in_the_node(sequence_parallel):
    workload, src = load_workload("megatron_175b_train", [f"parallelism.sequence_parallel={str(sequence_parallel).lower()}"])
    shipped = load_hardware("dgx_a100_x8")
    # the link model alone (the shipped node also carries measured all-reduce lines, checked below)
    system = with_intra_fits(shipped, [])
    plan = build_training_plan(workload, system, build_layout(workload, system, src))
    activation = 2048 * 12288 * 2  # tokens x hidden x fp16
    # each of the 8 tensor ranks sends 1/8 over its own 200 Gb/s NIC (20 GB/s at 80%), 5 us latency
    send = 5e-6 + activation / 8 / 20e9
    # then the receivers all-gather it: ring over 8 on NVLink, 300 GB/s at 80%, 2 us a step
    gather = 7 * 2e-6 + 7 / 8 * activation / 240e9
    expected = send if sequence_parallel else send + gather  # sequence-parallel shards are already 1/8
    assert plan.stages[0].p2p.seconds == pytest.approx(expected)
    # with the measured lines the all-gather is half a fitted 8-rank all-reduce of the 50 MB buffer
    line = max((f for f in shipped.intra_link.fits if f.ranks == 8), key=lambda f: f.max_bytes)
    measured_gather = (line.latency_us * 1e-6 + activation / (line.bandwidth_gb_s * 1e9)) / 2
    plan = build_training_plan(workload, shipped, build_layout(workload, shipped, src))
    assert plan.stages[0].p2p.seconds == pytest.approx(send if sequence_parallel else send + measured_gather)


def _moe_plan(p: int, m: int, v: int, schedule: str, share: float = 0.0) -> TrainingPlan:
    """Forward: 1 s compute, a 0.4 s EP all-to-all, 1 s compute; backward twice each."""
    def segments(scale: float) -> list[Cost]:
        return [Cost("c1", "compute", scale / v), Cost("a2a", "comm", 0.4 * scale / v, group="ep", link="intra"),
                Cost("c2", "compute", scale / v)]

    chunk = ChunkPlan([], forward=segments(1.0), backward=segments(2.0))
    stage = StagePlan([chunk] * v, Cost("p2p", "comm", 0.0, link="inter"), Cost("opt", "compute", 0.0))
    return TrainingPlan([stage] * p, m, p, v, schedule, True, True, True, share)


def test_ep_overlap_hides_each_all_to_all_behind_the_other_micro_batchs_compute():
    from simcc.sim.training import merged_order

    # one stage, three micro-batches: F0 alone (2.4), (F1, B0) and (F2, B1) merged: compute 2 + 4,
    # all-to-alls 0.4 + 0.8 hidden (6 each), B2 alone (4.8)
    assert merged_order(task_order("1f1b", 1, 1, 3, 0, extra_warmup=1)) == [
        (("F", 0, 0),), (("F", 1, 0), ("B", 0, 0)), (("F", 2, 0), ("B", 1, 0)), (("B", 2, 0),)]
    assert simulate_training(_moe_plan(1, 3, 1, "1f1b"), steps=1).steps[0].seconds == pytest.approx(2.4 + 6 + 6 + 4.8)
    plain = _moe_plan(1, 3, 1, "1f1b")
    plain.overlap_moe_comm = False
    assert simulate_training(plain, steps=1).steps[0].seconds == pytest.approx(3 * 2.4 + 3 * 4.8)
    # the dispatcher holding 20% of the SMs slows the merged compute to 6 / 0.8 = 7.5
    assert simulate_training(_moe_plan(1, 3, 1, "1f1b", 0.2), steps=1).steps[0].seconds == pytest.approx(2.4 + 7.5 + 7.5 + 4.8)


@pytest.mark.parametrize("p,v,m,schedule", [(2, 1, 4, "1f1b"), (4, 1, 8, "1f1b"), (8, 1, 16, "1f1b"), (2, 2, 4, "interleaved"),
                                            (4, 2, 8, "interleaved"), (4, 4, 16, "interleaved")])
def test_ep_overlap_runs_every_pipeline_without_deadlock_and_is_never_slower(p, v, m, schedule):
    overlapped = simulate_training(_moe_plan(p, m, v, schedule), steps=1).steps[0].seconds
    plain = _moe_plan(p, m, v, schedule)
    plain.overlap_moe_comm = False
    serial = simulate_training(plain, steps=1).steps[0].seconds
    assert overlapped < serial
    assert overlapped >= 6.0 * m  # never below one stage's compute: (1 + 1) forward + (2 + 2) backward per micro-batch
    for stage in range(p):
        order = task_order(schedule, p, v, m, stage, extra_warmup=1)
        assert sorted(order) == sorted([(k, mb, c) for k in "FB" for mb in range(m) for c in range(v)])


@pytest.mark.parametrize("workload,hardware,overrides", [
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ["train.global_batch=2048"]),  # interleaved pp4, ZeRO
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ["train.global_batch=2048", "parallelism.overlap_moe_comm=true"]),
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ["train.global_batch=1024", "parallelism.pp=2", "parallelism.vpp=1",
                                                   "parallelism.schedule=1f1b", "parallelism.overlap_grad_reduce=false"]),
    ("qwen3_30b_a3b_train_16xh100", "dgx_h100_x8", ["train.global_batch=1024", "parallelism.pp=4",
                                                    "parallelism.schedule=gpipe"]),
    ("qwen3_30b_a3b_train_16xh100", "dgx_h100_x8", ["train.global_batch=1024", "parallelism.pp=4",
                                                    "parallelism.overlap_p2p=false"]),
    ("deepseek_v3_shape_train", "dgx_h100_x128", ["train.global_batch=8192"]),  # uneven stages: embedding, head
    # the last stage slower (an MTP module and the head): from 8 micro-batches it first absorbs
    # more into its idle time (0.799 s each up to 13), then settles at its busy time (0.808 s)
    ("deepseek_v3_mtp_train", "dgx_h100_x128", ["train.global_batch=32768"]),
    ("deepseek_v3_shape_train", "dgx_h100_x128", ["train.global_batch=32768", "parallelism.overlap_p2p=true"]),
])
def test_a_long_step_extrapolated_from_two_short_ones_is_the_whole_simulation(workload, hardware, overrides):
    """Every micro-batch plays the same costs, so past the warm-up each further period adds the
    same time to every stage: the two short steps and a line through them give the whole step,
    its breakdown and every dimension's exposed time, for fewer events."""
    spec, source = load_workload(workload, overrides)
    system = load_hardware(hardware)
    plan = build_training_plan(spec, system, build_layout(spec, system, source))
    fast, whole = simulate_training(plan, 1), _simulate(plan, 1, Timeline())
    if plan.microbatches >= 64 and not plan.overlap_p2p:  # (a pattern that never settles is simulated whole)
        assert fast.events < whole.events
    a, b = fast.steps[0], whole.steps[0]
    assert a.seconds == pytest.approx(b.seconds, rel=1e-12)
    for stage_a, stage_b in zip(a.stages, b.stages):  # rounding grows with the repeats (up to 250 here)
        for part in ("compute", "imbalance", "blocking_comm", "sync_wait", "optimizer"):
            assert getattr(stage_a, part) == pytest.approx(getattr(stage_b, part), rel=1e-10, abs=1e-10)
        assert stage_a.exposed == pytest.approx(stage_b.exposed, rel=1e-10, abs=1e-10)
