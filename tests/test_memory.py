"""Memory per device against hand-derived values."""

from __future__ import annotations

import pytest

from simcc.model.ops import Op

from simcc.costs.memory import in_flight_microbatches, optimizer_state_bytes, training_memory
from simcc.layout import build_layout
from simcc.model.blocks import Params, kv_cache_bytes_per_token
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import AttentionBlock


def _setup(overrides):
    # one sequence per micro-batch, whatever the shipped run uses, so that b = 1 below
    workload, src = load_workload("gpt_22b_dense_train_8xa100", ["parallelism.micro_batch=1", *overrides])
    system = load_hardware("dgx_a100_x1")
    return workload, system, build_layout(workload, system, src)


def test_mixed_precision_adam_is_16_bytes_per_parameter_without_zero():
    workload, system, layout = _setup(["precision.weights=bf16", "precision.gradients=bf16", "precision.compute=bf16",
                                       "parallelism.tp=1", "model.blocks.1.repeat=1", "train.global_batch=8"])
    params = Params(dense=1e9)
    memory = training_memory(workload, system, layout, params, 0.0, 0.0)
    assert memory.weights + memory.gradients + memory.optimizer == pytest.approx(16e9)


def test_zero_stages_shard_state_over_data_parallel_ranks():
    common = ["precision.weights=bf16", "precision.gradients=bf16", "parallelism.tp=1", "train.global_batch=8"]
    params = Params(dense=1e9)
    totals = {}
    for stage in (0, 1, 2, 3):
        workload, system, layout = _setup(common + [f"parallelism.zero_stage={stage}"])
        assert layout.dp == 8
        m = training_memory(workload, system, layout, params, 0.0, 0.0)
        totals[stage] = (m.weights, m.gradients, m.optimizer)
    assert totals[0] == pytest.approx((2e9, 2e9, 12e9))
    assert totals[1] == pytest.approx((2e9, 2e9, 12e9 / 8))
    assert totals[2] == pytest.approx((2e9, 2e9 / 8, 12e9 / 8))
    assert totals[3] == pytest.approx((2e9 / 8, 2e9 / 8, 12e9 / 8))


def test_factored_optimizer_keeps_rows_plus_columns():
    workload, system, layout = _setup(["optimizer.type=adafactor", "optimizer.master_weights=false", "parallelism.tp=1",
                                       "train.global_batch=8"])
    params = Params(dense=4096 * 1024, dense_rows_cols=4096 + 1024)
    assert optimizer_state_bytes(params, workload, layout) == pytest.approx(4 * (4096 + 1024))


def test_in_flight_microbatches_by_schedule():
    workload, src = load_workload("mixtral_8x7b_train_64xh100")
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, src)  # p=4, v=8, m=16
    assert in_flight_microbatches(workload, layout) == pytest.approx(4 + 3 / 8)
    w1, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.vpp=1", "parallelism.schedule=1f1b"])
    assert in_flight_microbatches(w1, build_layout(w1, system, src)) == 4
    w2, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.vpp=1", "parallelism.schedule=gpipe"])
    assert in_flight_microbatches(w2, build_layout(w2, system, src)) == 16


def test_later_pipeline_ranks_warm_up_fewer_micro_batches():
    """Megatron-Core's schedules: 1F1B rank r runs p - r - 1 warm-up forwards, interleaved rank r
    2(p - r - 1) + (v - 1)p chunk forwards; each holds those and one more at its peak."""
    workload, src = load_workload("mixtral_8x7b_train_64xh100")
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, src)  # p=4, v=8, m=16
    # rank 3 (last): 0 + 7 x 4 + 1 = 29 chunk forwards of 8 chunks a micro-batch
    assert [in_flight_microbatches(workload, layout, r) for r in range(4)] == pytest.approx([35 / 8, 33 / 8, 31 / 8, 29 / 8])
    w1, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.vpp=1", "parallelism.schedule=1f1b"])
    assert [in_flight_microbatches(w1, build_layout(w1, system, src), r) for r in range(4)] == [4, 3, 2, 1]


def test_ep_overlap_holds_one_layer_more_not_a_micro_batch():
    """The merged forward/backward pair frees a layer of the older micro-batch for each layer the
    newer one keeps: the peak rises by the largest layer's activations (hand-derived from the
    footprint), not by another micro-batch (which would have put a 16-H100 Qwen3-30B run that
    fits in 80 GB at 102 GB)."""
    from simcc.estimate import _run, SimulationOptions
    from simcc.plan.training import chunk_works, stage_footprints

    system = load_hardware("dgx_h100_x4", ["nodes=2"])
    held = {}
    for overlap in (False, True):
        workload, src = load_workload("qwen3_30b_a3b_train_16xh100", [f"parallelism.overlap_moe_comm={overlap}"])
        layout = _run(workload, system, src, SimulationOptions()).layout
        (params, saved, buffers, unit_saved), = stage_footprints(workload, layout, chunk_works(workload, layout))
        held[overlap] = training_memory(workload, system, layout, params, saved, buffers, unit_saved).activations
        assert 0 < unit_saved < saved / 40  # 48 MoE layers and 48 attention layers share the stage
    assert held[True] - held[False] == pytest.approx(unit_saved)
    assert held[False] == pytest.approx(saved)  # pp = 1: one micro-batch in flight without overlap


def test_kv_cache_bytes_per_token():
    spec = AttentionBlock(heads=32, kv_heads=8, head_dim=128)
    assert kv_cache_bytes_per_token(spec, 4096, "bf16") == 2 * 8 * 128 * 2


def test_full_recompute_keeps_less_activation_memory():
    from simcc.estimate import estimate

    system = load_hardware("dgx_h100_x8")
    mem = {}
    for policy in ("none", "selective", "full"):
        workload, src = load_workload("mixtral_8x7b_train_64xh100", [f"parallelism.recompute={policy}"])
        mem[policy] = estimate(workload, system, src).memory.activations_gb
    assert mem["full"] < mem["selective"] <= mem["none"]


@pytest.mark.parametrize("sets, per_layer_sbh_over_t, keeps_scores", [
    (["parallelism.recompute=none", "parallelism.sequence_parallel=false"], 10 * 8 + 24 - 2 * 8, True),
    (["parallelism.recompute=none", "parallelism.sequence_parallel=true"], 34 - 2, True),
    (["parallelism.recompute=selective", "parallelism.sequence_parallel=true"], 34 - 2, False),
])
def test_saved_activations_per_layer_follow_korthikanti_table_2(sets, per_layer_sbh_over_t, keeps_scores):
    """Korthikanti et al. 2022, table 2, per layer in bytes: tensor parallel sbh(10 + 24/t + 5as/ht);
    with sequence parallelism sbh(34/t + 5as/ht); selective recomputation drops the 5as/ht score
    terms. Less the two hidden-dropout masks (sbh/t each with SP, sbh without), not modelled."""
    from simcc.plan.training import chunk_works

    def saved(layers: int) -> float:
        workload, src = load_workload("gpt_22b_dense_train_8xa100",
                                      ["parallelism.micro_batch=1", *sets, f"model.blocks.1.repeat={layers}"])
        return chunk_works(workload, build_layout(workload, load_hardware("dgx_a100_x1"), src))[0].saved_bytes

    s, b, h, a, t = 2048, 1, 6144, 64, 8
    expected = (s * b * h / t) * per_layer_sbh_over_t + (5 * a * s * s * b / t if keeps_scores else 0.0)
    assert saved(3) - saved(2) == pytest.approx(expected, rel=1e-9)


def test_sparse_embedding_gradients_are_touched_rows_not_a_table():
    """TF's IndexedSlices: a sparse embedding's gradient is the rows a step touched (gathered over
    data-parallel replicas), a transient buffer; the dense gradient buffer leaves the table out."""
    from simcc.estimate import estimate

    def memory(sparse: bool):
        spec, src = load_workload("shazeer_4xlstm512_train", [f"model.blocks.0.embedding.sparse_gradients={str(sparse).lower()}"])
        return estimate(spec, load_hardware("k40_x16"), src).memory

    dense, sparse = memory(False), memory(True)
    table_gb = 793471 * 512 * 4 / 1e9
    assert dense.gradients_gb - sparse.gradients_gb == pytest.approx(table_gb, rel=1e-6)
    assert 0 < sparse.buffers_gb < table_gb  # 16 replicas' touched rows, well under the table


def test_relu_keeps_no_copy_of_its_own_but_gelu_and_swiglu_do():
    """ReLU's output is both its gradient's input and the down projection's saved input: one tensor.
    GeLU needs its input (another s x 4h tensor; Korthikanti 2022 counts 8sbh for it), SwiGLU both halves."""
    from simcc.model.blocks import Batch, Shard, dense_ffn_work
    from simcc.specs.workload import DenseFFNBlock

    def saved(**kw) -> float:
        work = dense_ffn_work(DenseFFNBlock(hidden=4096, **kw), 1024, Batch(2, 512, 512), Shard(dtype="bf16"))
        return sum(op.saved_bytes for op in work.forward if hasattr(op, "saved_bytes"))

    tokens, wide = 2 * 512, 4096 * 2  # bf16 bytes per element
    assert saved(activation="gelu") - saved(activation="relu") == pytest.approx(tokens * wide)
    # SwiGLU: the up GEMM is twice as wide; its two halves kept, and the product the down GEMM keeps
    assert saved(activation="swiglu", gated=True) - saved(activation="relu") == pytest.approx(2 * tokens * wide)


def _moe_activations(modules: list[str]) -> tuple[float, float]:
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    workload, src = load_workload("qwen3_30b_a3b_train_16xh100", [f"parallelism.recompute_modules=[{','.join(modules)}]"])
    result = estimate(workload, load_hardware("dgx_h100_x4", ["nodes=2"]), src)
    return result.memory.activations_gb, result.step.step_s


def test_recompute_modules_free_what_they_rebuild_by_hand():
    """Qwen3-30B-A3B (48 MoE layers, top-8, expert width 768, hidden 2048, one 4096-token sequence
    per micro-batch, bf16): moe_act frees the down projections' inputs, 4096 x 8 x 768 x 2 bytes a
    layer on an average rank (the busiest takes ~4% more); expert_hidden also frees the up
    projections' gated outputs, twice as wide; layernorm frees two 4096 x 2048 norm outputs a layer.
    Each replays its ops, so the step grows."""
    plain, plain_step = _moe_activations([])
    act, act_step = _moe_activations(["moe_act"])
    hidden, _ = _moe_activations(["expert_hidden"])
    norms, _ = _moe_activations(["layernorm"])
    per_layer_down = 4096 * 8 * 768 * 2  # pp 1: one micro-batch's activations at the peak
    assert (plain - act) * 1e9 == pytest.approx(48 * per_layer_down, rel=0.06)
    assert (plain - hidden) * 1e9 == pytest.approx(48 * per_layer_down * 3, rel=0.06)
    assert (plain - norms) * 1e9 == pytest.approx(48 * 2 * 4096 * 2048 * 2, rel=0.01)
    assert act_step > plain_step


def test_gate_weights_applied_in_the_activation_keep_no_expert_outputs():
    """Qwen3-30B-A3B on EP16: a combine that scales the expert outputs by their gate weights keeps
    the outputs for the weights' gradient, 4096 tokens x 8 copies x 2048 x 2 bytes a layer;
    Megatron-Core scales the activation instead and keeps each copy's fp32 weight (4096 x 8 x 4
    bytes on an average rank, the busiest ~4% more). Memory only: the step is the same."""
    from simcc.estimate import estimate

    def run(where):
        workload, src = load_workload("qwen3_30b_a3b_train_16xh100",
                                      [f"model.blocks.1.blocks.1.moe_ffn.routing.gate_weights_applied={where}"])
        return estimate(workload, load_hardware("dgx_h100_x4", ["nodes=2"]), src)

    combine, activation = run("combine"), run("activation")
    per_layer = 4096 * 8 * 2048 * 2 - 4096 * 8 * 4
    assert (combine.memory.activations_gb - activation.memory.activations_gb) * 1e9 == pytest.approx(48 * per_layer, rel=0.01)
    assert combine.step.step_s == pytest.approx(activation.step.step_s, rel=1e-9)


def test_gate_weights_applied_in_eager_ops_add_two_passes_and_keep_the_activation():
    """activation_eager (Megatron-Core's TEGroupedMLP without a fused weighted activation): after
    act(x), the product with the fp32 gate weights writes fp32 (2 + 4 bytes an element) and the
    cast back reads it (4 + 2), keeping the bf16 activation for the weights' gradient. Mixtral-proxy
    layer on EP8: 8192 rows on a rank on average (the busiest a few % more) x 14336 elements a pass."""
    from simcc.layout import build_layout
    from simcc.plan.training import forward_work, micro_batch
    from simcc.model.graph import units_of

    def ops(where):
        workload, src = load_workload("workloads/validation/megatron_moe_layer.yaml",
                                      [f"model.blocks.0.moe_ffn.routing.gate_weights_applied={where}"])
        layout = build_layout(workload, load_hardware("dgx_h100_x1"), src)
        work = forward_work(units_of(workload.model), workload, layout, micro_batch(workload))
        return {op.name: op for op in work.items if isinstance(op, Op)}

    fused, eager = ops("activation"), ops("activation_eager")
    busiest = eager["moe.expert_act"].flops / 8  # elements on the busiest rank
    assert 8192 * 14336 < busiest < 1.03 * 8192 * 14336
    assert "moe.expert_weight" not in fused
    assert eager["moe.expert_weight"].bytes == pytest.approx(busiest * (2 + 4))
    assert eager["moe.expert_weight_cast"].bytes == pytest.approx(busiest * (4 + 2))
    assert eager["moe.expert_weight"].saved_bytes == pytest.approx(busiest * 2)
    assert eager["moe.expert_weight_cast"].saved_bytes == 0
    assert eager["moe.expert_act"] == fused["moe.expert_act"] and eager["moe.unpermute"] == fused["moe.unpermute"]


def test_recompute_modules_need_a_partial_policy():
    from simcc.errors import InputError
    from simcc.specs.loader import load_workload

    with pytest.raises(InputError, match="recompute_modules refine recompute none or selective"):
        load_workload("qwen3_30b_a3b_train_16xh100", ["parallelism.recompute=full", "parallelism.recompute_modules=[moe_act]"])


def test_shazeer_moe_143m_fits_the_32_k40s_it_was_trained_on():
    """Shazeer et al. 2017 trained MoE-143M on 32 K40s (table 1), about 9,600 words per GPU; the
    same batch on 16 of them leaves no room on the cards' 12 GB. Recomputing the experts' hidden
    activations (their appendix D) saves a further 1-2 GB."""
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    def total(sets, hardware="k40_x32"):
        workload, src = load_workload("workloads/validation/shazeer_moe143m_lstm_train.yaml", sets)
        return estimate(workload, load_hardware(hardware), src).memory.total_gb

    on_32 = total([])
    assert on_32 < 12.0 - 2.5
    assert total(["parallelism.ep=16", "parallelism.micro_batch=960"], "k40_x16") > on_32 + 2.5
    assert total(["parallelism.recompute_modules=[]"]) - total([]) > 1.0

def test_an_unfit_note_names_the_largest_part_and_what_shrinks_it():
    """AutoModel's Qwen3-30B run without its activation checkpointing: four 4,096-token
    sequences per micro-batch keep 112 GB of activations, 61% of what the device would need."""
    from simcc.estimate import SimulationOptions, estimate

    workload, source = load_workload("qwen3_30b_a3b_train_16xh100", [
        "parallelism.ep=8", "parallelism.micro_batch=4", "parallelism.zero_stage=3", "train.global_batch=512"])
    result = estimate(workload, load_hardware("dgx_h100_x1"), source, SimulationOptions())
    note = next(n for n in result.notes if n.startswith("does not fit"))
    assert "activations take the most" in note and "recompute" in note
    with_recompute, source = load_workload("qwen3_30b_a3b_train_16xh100", [
        "parallelism.ep=8", "parallelism.micro_batch=4", "parallelism.zero_stage=3", "train.global_batch=512",
        "parallelism.recompute=full"])
    assert estimate(with_recompute, load_hardware("dgx_h100_x1"), source, SimulationOptions()).memory.fits


def test_the_memory_section_names_the_largest_part_a_setting_can_shrink():
    """Mixed-precision Adam without ZeRO on 1e9 parameters: 2 GB of bf16 weights, 2 GB of bf16
    gradients, 12 GB of fp32 master and moments. The optimizer takes the most, 12 / total, even
    when the run fits; the fixed reserve never counts, however large."""
    from simcc.costs.memory import SHRINKABLE_PARTS, MemoryBreakdown
    from simcc.estimate import MEMORY_REMEDIES, _memory_section

    assert set(MEMORY_REMEDIES) == set(SHRINKABLE_PARTS)  # every part named has a remedy
    workload, system, layout = _setup(["precision.weights=bf16", "precision.gradients=bf16", "precision.compute=bf16",
                                       "parallelism.tp=1", "model.blocks.1.repeat=1", "train.global_batch=8"])
    memory = training_memory(workload, system, layout, Params(dense=1e9), 0.0, 0.0)
    section = _memory_section(memory)
    assert section.fits and section.largest_part == "optimizer"
    assert section.largest_share == pytest.approx(12e9 / memory.total)
    reserved = MemoryBreakdown(weights=1e9, gradients=0.0, optimizer=0.0, activations=3e9, buffers=0.0,
                               kv_cache=0.0, reserve=50e9, capacity=80e9)
    assert reserved.largest_part() == ("activations", 3e9)
