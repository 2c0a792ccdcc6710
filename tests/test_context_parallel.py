"""Context parallelism (parallelism.cp): the load-balanced sequence split, per-rank work and memory,
the KV ring's bytes and its overlap with the attention steps, the groups gradients reduce over, the
step it buys, the search axis, and hostile inputs. Expected values are derived by hand in comments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simcc.costs.collectives import collective_time, intra_level, ring_exposed, ring_steps
from simcc.costs.memory import optimizer_state_bytes
from simcc.estimate import estimate
from simcc.layout import build_layout
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds import attention, mla
from simcc.model.ops import Comm, Op
from simcc.plan.training import build_training_plan, chunk_works, stage_params
from simcc.search.run import SearchRequest, run_part
from simcc.search.space import SearchSpace
from simcc.sim.bound import step_lower_bound
from simcc.sim.training import simulate_training
from simcc.specs.blocks import AttentionBlock, MLABlock
from simcc.specs.loader import load_hardware, load_workload

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 2, 64
QWEN30 = "qwen3_30b_a3b_train_16xh100"  # 48 x (GQA attention 32/4 heads x 128, MoE 128 experts top-8), EP16


def _load_balanced_pairs(seq: int, cp: int, rank: int) -> int:
    """Causal (query, key) pairs rank `rank` scores under Megatron's split: the sequence in 2cp
    chunks, the rank holding chunks rank and 2cp-1-rank, its queries against every earlier key."""
    chunk = seq // (2 * cp)
    queries = [p for c in (rank, 2 * cp - 1 - rank) for p in range(c * chunk, (c + 1) * chunk)]
    return sum(q + 1 for q in queries)


@pytest.mark.parametrize("seq,cp", [(16, 2), (32, 4), (48, 3), (64, 8)])
def test_the_load_balanced_split_gives_every_rank_one_cp_th_of_the_causal_work(seq, cp):
    # With L = seq/2cp, rank i scores L(L+1)/2 on each of its two diagonal chunks and L^2 against
    # each of the i + (2cp-1-i) = 2cp-1 earlier chunks: L(L+1) + (2cp-1)L^2, whatever i. For
    # seq 16, cp 2 (L = 4): 20 + 3 x 16 = 68 = (16 x 17 / 2) / 2.
    total = seq * (seq + 1) // 2
    for rank in range(cp):
        chunk = seq // (2 * cp)
        assert _load_balanced_pairs(seq, cp, rank) == chunk * (chunk + 1) + (2 * cp - 1) * chunk ** 2 == total / cp


def _ops(spec, batch: Batch, shard: Shard, kind=attention):
    return kind.work(spec, HIDDEN, batch, shard)


def test_attention_per_rank_flops_bytes_and_ring_by_hand():
    spec = AttentionBlock(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    seq, cp = 1024, 4
    whole = _ops(spec, Batch(1, seq, seq), Shard())
    split = _ops(spec, Batch(1, seq // cp, seq // cp), Shard(cp=cp))
    ops1 = {i.name: i for i in whole.forward}
    ops4 = {i.name: i for i in split.forward}
    # Everything but the core works on the 256 local tokens: the GEMMs' FLOPs and every kept byte
    # are a quarter of cp=1's.
    for name in ("attn.qkv", "attn.out", "attn.norm"):
        assert ops4[name].flops == pytest.approx(ops1[name].flops / cp)
    saved = lambda work: sum(i.saved_bytes for i in work.forward if isinstance(i, Op))  # noqa: E731
    assert saved(split) == pytest.approx(saved(whole) / cp)
    # Core: causal half of 256 local queries x 1024 keys, 4 FLOPs per pair, head_dim 64, 8 heads:
    # 4 x 256 x 1024 x 8 x 64 / 2 = 268,435,456 = cp=1's 4 x 1024^2 x 512 / 2 over 4, in 4 kernels.
    core = ops4["attn.core"]
    assert core.flops == 268_435_456 == ops1["attn.core"].flops / cp
    assert (core.launches, core.kernel_flops) == (cp, core.flops / cp)
    # Ring: one chunk is the local K and V, 256 tokens x 2 kv heads x 64 x 2 B x 2 = 131,072 B,
    # passed on the cp group, just before the core it overlaps.
    ring = ops4["attn.cp_ring"]
    assert isinstance(ring, Comm) and (ring.collective, ring.group, ring.bytes) == ("p2p", "cp", 131_072)
    names = [i.name for i in split.forward]
    assert names.index("attn.cp_ring") + 1 == names.index("attn.core")
    assert "attn.cp_ring" not in ops1
    # TE holds cp received chunks in the forward and K,V + dK,dV double buffers in the backward:
    # max(4, 4) x 131,072 B.
    assert split.transient_bytes == 4 * 131_072 and whole.transient_bytes == 0
    # Model FLOPs (the reporting convention): the full square over cp, 4 x 256 x 1024 x 512.
    model = {i.name: i for i in _ops(spec, Batch(1, seq // cp, seq // cp), Shard(cp=cp, executed=False)).forward}
    assert model["attn.core"].flops == 4 * 256 * 1024 * 512


def test_mla_exchanges_the_up_projected_keys_and_values():
    # DeepSeek-V3's MLA widths: q/k heads 128 + 64 = 192, values 128; 16 heads on one TP rank.
    spec = MLABlock(heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128)
    seq, cp = 4096, 2
    split = {i.name: i for i in mla.work(spec, 7168, Batch(1, seq // cp, seq // cp), Shard(cp=cp)).forward}
    whole = {i.name: i for i in mla.work(spec, 7168, Batch(1, seq, seq), Shard()).forward}
    # K (192 wide) and V (128) of 2048 local tokens and 16 heads, bf16: 2048 x 16 x 320 x 2 B.
    assert split["mla.cp_ring"].bytes == 2048 * 16 * 320 * 2
    assert split["mla.core"].flops == pytest.approx(whole["mla.core"].flops / cp)
    assert split["mla.kv_up"].flops == pytest.approx(whole["mla.kv_up"].flops / cp)


def test_ring_steps_and_exposure_by_hand():
    one = lambda size: 1.0 + size / 100.0  # noqa: E731  (1 s latency, 100 B/s)
    # Forward: cp-1 = 3 transfers of a 100 B chunk, 2 s each. Backward: K,V (100 B), then K,V with
    # dK,dV (200 B) twice, then dK,dV home (100 B): 2 + 3 + 3 + 2 s, 6 chunks = 2 x 3.
    assert ring_steps(one, 100.0, 4, backward=False) == [2.0, 2.0, 2.0]
    assert ring_steps(one, 100.0, 4, backward=True) == [2.0, 3.0, 3.0, 2.0]
    assert ring_steps(one, 100.0, 1, backward=True) == []
    # Each step's kernel hides its transfer up to its own length: max(0, t - c) summed.
    assert ring_exposed([2.0, 3.0, 3.0, 2.0], 2.5) == 0.5 + 0.5
    assert ring_exposed([2.0, 2.0], 5.0) == 0.0


def _qwen(cp: int, nodes: int, seq: int = 16384, global_batch: int = 16, *extra: str):
    workload, source = load_workload(QWEN30, [f"train.seq_len={seq}", f"train.global_batch={global_batch}",
                                              f"parallelism.cp={cp}", "parallelism.recompute=full", *extra])
    system = load_hardware("dgx_h100_x8", [f"nodes={nodes}"])
    return workload, system, build_layout(workload, system, source), source


def test_plan_ring_bytes_link_time_and_overlap():
    workload, system, layout, _ = _qwen(4, 2)
    plan = build_training_plan(workload, system, layout)
    chunk = plan.stages[0].chunks[0]
    # One chunk: 16384 / 4 = 4096 local tokens x 4 kv heads x 128 x 2 B x 2 (K, V) = 8,388,608 B.
    size = 4096 * 4 * 128 * 2 * 2
    forward = [c for c in chunk.forward if c.name == "attn.cp_ring"]
    backward = [c for c in chunk.backward if c.name == "attn.cp_ring.bwd"]
    assert len(forward) == 48 and all(c.group == "cp" and c.bytes == 3 * size for c in forward)  # (cp-1) chunks
    assert all(c.bytes == 6 * size for c in backward)  # K,V and dK,dV: 2(cp-1) chunks
    # The 4 cp ranks are 1 apart (tp 1) in one 8-GPU node: each step is a point-to-point on NVLink,
    # latency + bytes / (bandwidth x efficiency).
    level = intra_level(system)
    step = level.latency + size / level.bandwidth
    double = level.latency + 2 * size / level.bandwidth
    assert forward[0].seconds + forward[0].hidden == pytest.approx(3 * step)
    assert backward[0].seconds + backward[0].hidden == pytest.approx(2 * step + 2 * double)
    # Exposed = what each transfer takes beyond its step of the core (a quarter of it).
    core = next(c for c in chunk.forward if c.name == "attn.core")
    assert forward[0].seconds == pytest.approx(3 * max(0.0, step - core.seconds / 4))
    assert collective_time("p2p", size, layout.groups["cp"], system) == pytest.approx(step)


def test_gradients_reduce_over_dp_x_cp_and_zero_shards_over_it():
    w4, s4, l4, _ = _qwen(4, 2)
    w1, s1, l1, _ = _qwen(1, 2)
    # 16 GPUs: cp 4 leaves dp 4, and the dense gradients' group is dp x cp = 16 ranks, as cp 1's dp 16.
    assert (l4.dp, l4.cp, l4.groups["dp"].size, l4.groups["cp"].size) == (4, 4, 16, 4)
    assert l4.expert_dp == 4 * 4 * 1 // 16  # experts' domain dp x cp x tp over ep x etp
    plan = build_training_plan(w4, s4, l4)
    reduces = {c.group for bucket in plan.stages[0].chunks[0].grad_buckets for c in bucket if c.stream == "comm"}
    assert "dp" in reduces
    # ZeRO-1 shards the optimizer state over the same 16 ranks either way.
    for workload, layout in ((w4, l4), (w1, l1)):
        assert optimizer_state_bytes(stage_params(workload, layout)[0], workload, layout) == pytest.approx(
            optimizer_state_bytes(stage_params(w1, l1)[0], w1, l1))


def test_per_rank_gemm_flops_and_activations_halve_at_cp_2():
    w2, s2, l2, _ = _qwen(2, 4)
    w1, s1, l1, _ = _qwen(1, 2)
    works = chunk_works(w2, l2)[0], chunk_works(w1, l1)[0]
    gemm = [sum(i.flops for i in w.items if isinstance(i, Op) and i.family == "gemm") for w in works]
    assert gemm[0] == pytest.approx(gemm[1] / 2)
    attention_flops = [sum(i.flops for i in w.items if isinstance(i, Op) and i.family == "attention") for w in works]
    assert attention_flops[0] == pytest.approx(attention_flops[1] / 2)
    # Full recomputation keeps each layer's input: 8192 local tokens x 2048 x 2 B per layer, half of cp=1's.
    assert works[0].saved_bytes == pytest.approx(works[1].saved_bytes / 2)


def test_cp_2_on_twice_the_devices_is_faster_but_less_efficient_per_device():
    w1, s1, _, src1 = _qwen(1, 2)
    w2, s2, _, src2 = _qwen(2, 4)
    one, two = estimate(w1, s1, src1), estimate(w2, s2, src2)
    assert one.step and two.step and one.comm and two.comm
    # Same global batch, same dp (16): each rank of the cp-2 run does half the tokens' work.
    assert two.layout.dp == one.layout.dp == 16
    assert one.step.step_s / 2 < two.step.step_s < one.step.step_s
    per_device = [r.throughput.tokens_per_s / s.devices for r, s in ((one, s1), (two, s2))]
    assert per_device[1] < per_device[0]
    assert two.comm.cp_link_s > 0 and one.comm.cp_link_s == one.comm.cp_exposed_s == 0
    # What the cp-2 step loses over half the cp-1 step includes the ring it waits for.
    assert two.step.step_s - one.step.step_s / 2 >= two.comm.cp_exposed_s


def test_short_sequences_expose_the_ring():
    # Per step, compute grows with the chunk squared and the transfer with the chunk: cut the
    # sequence and the ring stops hiding. TP 2 x CP 8 spans both nodes, so each ring step crosses
    # the network (CP ranks are tp = 2 apart, 4 of them per node).
    shares = []
    for seq in (65536, 2048):
        workload, system, layout, source = _qwen(8, 2, seq, 16, "parallelism.tp=2", "parallelism.expert_tp=1")
        assert layout.groups["cp"].nodes == 2
        comm = estimate(workload, system, source).comm
        assert comm is not None and comm.cp_link_s > 0
        shares.append(comm.cp_exposed_s / comm.cp_link_s)
    assert shares[0] == 0.0 < shares[1]


def test_the_lower_bound_stays_below_the_simulated_step_with_cp():
    for cp, nodes in ((2, 2), (8, 2)):
        workload, system, layout, _ = _qwen(cp, nodes, 4096, 64)
        plan = build_training_plan(workload, system, layout)
        assert step_lower_bound(plan) <= simulate_training(plan, 1).mean_step * (1 + 1e-9)


def test_search_finds_cp_where_cp_1_does_not_fit():
    # Qwen3-235B at 64k tokens on 256 H100 with the ModelZoo's long-context layout (TP4 PP8 VPP4
    # EP8, MBS 1, GBS 256, no full recompute): cp 1 and 2 keep too many activations; cp 4 fits.
    request = SearchRequest(
        "qwen3_235b_a22b_train_256xh100",
        ("train.seq_len=65536", "train.global_batch=256", "parallelism.zero_stage=1", "parallelism.recompute=selective",
         "parallelism.recompute_modules=[layernorm,moe]"),
        "dgx_h100_x128", (), "256",
        SearchSpace(tp=(4,), pp=(8,), vpp=(4,), ep=(8,), micro_batch=(1,), zero_stage=(1,), recompute=("none", "selective"),
                    overlap_moe_comm=(False,)), top=3)
    result = run_part(request)
    assert result.counts.candidates == 4  # cp 1, 2, 4, 8 by default at 64k tokens
    assert result.counts.unfit == 2
    assert {e.candidate.cp for e in result.simulated} == {4, 8}
    assert result.ranked[0].candidate.cp > 1 and "cp" in result.ranked[0].label


def test_short_sequences_keep_cp_1_in_the_default_space():
    request = SearchRequest(QWEN30, (), "dgx_h100_x8", (), "16",
                            SearchSpace(tp=(1,), pp=(1,), ep=(16,), micro_batch=(1,), zero_stage=(1,),
                                        overlap_moe_comm=(False,)), top=1)
    result = run_part(request)  # seq 4096: below the 8K where Megatron's guide places CP
    assert result.counts.candidates == 1 and result.ranked[0].candidate.cp == 1


def _simcc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sets,expected", [
    (("parallelism.cp=0",), "parallelism.cp"),
    (("parallelism.cp=two",), "parallelism.cp"),
    (("parallelism.cp=3", "train.seq_len=4104"), "tp x cp x pp = 3 does not divide"),  # 16 GPUs; seq divides 2 x 3
    (("parallelism.cp=4", "train.seq_len=4100"), "not a multiple of 8"),
    (("parallelism.cp=2", "model.blocks.1.blocks.0.attention.window=512"), "sliding"),
    (("parallelism.cp=2", "model.blocks.1.blocks.0.attention.impl=unfused"), "flash"),
])
def test_hostile_input_is_one_line_and_exit_2(sets, expected):
    result = _simcc("estimate", QWEN30, "--hardware", "dgx_h100_x8", "--set", "hardware.nodes=2",
                    *[arg for s in sets for arg in ("--set", s)])
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def test_serving_refuses_cp():
    result = _simcc("estimate", "mixtral_8x7b_serve_edge", "--hardware", "dgx_h100_x8", "--set", "parallelism.cp=2")
    assert result.returncode == 2 and "training" in result.stderr and len(result.stderr.strip().splitlines()) == 1
