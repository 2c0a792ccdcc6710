"""Parameter and FLOP counts against hand-derived values."""

from __future__ import annotations

import pytest

from simcc.model.blocks import Batch, Shard
from simcc.model.graph import model_forward_flops, model_params, stage_units, units_of
from simcc.model.kinds import attention, bitpattern, lstm
from simcc.specs.loader import load_workload
from simcc.specs.workload import AttentionBlock


def test_mixtral_parameter_counts(root):
    workload, _ = load_workload(str(root / "workloads/mixtral_8x7b_train_64xh100.yaml"))
    params = model_params(workload.model)
    d, L, f, vocab = 4096, 32, 14336, 32000
    attention = d * (32 + 2 * 8) * 128 + 32 * 128 * d  # q,k,v + out
    expert = 3 * d * f  # SwiGLU: gate, up, down
    norms_router = 2 * d + d * 8
    expected_total = L * (attention + 8 * expert + norms_router) + 2 * vocab * d + d
    assert params.total == expected_total == 46_702_792_704  # the released checkpoint's count
    assert params.total / 1e9 == pytest.approx(46.7, abs=0.05)  # Mixtral paper: 46.7B
    assert params.active / 1e9 == pytest.approx(12.9, abs=0.05)  # 12.9B active


def test_mixtral_forward_flops_match_megatron_formula(root):
    """Narayanan et al. 2021 appendix, with GQA and top-k experts: per token forward =
    4 L d^2 [ (1 + g/h + s/d) + 3/2 * 2 * k f/d + V/(2 L d) ] plus the router 2 d E per layer."""
    workload, _ = load_workload(str(root / "workloads/mixtral_8x7b_train_64xh100.yaml"))
    d, L, f, k, s, V, h, g, E = 4096, 32, 14336, 2, 4096, 32000, 32, 8, 8
    bracket = (1 + g / h + s / d) + 1.5 * 2 * k * f / d / 2 + V / (2 * L * d)
    expected = 4 * L * d * d * bracket + L * 2 * d * E
    got = model_forward_flops(workload.model, Batch(1, s, s)) / s
    assert got == pytest.approx(expected, rel=1e-9)


def test_dense_gpt_parameter_count(root):
    workload, _ = load_workload(str(root / "workloads/gpt_22b_dense_train_8xa100.yaml"))
    d, L, V = 6144, 48, 51200
    per_layer = 4 * d * d + 2 * d * 4 * d + 2 * d  # attention, FFN, two norms
    expected = L * per_layer + V * d + d  # tied head adds only its norm
    assert model_params(workload.model).total == pytest.approx(expected, rel=1e-12)


def test_causal_attention_executes_half_the_score_flops():
    spec = AttentionBlock(heads=8)
    batch = Batch(2, 1024, 1024)
    executed = attention.work(spec, 512, batch, Shard()).forward
    counted = attention.work(spec, 512, batch, Shard(executed=False)).forward
    core = lambda items: next(i.flops for i in items if i.name == "attn.core")  # noqa: E731
    assert core(executed) == pytest.approx(core(counted) / 2)
    assert core(counted) == pytest.approx(4 * 2 * 1024 * 1024 * 8 * 64)


def test_tensor_parallel_splits_gemm_flops():
    spec = AttentionBlock(heads=8)
    batch = Batch(1, 512, 512)
    one = sum(i.flops for i in attention.work(spec, 512, batch, Shard(tp=1)).forward if hasattr(i, "flops") and i.family == "gemm")
    four = sum(i.flops for i in attention.work(spec, 512, batch, Shard(tp=4)).forward if hasattr(i, "flops") and i.family == "gemm")
    assert four == pytest.approx(one / 4)


def test_pipeline_split_is_even_with_embedding_and_head_attached(root):
    workload, _ = load_workload(str(root / "workloads/mixtral_8x7b_train_64xh100.yaml"))
    units = units_of(workload.model)
    assert len(units) == 32
    assert units[0].blocks[0].kind == "embedding"
    assert units[-1].blocks[-1].kind == "lm_head"
    chunks = stage_units(units, 32)
    assert [len(c) for c in chunks] == [1] * 32
    assert [len(c) for c in stage_units(units, 5)] == [7, 7, 6, 6, 6]


def test_a_pipeline_layout_gives_each_chunk_its_layers_and_the_embedding_and_head_their_slots(root):
    """Megatron-style layout: 32 layers as [0, 11, 11, 10]: the first chunk holds only the
    embedding, the last its 10 layers and the LM head; blocks are neither lost nor repeated."""
    workload, _ = load_workload(str(root / "workloads/mixtral_8x7b_train_64xh100.yaml"))
    units = units_of(workload.model)
    chunks = stage_units(units, 4, [0, 11, 11, 10])
    assert [[b.kind for u in c for b in u.blocks].count("attention") for c in chunks] == [0, 11, 11, 10]
    assert [b.kind for u in chunks[0] for b in u.blocks] == ["embedding"]
    assert [b.kind for u in chunks[-1] for b in u.blocks][-1] == "lm_head"
    flat = [b.index for c in chunks for u in c for b in u.blocks]
    assert flat == [b.index for u in units for b in u.blocks]
    # a layout with a layer in every chunk keeps the embedding and head with the first and last layers
    assert [b.kind for u in stage_units(units, 2, [16, 16])[0] for b in u.blocks][:2] == ["embedding", "attention"]


@pytest.mark.parametrize("layout,message", [
    ("[8,8,8]", "expected pp x vpp = 4 entries"),
    ("[8,8,8,9]", "add up to 33 layers; the model has 32"),
    ("[16,0,0,16]", "chunk 1 would hold nothing"),
])
def test_a_pipeline_layout_that_does_not_fit_the_model_is_one_line(layout, message):
    from simcc.errors import InputError
    from simcc.layout import build_layout
    from simcc.specs.loader import load_hardware

    workload, src = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.pp=4", "parallelism.vpp=1", "parallelism.schedule=1f1b",
                                                                  f"parallelism.pipeline_layout={layout}"])
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        build_layout(workload, load_hardware("dgx_h100_x8"), src)


def test_an_uneven_layout_moves_the_step_and_memory_to_the_heavier_stage():
    """Qwen3-235B's 94 layers on 4 stages: [23, 24, 24, 23] is the even split; [0, 31, 32, 31]
    leaves the first rank the embedding alone, so the busiest stage runs 32 layers instead of 24
    and holds about 32/24 of the layers' weights (hand-derived proportions)."""
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware

    results = {}
    for layout in ("[23,24,24,23]", "[0,31,32,31]"):
        workload, src = load_workload("qwen3_235b_a22b_train_256xh100", ["parallelism.pp=4", f"parallelism.pipeline_layout={layout}"])
        results[layout] = estimate(workload, load_hardware("dgx_h100_x128", ["nodes=32"]), src)
    even, skewed = results["[23,24,24,23]"], results["[0,31,32,31]"]
    assert skewed.memory.weights_gb / even.memory.weights_gb == pytest.approx(32 / 24, rel=0.03)
    assert skewed.step.step_s > even.step.step_s * 1.15


def test_bitpattern_tree_stores_2_to_the_k_plus_1_minus_1_matrices():
    from simcc.specs.workload import BitPatternBlock

    tree, flat = BitPatternBlock(bits=6, tree=True), BitPatternBlock(bits=6, tree=False)
    assert bitpattern.matrices(tree) == 2**7 - 1 and bitpattern.matrices(flat) == 2**6
    assert bitpattern.params(tree, 64).expert == 127 * 64 * 64
    assert bitpattern.params(tree, 64).active_expert == 7 * 64 * 64
    batch = Batch(1, 1000, 1000)
    products = [i for i in bitpattern.work(tree, 64, batch, Shard(executed=False)).forward if i.name.startswith("bits.level")]
    assert len(products) == 6 + 1  # k + 1 products per token
    assert sum(p.flops for p in products) == pytest.approx(7 * 2 * 1000 * 64 * 64)
    flat_products = [i for i in bitpattern.work(flat, 64, batch, Shard()).forward if i.name.startswith("bits.level")]
    assert len(flat_products) == 1 and sum(flat_products[0].flops for _ in [0]) == pytest.approx(2 * 1000 * 64 * 64)


def test_capacity_to_computation_grows_exponentially_with_bits():
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware

    ratios = []
    for bits in (4, 8, 12):
        workload, src = load_workload("bitpattern_tree_mlp_train", [f"model.blocks.1.blocks.0.bitpattern.bits={bits}"])
        ratios.append(estimate(workload, load_hardware("rtx_4090"), src).model.params_per_token_flop)
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[2] / ratios[1] > 8  # ~2^4 more parameters for ~(13/9) more FLOPs


@pytest.mark.parametrize("workload, published_ops", [
    ("shazeer_moe_4096h_lstm_train", 8.9e6), ("shazeer_moe34m_lstm_train", 33.8e6), ("shazeer_moe143m_lstm_train", 142.7e6)])
def test_shazeer_ops_per_timestep_match_table_7(workload, published_ops):
    """Shazeer et al. 2017, table 7 'ops/timestep' (multiply-adds, softmax and embedding left out):
    MoE-143M = 2 LSTMP(4096 -> 1024) x (4*4096*(1024+1024) + 4096*1024) + 4 experts x 2*1024*8192
    + gates; the LSTMP's per-step projection is what brings it to the published figure. The
    8192-class output layer (hidden x 8192 multiply-adds per token) is taken off by hand."""
    spec, _ = load_workload(workload)
    steps = 20
    softmax = spec.model.hidden * 8192
    macs = model_forward_flops(spec.model, Batch(1, steps, steps)) / 2 / steps - softmax
    assert macs == pytest.approx(published_ops, rel=0.006)


def test_lstm_projection_shrinks_the_recurrent_product_and_adds_its_own():
    from simcc.specs.workload import LSTMBlock

    plain, projected = LSTMBlock(hidden=4096, input_size=1024), LSTMBlock(hidden=4096, input_size=1024, projection=1024)
    assert lstm.params(plain, 1024).dense == 4 * 4096 * (1024 + 4096)
    assert lstm.params(projected, 1024).dense == 4 * 4096 * (1024 + 1024) + 4096 * 1024
    ops = {op.name: op for op in lstm.work(projected, 1024, Batch(8, 20, 20), Shard(dtype="fp32")).forward}
    assert ops["lstm.recurrent"].flops == 2 * 8 * 1024 * 4 * 4096 * 20 and ops["lstm.recurrent"].launches == 20
    assert ops["lstm.projection"].flops == 2 * 8 * 4096 * 1024 * 20 and ops["lstm.projection"].launches == 20


def _moe_items(tp: int, sp: bool, ep: int, etp: int, shared: int = 0) -> dict:
    from simcc.model.kinds import moe_ffn
    from simcc.specs.blocks import MoEFFNBlock

    spec = MoEFFNBlock(experts=8, k=2, expert_hidden=1024, shared_experts=shared,
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1})
    work = moe_ffn.work(spec, 512, Batch(1, 4096, 4096),
                        Shard(tp=tp, sequence_parallel=sp, ep=ep, expert_tp=etp, executed=False))
    return {item.name: item for item in work.forward}


def test_sequence_parallel_ranks_route_only_their_shard():
    """Megatron-Core: under SP each TP rank routes its s/tp tokens; at TP2/ETP1 the experts see
    half the tokens a TP1 rank's do, and the all-to-all carries half the bytes."""
    whole, split = _moe_items(1, False, 4, 1), _moe_items(2, True, 4, 1)
    assert split["moe.dispatch"].bytes == pytest.approx(whole["moe.dispatch"].bytes / 2)
    assert split["moe.dispatch"].bytes == pytest.approx(4096 / 2 * 2 * 512 * 2)  # T/tp tokens x k copies x hidden x bf16
    assert split["moe.expert_up"].flops == pytest.approx(whole["moe.expert_up"].flops / 2)
    assert split["moe.router"].flops == pytest.approx(whole["moe.router"].flops / 2)
    assert "moe.tp_gather" not in split and "moe.tp_reduce" not in split  # no TP collective without a shared expert


def test_expert_tp_gathers_what_its_ranks_received():
    items = _moe_items(2, True, 4, 2)
    routed = 4096 / 2 * 2 * 4 / 4  # each rank's T/tp tokens x k, spread evenly over 4 EP ranks
    gathered = routed * 2  # the ETP pair's shards
    assert items["moe.expert_tp_gather"].collective == "all_gather" and items["moe.expert_tp_gather"].group == "etp"
    assert items["moe.expert_tp_gather"].bytes == pytest.approx(gathered * 512 * 2)
    assert items["moe.expert_tp_reduce"].collective == "reduce_scatter"
    assert items["moe.expert_up"].flops == pytest.approx(2 * gathered * 512 * 1024 / 2)  # each ETP rank half the width


def test_a_shared_expert_keeps_its_tensor_parallel_collectives_under_sp():
    items = _moe_items(2, True, 4, 1, shared=1)
    assert items["moe.shared_tp_gather"].bytes == pytest.approx(4096 * 512 * 2)
    assert items["moe.tp_reduce"].collective == "reduce_scatter"
    assert items["moe.shared_up"].flops == pytest.approx(2 * 4096 * 512 * 1024 / 2)


def _mla(**kw):
    from simcc.specs.blocks import MLABlock

    base = dict(heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    base.update(kw)
    return MLABlock(**base)


def test_mla_parameters_match_deepseek_v3_by_hand():
    """DeepSeek-V3's attention (hidden 7168): W_DQ 7168x1536, W_UQ 1536x(128x192), W_DKV 7168x576,
    W_UKV 512x(128x256), W_O (128x128)x7168, RMSNorm scales 1536 + 512 + 7168: 187.1M per layer; the model
    has 671B parameters, 37.5B active (report: 671B and 37B)."""
    from simcc.model.kinds import mla

    p = mla.params(_mla(), 7168)
    weights = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert p.dense + p.replicated == weights + 1536 + 512 + 7168  # RMSNorm scales: q, kv and the input norm
    assert p.replicated == 7168 * 1536 + 7168 * 576 + 1536 + 512 + 7168  # down-projections unsplit by TP
    workload, _ = load_workload("deepseek_v3_shape_train")
    params = model_params(workload.model)
    assert params.dense + params.replicated + params.expert == pytest.approx(671e9, rel=0.005)


def test_mla_forward_flops_and_tensor_parallel_split_by_hand():
    """Prefill of 4096 tokens: projections 2 x tokens x weights; attention scores over 192-wide keys
    and 128-wide values, 2 x s^2 x heads x (192 + 128), halved for causal; TP 8 splits the per-head
    work and the output, not the down-projections."""
    from simcc.model.kinds import mla

    spec, T = _mla(), 4096
    one = mla.work(spec, 7168, Batch(1, T, T), Shard())
    flops = {op.name: op.flops for op in one.forward if hasattr(op, "flops")}
    assert flops["mla.q_down"] == 2 * T * 7168 * 1536
    assert flops["mla.kv_up"] == 2 * T * 512 * 128 * 256
    assert flops["mla.core"] == pytest.approx(2 * T * T * 128 * (192 + 128) * 0.5)
    eight = {op.name: op.flops for op in mla.work(spec, 7168, Batch(1, T, T), Shard(tp=8)).forward if hasattr(op, "flops")}
    assert eight["mla.q_down"] == flops["mla.q_down"] and eight["mla.kv_down"] == flops["mla.kv_down"]
    for name in ("mla.q_up", "mla.kv_up", "mla.out", "mla.core"):
        assert eight[name] == pytest.approx(flops[name] / 8)


def test_mla_decode_reads_the_latent_cache_not_every_heads_keys():
    """A decode step attends over the cached latent (512 + 64 values a token, whichever the heads):
    at 4096 cached tokens it reads 4096 x 576 x 2 bytes per sequence for the cache, about 1/57 of
    what 128 heads' 192 + 128 wide keys and values would be; serving keeps 576 values a token per
    layer on every TP rank."""
    from simcc.model.kinds import mla

    spec = _mla()
    core = next(op for op in mla.work(spec, 7168, Batch(1, 1, 4096), Shard()).forward if op.name == "mla.core")
    q_and_out = 128 * 192 * 2 + 128 * 128 * 2
    assert core.bytes == pytest.approx(4096 * 576 * 2 + q_and_out)
    assert core.flops == pytest.approx(2 * 4096 * 128 * (576 + 512))
    assert mla.latent_cache_on_device(spec, 7168, "bf16", 8) == 576 * 2


def test_rotary_embedding_and_the_serving_cache_write_by_hand():
    """Attention with RoPE rotates each token's local query and key values once (TP 2: 16 of 32
    query heads and 4 of 8 key heads, 128 wide: 2,560 values a token), read and written in bf16,
    nothing kept; a serving step also copies each new token's local K and V (2 x 4 x 128 values)
    into the cache, a training step does not. Learned positions (rotary: false) have no rope op.
    MLA rotates its local heads' 64-wide RoPE queries and the one shared RoPE key, and caches the
    latent and that key (512 + 64 values a token)."""
    from simcc.model.kinds import mla

    spec = AttentionBlock(heads=32, kv_heads=8, head_dim=128)
    tokens = 3 * 5

    def ops(block, batch, shard=Shard(tp=2), kind=attention, hidden=4096):
        return {op.name: op for op in kind.work(block, hidden, batch, shard).forward if hasattr(op, "flops")}

    trained = ops(spec, Batch(3, 5, 5))
    rope = trained["attn.rope"]
    assert rope.bytes == pytest.approx(2 * tokens * (16 + 4) * 128 * 2)
    assert rope.saved_bytes == 0 and rope.launches == 1
    assert "attn.kv_write" not in trained
    served = ops(spec, Batch(3, 5, 5, caches_kv=True))
    assert served["attn.kv_write"].bytes == pytest.approx(2 * tokens * 2 * 4 * 128 * 2)
    assert served["attn.kv_write"].flops == 0
    assert "attn.rope" not in ops(AttentionBlock(heads=32, kv_heads=8, head_dim=128, rotary=False), Batch(3, 5, 5))
    latent = ops(_mla(), Batch(1, 1, 64, caches_kv=True), Shard(tp=8), mla, 7168)
    assert latent["mla.rope"].bytes == pytest.approx(2 * (128 / 8 + 1) * 64 * 2)
    assert latent["mla.kv_write"].bytes == pytest.approx(2 * (512 + 64) * 2)


def test_an_mla_model_serves_with_its_latent_cache():
    from simcc.layout import build_layout
    from simcc.plan.serving import serving_costs
    from simcc.specs.loader import load_hardware

    workload, src = load_workload("mixtral_8x7b_serve_edge", [
        "model.blocks.1.blocks.0={mla: {heads: 32, kv_lora_rank: 512, qk_nope_head_dim: 128, qk_rope_head_dim: 64, v_head_dim: 128}}"])
    system = load_hardware("h200", ["memory_gb=200"])
    costs = serving_costs(workload, system, build_layout(workload, system, src))
    assert costs.kv_bytes_per_token == 32 * 576 * 2  # 32 layers of latent + RoPE key, fp16


MTP_BLOCKS = """    - lm_head: {vocab: 129280}
    - embedding: {vocab: 129280}
    - mlp: {widths: [14336, 7168]}
    - mla: {heads: 128, q_lora_rank: 1536, kv_lora_rank: 512}
    - moe_ffn: {experts: 256, k: 8, expert_hidden: 2048, shared_experts: 1, gated: true, activation: swiglu}
    - lm_head: {vocab: 129280}
"""


def test_a_multi_token_prediction_module_is_expressed_with_blocks(root, tmp_path):
    """DeepSeek-V3's MTP module (report sec. 2.2) as blocks after the main head: the next token's
    embedding, the 2h -> h projection, one MLA + MoE layer and a head. The parameters come to the
    685B the model card gives for the checkpoint with MTP (671B main + 14B MTP, which keeps its
    own embedding and head copies); the module is one more pipeline unit of each kind."""
    text = (root / "workloads/deepseek_v3_shape_train.yaml").read_text()
    path = tmp_path / "mtp.yaml"
    path.write_text(text.replace("    - lm_head: {vocab: 129280}\n", MTP_BLOCKS))
    workload, _ = load_workload(str(path))
    params = model_params(workload.model)
    assert (params.dense + params.replicated + params.expert) / 1e9 == pytest.approx(685, rel=0.002)
    assert [b.kind for b in units_of(workload.model)[-1].blocks] == ["moe_ffn", "lm_head"]


def test_sequence_parallel_backward_gathers_the_saved_shard_again():
    """Korthikanti et al. 2022, sec. 4.2.2: the column-parallel GEMM after an SP all-gather keeps its
    input's shard; its backward all-gathers it again for the weight gradient and reduce-scatters
    the data gradient, two collectives of the forward's size where plain TP has one all-reduce."""
    from simcc.costs.collectives import collective_time
    from simcc.layout import build_layout
    from simcc.model.kinds._shared import tp_entry, tp_exit
    from simcc.plan.training import _backward_cost
    from simcc.specs.loader import load_hardware

    system = load_hardware("dgx_a100_x1")
    workload, src = load_workload("gpt_22b_dense_train_8xa100", ["parallelism.sequence_parallel=true"])
    layout = build_layout(workload, system, src)
    shard = Shard(tp=8, sequence_parallel=True)
    gather = tp_entry("ffn.tp_gather", 2048 * 4, 6144, shard)[0]
    size = 2048 * 4 * 6144 * 2
    one = collective_time("all_gather", size, layout.groups["tp"], system)
    assert gather.regathered and _backward_cost(gather, system, layout).seconds == pytest.approx(2 * one)
    assert _backward_cost(gather, system, layout).bytes == pytest.approx(2 * size)
    scatter = tp_exit("ffn.tp_reduce", 2048 * 4, 6144, shard)[0]
    assert _backward_cost(scatter, system, layout).seconds == pytest.approx(one)  # its backward: one all-gather
