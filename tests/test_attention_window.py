"""Sliding-window attention, StreamingLLM sink tokens and GPT-OSS learned sinks in the attention kind:
pair counts derived by hand, the layer's FLOPs and bytes, the serving KV cache, the shipped GPT-OSS
workloads, and hostile inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simcc.layout import build_layout
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds.attention import attended_pairs, keys_read, params, window_share, work
from simcc.plan.serving import serving_costs
from simcc.specs.blocks import AttentionBlock
from simcc.specs.loader import load_hardware, load_workload

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 2, 64
PER_PAIR = 4.0 * HEADS * HEAD_DIM  # QK^T and PV: 2 x (2 FLOPs per multiply-add) x head_dim, per head

SERVE = "gpt_oss_120b_serve_h100"
WINDOWED = "model.blocks.1.blocks.0.attention"  # the first attention block of the repeat (window 128)
FULL = "model.blocks.1.blocks.2.attention"  # the second (full attention)


def _spec(**fields) -> AttentionBlock:
    return AttentionBlock(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, **fields)


def _core(spec: AttentionBlock, batch: Batch, executed: bool = True):
    ops = work(spec, HIDDEN, batch, Shard(executed=executed)).forward
    return next(op for op in ops if op.name == "attn.core")


def _brute_pairs(q_len: int, kv_len: int, window: int | None, sinks: int) -> int:
    """Enumerate the mask as gpt-oss's reference builds it (causal triu, then a tril band of
    -window), with the first `sinks` keys left open."""
    return sum(1 for i in range(kv_len - q_len, kv_len) for j in range(i + 1)
               if window is None or i - j < window or j < sinks)


def test_pair_counts_by_hand():
    # s = 8, w = 3: queries 0, 1, 2 see 1 + 2 + 3 = 6 = 3*4/2 keys; the 5 later ones 3 each: 6 + 15 = 21.
    assert attended_pairs(8, 8, 3) == 21
    assert attended_pairs(8, 8) == 36  # full causal: 8*9/2
    # Two sinks: the queries at m = i + 1 = 4..8 add min(2, m - 3) = 1, 2, 2, 2, 2 = 9 pairs.
    assert attended_pairs(8, 8, 3, 2) == 21 + 9
    # Decode over 100 cached positions, window 10, 4 sinks: 10 window keys + 4 sinks.
    assert attended_pairs(1, 100, 10, 4) == 14
    assert keys_read(1, 100, 10, 4) == 14
    # A 4-token chunk at the end of 20 positions, window 5: 5 each; keys reached: 4 + 5 - 1 = 8.
    assert attended_pairs(4, 20, 5) == 20
    assert keys_read(4, 20, 5) == 8


@pytest.mark.parametrize("window", [None, 1, 2, 3, 5, 8, 40])
@pytest.mark.parametrize("sinks", [0, 1, 3, 50])
def test_closed_form_matches_the_enumerated_mask(window, sinks):
    if window is None and sinks:
        return
    for kv_len in range(1, 25):
        for q_len in range(1, kv_len + 1):
            assert attended_pairs(q_len, kv_len, window, sinks) == _brute_pairs(q_len, kv_len, window, sinks)
            reached = {j for i in range(kv_len - q_len, kv_len) for j in range(i + 1)
                       if window is None or i - j < window or j < sinks}
            assert keys_read(q_len, kv_len, window, sinks) == len(reached)


def test_windowed_layer_flops_follow_the_pair_count():
    batch = Batch(1, 8, 8)
    # Executed flash work: the causal convention's half square (32 pairs) scaled by 21/36.
    assert _core(_spec(window=3), batch).flops == pytest.approx(PER_PAIR * 8 * 8 * 0.5 * 21 / 36)
    # Model FLOPs (reporting convention: the full square) keep the same share.
    assert _core(_spec(window=3), batch, executed=False).flops == pytest.approx(PER_PAIR * 64 * 21 / 36)
    # Decode over 100 positions with a 10-token window: exactly 10 pairs per head, and only the
    # window's K and V are read (2 kv heads x 64 x 2 bytes, K and V).
    core = _core(_spec(window=10), Batch(1, 1, 100))
    assert core.flops == pytest.approx(PER_PAIR * 10)
    q_bytes = HEADS * HEAD_DIM * 2
    assert core.bytes == pytest.approx(2 * q_bytes + 10 * KV_HEADS * HEAD_DIM * 2 * 2)


def test_unfused_attention_multiplies_the_whole_rows_and_masks():
    batch = Batch(1, 8, 8)
    ops = {op.name: op for op in work(_spec(window=3, impl="unfused"), HIDDEN, batch, Shard()).forward}
    assert ops["attn.scores"].flops + ops["attn.context"].flops == pytest.approx(PER_PAIR * 64)
    decode = {op.name: op for op in work(_spec(window=10, impl="unfused"), HIDDEN, Batch(1, 1, 100), Shard()).forward}
    assert decode["attn.scores"].flops + decode["attn.context"].flops == pytest.approx(PER_PAIR * 10)


@pytest.mark.parametrize("impl", ["flash", "unfused"])
@pytest.mark.parametrize("batch", [Batch(2, 8, 8), Batch(3, 1, 8)])
def test_a_window_at_least_the_context_is_full_causal_attention(impl, batch):
    full = work(_spec(impl=impl), HIDDEN, batch, Shard()).forward
    for window in (8, 100):
        assert work(_spec(window=window, impl=impl), HIDDEN, batch, Shard()).forward == full
        assert work(_spec(window=window, impl=impl), HIDDEN, batch, Shard(executed=False)).forward == \
            work(_spec(impl=impl), HIDDEN, batch, Shard(executed=False)).forward
    assert params(_spec(window=8), HIDDEN) == params(_spec(), HIDDEN)


def test_a_wider_window_scores_more_pairs():
    shares = [window_share(_spec(window=w), 64, 64) for w in range(1, 66)]
    assert all(a < b for a, b in zip(shares, shares[1:64]))
    assert shares[0] == pytest.approx(64 / (64 * 65 / 2)) and shares[63] == shares[64] == 1.0


def test_sinks_add_exactly_the_derived_pairs():
    # Decode: 4 sink keys beyond a 10-token window add 4 pairs per head.
    with_sinks = _core(_spec(window=10, sink_tokens=4), Batch(1, 1, 100)).flops
    assert with_sinks - _core(_spec(window=10), Batch(1, 1, 100)).flops == pytest.approx(PER_PAIR * 4)
    # Training over 8 positions, window 3, 2 sinks: 30 of 36 causal pairs (9 sink pairs, above).
    assert _core(_spec(window=3, sink_tokens=2), Batch(1, 8, 8), executed=False).flops == \
        pytest.approx(PER_PAIR * 64 * 30 / 36)


def test_learned_sinks_add_one_parameter_and_one_logit_per_head():
    plain, sinks = params(_spec(), HIDDEN), params(_spec(learned_sinks=True), HIDDEN)
    assert sinks.dense - plain.dense == HEADS
    assert sinks.tensors - plain.tensors == 1
    batch = Batch(2, 8, 8)  # 16 queries x 8 heads, an exp and an add each
    assert _core(_spec(learned_sinks=True), batch).flops - _core(_spec(), batch).flops == pytest.approx(2 * 16 * HEADS)
    # The reporting convention counts matmul FLOPs only.
    assert _core(_spec(learned_sinks=True), batch, executed=False).flops == _core(_spec(), batch, executed=False).flops


def test_qk_norm_adds_two_head_wide_norms_and_their_kernels():
    """QK-norm (Qwen3): a head_dim-wide RMSNorm weight for queries and one for keys, replicated;
    per layer two kernels reading and writing each token's local queries and keys (TP 2: 4 of the 8
    query heads, 1 of the 2 key heads), each keeping its input for the backward pass."""
    plain, normed = params(_spec(), HIDDEN), params(_spec(qk_norm=True), HIDDEN)
    assert normed.replicated - plain.replicated == 2 * HEAD_DIM
    assert normed.tensors - plain.tensors == 2 and normed.dense == plain.dense
    tokens = 2 * 8
    ops = work(_spec(qk_norm=True), HIDDEN, Batch(2, 8, 8), Shard(tp=2)).forward
    op = next(op for op in ops if op.name == "attn.qk_norm")
    elements = tokens * (HEADS // 2 + KV_HEADS // 2) * HEAD_DIM
    assert op.launches == 2
    assert op.bytes == pytest.approx(2 * elements * 2)  # read and write, bf16
    assert op.saved_bytes == pytest.approx(elements * 2)
    assert [o.name for o in ops].index("attn.qk_norm") == [o.name for o in ops].index("attn.qkv") + 1
    assert all(o.name != "attn.qk_norm" for o in work(_spec(), HIDDEN, Batch(2, 8, 8), Shard(tp=2)).forward)


def _serving(overrides: list[str]):
    workload, src = load_workload(SERVE, overrides)
    system = load_hardware("h100_sxm", [])
    return workload, serving_costs(workload, system, build_layout(workload, system, src))


def test_serving_kv_cache_stops_at_the_window_and_sinks():
    # gpt-oss-120b: 18 windowed and 18 full layers, each caching K and V of 8 heads x 64 in bf16:
    # 2 x 8 x 64 x 2 = 2,048 bytes per token per layer. A request of 8,192 + 1,024 tokens keeps
    # 18 x 2,048 x 9,216 in the full layers and 18 x 2,048 x 128 in the windowed ones.
    workload, costs = _serving([])
    tokens = workload.serve.prompt_tokens + workload.serve.output_tokens
    per_layer = 2 * 8 * 64 * 2
    assert costs.kv_bytes_per_token == 36 * per_layer
    assert costs.kv_bytes(tokens) == pytest.approx(18 * per_layer * tokens + 18 * per_layer * 128)
    assert costs.memory.kv_cache == pytest.approx(workload.serve.batch * costs.kv_bytes(tokens))
    assert costs.kv_bytes(100) == 36 * per_layer * 100  # shorter than the window: every token kept
    _, sinks = _serving([f"{WINDOWED}.sink_tokens=4"])
    assert sinks.kv_bytes(tokens) - costs.kv_bytes(tokens) == pytest.approx(18 * per_layer * 4)
    _, full = _serving([f"{WINDOWED}.window=null"])
    assert full.kv_bytes(tokens) == pytest.approx(36 * per_layer * tokens)
    assert full.memory.kv_cache > 1.9 * costs.memory.kv_cache


def test_decode_is_faster_with_a_window_over_a_long_context():
    long = ["serve.batch=1", "serve.prompt_tokens=65536", "serve.output_tokens=64"]
    _, windowed = _serving(long)
    _, full = _serving([*long, f"{WINDOWED}.window=null"])
    assert windowed.decode.at(1) < full.decode.at(1)
    _, all_windowed = _serving([*long, f"{FULL}.window=128"])
    assert all_windowed.decode.at(1) < windowed.decode.at(1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("workload, hardware, section, params_b", [
    (SERVE, "h100_sxm", "latency", 116.83),  # the model card's totals
    ("gpt_oss_20b_train_8xh100", "dgx_h100_x1", "step", 20.91),
])
def test_the_shipped_gpt_oss_workloads_estimate(workload, hardware, section, params_b):
    done = _cli("estimate", workload, "--hardware", hardware, "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["memory"]["fits"] is True
    assert section in result
    assert result["model"]["params_b"] == pytest.approx(params_b, rel=0.005)


@pytest.mark.parametrize("setting, words", [
    (f"{WINDOWED}.window=0", ["window", "greater than 0"]),
    (f"{WINDOWED}.window=-1", ["window", "greater than 0"]),
    (f"{WINDOWED}.window=99999999999", ["window", "less than or equal"]),
    (f"{FULL}.sink_tokens=4", ["sink_tokens", "window"]),
    (f"{WINDOWED}.sink_tokens=-1", ["sink_tokens"]),
    (f"{WINDOWED}.causal=false", ["window", "causal"]),
    (f"{WINDOWED}.qk_norm=maybe", ["qk_norm", "boolean"]),
    (f"{WINDOWED}.rotary=sometimes", ["rotary", "boolean"]),
])
def test_hostile_window_settings_give_one_line(setting, words):
    done = _cli("estimate", SERVE, "--hardware", "h100_sxm", "--set", setting)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert all(word in lines[0] for word in words), lines[0]
