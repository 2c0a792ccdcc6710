"""Multi-token prediction modules (DeepSeek-V3 report, arXiv 2412.19437, sec. 2.2): parameters,
model FLOPs and work derived by hand, the last pipeline stage, the step and memory they add, and
serving without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from simcc.estimate import estimate
from simcc.model.blocks import Batch, Shard
from simcc.model.graph import Block, block_work, inference_units, model_forward_flops, model_params, stage_units, units_of
from simcc.model.kinds import costing_of
from simcc.model.kinds._shared import output_head
from simcc.model.ops import Comm, Op
from simcc.specs.blocks import MTPBlock
from simcc.specs.loader import load_hardware, load_workload

ROOT = Path(__file__).resolve().parents[1]
D, V = 64, 1000  # hidden size and vocabulary of the small model
LAYER = [{"attention": {"heads": 4}}, {"dense_ffn": {"hidden": 256}}]
BATCH = Batch(2, 16, 16)  # T = 32 tokens
T = BATCH.tokens


def mtp(depth: int = 1, layer: list | None = None) -> MTPBlock:
    return MTPBlock.model_validate({"vocab": V, "depth": depth, "layer": layer or LAYER})


def matmul_flops(items: list) -> float:
    return sum(item.flops for item in items if isinstance(item, Op) and item.is_matmul)


def test_params_of_a_small_module_by_hand():
    # Projection M_k: 2d x d = 2 * 64 * 64 = 8,192 (TP-sharded).
    # Attention, MHA with 4 heads of 16: QKV 64 x 192 = 12,288, out 64 x 64 = 4,096 -> 16,384; its norm 64.
    # Dense FFN 64 -> 256 -> 64: 2 * 64 * 256 = 32,768; its norm 64.
    # The module's own norms (enorm, hnorm, final): 3 * 64 = 192.
    # No embedding or head rows: both are the model's (vocab 1,000 appears nowhere).
    p = costing_of(mtp()).params(mtp(), D)
    assert p.dense == 8_192 + 16_384 + 32_768 == 57_344
    assert p.replicated == 192 + 64 + 64 == 320
    assert p.total == 57_664 and p.expert == 0
    assert p.tensors == 1 + 3 + 3 + 3  # proj + 3 norms; QKV, out, norm; up, down, norm


def test_forward_flops_are_projection_inner_layer_and_head_logits():
    # Model-FLOPs convention (full attention, matmuls only), T = 32:
    #   projection   2 * T * 2d * d          =   524,288
    #   QKV          2 * T * d * 3d          =   786,432
    #   core         4 * s * q * kv * d      =   131,072  (2 sequences of 16, full score matrix)
    #   out          2 * T * d * d           =   262,144
    #   FFN up+down  2 * (2 * T * d * 256)   = 2,097,152
    #   head logits  2 * T * d * V           = 4,096,000
    work = block_work(Block("mtp", mtp(), 0), D, BATCH, Shard(executed=False))
    assert matmul_flops(work.forward) == 524_288 + 786_432 + 131_072 + 262_144 + 2_097_152 + 4_096_000
    names = [item.name for item in work.forward]
    assert names[:5] == ["mtp.embed.lookup", "mtp.enorm", "mtp.hnorm", "mtp.concat", "mtp.proj"]
    assert names[-3:] == ["mtp.head.norm", "mtp.head.logits", "mtp.head.loss"]
    # The inner layer is the inner kinds' own work, unchanged.
    inner = [op for spec in mtp().layer_specs for op in costing_of(spec).work(spec, D, BATCH, Shard(executed=False)).forward]
    assert names[5:-3] == [op.name for op in inner]


def test_the_head_is_the_lm_heads_ops():
    """The shared head runs the LM head's own ops (one helper), named apart."""
    from simcc.specs.blocks import LMHeadBlock

    head = costing_of(LMHeadBlock(vocab=V)).work(LMHeadBlock(vocab=V), D, BATCH, Shard(tp=2))
    assert head.forward == output_head("head", T, D, V, Shard(tp=2))
    logits = next(op for op in head.forward if op.name == "head.logits")
    assert logits.flops == 2 * T * D * V / 2  # vocabulary-parallel over tp = 2


def test_tensor_parallel_projection_gathers_its_output():
    work = block_work(Block("mtp", mtp(), 0), D, BATCH, Shard(tp=2, executed=False))
    proj = next(op for op in work.forward if op.name == "mtp.proj")
    assert proj.flops == 2 * T * 2 * D * D / 2  # column-parallel: d / tp output columns
    comms = {item.name: item for item in work.forward if isinstance(item, Comm)}
    assert comms["mtp.proj_gather"].collective == "all_gather"
    assert comms["mtp.proj_gather"].bytes == T * D * 2  # bf16
    assert comms["mtp.embed.tp_reduce"].collective == "all_reduce"  # vocabulary-parallel lookup


def test_depth_two_doubles_the_module():
    one, two = mtp(1), mtp(2)
    assert costing_of(two).params(two, D).astuple() == tuple(2 * x for x in costing_of(one).params(one, D).astuple())
    shard = Shard(executed=False)
    w1 = block_work(Block("mtp", one, 0), D, BATCH, shard)
    w2 = block_work(Block("mtp", two, 0), D, BATCH, shard)
    assert matmul_flops(w2.forward) == 2 * matmul_flops(w1.forward)
    assert len(w2.forward) == 2 * len(w1.forward)


MOE_LAYER = [{"attention": {"heads": 4}},
             {"moe_ffn": {"experts": 8, "k": 2, "expert_hidden": 128, "routing": {"dropless": True, "capacity_factor": None}}}]


def test_inner_moe_draws_per_module_and_reports_its_loads():
    spec = mtp(2, MOE_LAYER)
    shard = Shard(ep=4)
    drawn = block_work(Block("mtp", spec, 7), D, Batch(4, 512, 512), Shard(ep=4, load_draws=1))
    ups = [op for op in drawn.forward if op.name == "moe.expert_up"]
    assert len(ups) == 2 and ups[0].kernels != ups[1].kernels  # each module's experts draw their own loads
    expected = block_work(Block("mtp", spec, 7), D, Batch(4, 512, 512), shard)
    ups = [op for op in expected.forward if op.name == "moe.expert_up"]
    assert ups[0] == ups[1]  # expected loads: alike layers share them
    assert expected.moe is not None and expected.moe.experts == 8
    p = costing_of(spec).params(spec, D)
    assert p.expert == 2 * 8 * 2 * D * 128  # two modules of 8 experts, 64 -> 128 -> 64


def small_model(with_mtp: bool, depth: int = 1, extra: dict | None = None) -> dict:
    blocks: list = [{"embedding": {"vocab": V}},
                    {"repeat": 5, "blocks": [{"attention": {"heads": 4}}, {"dense_ffn": {"hidden": 256}}]}]
    if with_mtp:
        blocks.append({"mtp": {"vocab": V, "depth": depth, "layer": LAYER}})
    blocks.append({"lm_head": {"vocab": V}})
    data = {"name": "mtp-test", "mode": "train", "model": {"name": "small", "hidden": D, "blocks": blocks},
            "parallelism": {"tp": 1, "pp": 1, "micro_batch": 1, "zero_stage": 1},
            "precision": {"weights": "bf16", "compute": "bf16", "gradients": "fp32", "communication": "bf16"},
            "optimizer": {"type": "adam", "master_weights": True},
            "train": {"seq_len": 16, "global_batch": 64, "total_tokens": 1e9}}
    for key, value in (extra or {}).items():
        data[key] = {**data[key], **value}
    return data


def load(tmp_path: Path, data: dict, name: str = "w.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return load_workload(str(path))


def test_model_flops_count_the_module_as_megatron_does(tmp_path):
    """megatron/training/training.py `num_floating_point_operations` adds the MTP layers, eh_proj
    and one more logits GEMM per MTP layer; the module's forward matmuls, by hand, add 7,897,088."""
    plain, _ = load(tmp_path, small_model(False), "a.yaml")
    with_mtp, _ = load(tmp_path, small_model(True), "b.yaml")
    added = model_forward_flops(with_mtp.model, BATCH) - model_forward_flops(plain.model, BATCH)
    assert added == 524_288 + 786_432 + 131_072 + 262_144 + 2_097_152 + 4_096_000
    assert model_params(with_mtp.model).total - model_params(plain.model).total == 57_664


def test_the_module_lands_on_the_last_stage_with_the_head(tmp_path):
    workload, _ = load(tmp_path, small_model(True))
    units = units_of(workload.model)
    assert [b.kind for b in units[-1].blocks] == ["mtp", "lm_head"]  # a unit of its own, the head attached
    for chunks in (2, 3, 4, 6):  # 6 units: even and uneven splits
        last = stage_units(units, chunks)[-1]
        assert any(b.kind == "mtp" for u in last for b in u.blocks)
    laid_out = stage_units(units, 3, [2, 2, 2])[-1]
    assert [b.kind for u in laid_out for b in u.blocks][-2:] == ["mtp", "lm_head"]


def test_serving_leaves_the_module_out(tmp_path):
    workload, _ = load(tmp_path, small_model(True))
    plain, _ = load(tmp_path, small_model(False), "plain.yaml")
    served = inference_units(workload.model)
    assert [[(b.kind, b.index) for b in u.blocks] for u in served] == \
        [[(b.kind, b.index) for b in u.blocks] for u in units_of(plain.model)]
    assert inference_units(plain.model) is units_of(plain.model)


def test_the_module_adds_step_time_and_memory(tmp_path):
    system = load_hardware("dgx_h100_x1")
    results = {}
    for with_mtp in (False, True):
        workload, source = load(tmp_path, small_model(with_mtp), f"{with_mtp}.yaml")
        results[with_mtp] = estimate(workload, system, source)
    without, with_ = results[False], results[True]
    assert with_.step.step_s > without.step.step_s
    assert with_.memory.total_gb > without.memory.total_gb
    assert with_.memory.weights_gb > without.memory.weights_gb
    assert with_.throughput.model_tflops_per_device > 0


def test_the_shipped_deepseek_module_costs_the_last_stage():
    """deepseek_v3_mtp_train: the module (MLA + MoE layer, projection, shared head) sits on the last
    of 8 stages and holds about 11.6B parameters (the V3 report's 14B counts the shared embedding
    and head, 2 x 129,280 x 7,168 = 1.85B, too)."""
    workload, _ = load_workload("deepseek_v3_mtp_train")
    plain, _ = load_workload("deepseek_v3_shape_train")
    added = model_params(workload.model).total - model_params(plain.model).total
    assert 11.5e9 < added < 11.8e9
    last = stage_units(units_of(workload.model), 8)[-1]
    assert [b.kind for b in last[-1].blocks] == ["mtp", "lm_head"]


# ------------------------------------------------------------------------------ hostile input

@pytest.mark.parametrize("data, message", [
    ({"vocab": V, "depth": 0, "layer": LAYER}, "greater than 0"),
    ({"vocab": V, "depth": 17, "layer": LAYER}, "less than or equal to 16"),
    ({"vocab": V, "layer": []}, "at least 1 item"),
    ({"vocab": V, "layer": [{"mtp": {"vocab": V, "layer": LAYER}}]}, "mtp cannot sit inside"),
    ({"vocab": V, "layer": [{"lm_head": {"vocab": V}}]}, "lm_head cannot sit inside"),
    ({"vocab": V, "layer": [{"embedding": {"vocab": V}}]}, "embedding cannot sit inside"),
    ({"vocab": V, "layer": [{"repeat": 2, "blocks": LAYER}]}, "exactly one block kind"),
    ({"vocab": V, "layer": [{"repeat": 2}]}, "repeat cannot sit inside"),
    ({"vocab": V, "layer": [{"attentoin": {"heads": 4}}]}, "unknown block kind 'attentoin'"),
    ({"vocab": V, "layer": [{}]}, "exactly one block kind"),
    ({"vocab": V, "layer": [{"attention": None}]}, "layer item 0 (attention)"),
    ({"vocab": V, "layer": [{"attention": {"heads": 0}}]}, "layer item 0 (attention.heads)"),
    ({"vocab": V, "layer": [{"dense_ffn": {"hidden": 8, "size": 3}}]}, "layer item 0 (dense_ffn.size)"),
    ({"vocab": V, "layer": [7]}, "valid dictionary"),
    ({"vocab": V, "layer": LAYER, "loss_weight": 0.3}, "loss_weight"),
    ({"vocab": 0, "layer": LAYER}, "greater than 0"),
])
def test_hostile_specs_are_refused(data, message):
    with pytest.raises(ValidationError, match=None) as error:
        MTPBlock.model_validate(data)
    assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("override, field", [
    ("model.blocks.3.mtp.depth=0", "model.blocks.3.mtp.depth"),
    ("model.blocks.3.mtp.layer=[]", "model.blocks.3.mtp.layer"),
    ("model.blocks.3.mtp.layer.0={foo: {}}", "unknown block kind 'foo'"),
    ("model.blocks.3.mtp.layer.0.mla.heads=0", "layer item 0 (mla.heads)"),
])
def test_hostile_overrides_give_one_line_and_exit_2(override, field):
    result = subprocess.run([sys.executable, "-m", "simcc", "estimate", "deepseek_v3_mtp_train", "-H", "dgx_h100_x128",
                             "--set", override], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.stderr[-2000:]
