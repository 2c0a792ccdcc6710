"""Every shipped file validates; every kind of bad input becomes one clear InputError."""

from __future__ import annotations

import pytest

from simcc.errors import InputError
from simcc.report.catalog import catalog
from simcc.specs.loader import load_hardware, load_workload, resolve_profile_path

from conftest import write

SHIPPED = catalog()


@pytest.mark.parametrize("row", [r for r in SHIPPED if r["kind"] == "hardware"], ids=lambda r: f"{r['group']}/{r['name']}")
def test_every_shipped_hardware_profile_loads(row, root):
    system = load_hardware(str(root / "hardware_profiles" / row["group"] / f"{row['name']}.yaml"))
    assert system.devices >= 1
    assert system.device.memory_gb > 0


@pytest.mark.parametrize("row", [r for r in SHIPPED if r["kind"] == "workload"], ids=lambda r: r["name"])
def test_every_shipped_workload_validates(row):
    workload, _ = load_workload(row["name"])
    assert workload.model.blocks


def test_required_profiles_are_shipped():
    names = {r["name"] for r in SHIPPED}
    required = {"h100_sxm", "h200", "a100_80gb", "a100_40gb", "v100", "l4", "rtx_4090", "mi300x", "k40",
                "dgx_h100_x1", "dgx_h100_x4", "dgx_h100_x128", "dgx_a100_x1", "dgx_a100_x4", "k40_x16",
                "jetson_agx_orin", "jetson_orin_nano", "raspberry_pi_5", "apple_m2_max", "cpu_host_generic"}
    assert required <= names


def test_bare_name_prefers_the_system_over_the_device():
    assert resolve_profile_path("jetson_agx_orin").parent.name == "edge"


def test_cluster_resolves_node_and_device_by_name():
    system = load_hardware("dgx_h100_x128")
    assert system.devices == 1024
    assert system.device.peak_tflops.bf16 == 989
    assert system.inter_node_gb_s_per_device() == pytest.approx(50 * 0.8)


def _error(fn, *args) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    return info.value


WORKLOAD = """
name: tiny
mode: train
model:
  name: tiny
  hidden: 256
  blocks:
    - repeat: 2
      blocks:
        - attention: {heads: 4}
        - dense_ffn: {hidden: 1024}
train: {seq_len: 128, global_batch: 8}
"""


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "w.yaml", WORKLOAD.replace("{heads: 4}", "{heds: 4}"))
    err = _error(load_workload, str(path))
    assert err.source == str(path)
    assert err.field == "model.blocks.0.blocks.0.attention.heds"
    assert "did you mean 'heads'" in err.message


def test_unknown_block_kind_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "w.yaml", WORKLOAD.replace("- attention:", "- atention:"))
    err = _error(load_workload, str(path))
    assert "did you mean 'attention'" in err.message


def test_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path, "w.yaml", WORKLOAD.replace("seq_len: 128", "seq_len: long"))
    err = _error(load_workload, str(path))
    assert err.field == "train.seq_len"
    assert "integer" in err.message and "'long'" in err.message


def test_non_positive_value_is_rejected(tmp_path):
    path = write(tmp_path, "w.yaml", WORKLOAD.replace("hidden: 1024", "hidden: -5"))
    err = _error(load_workload, str(path))
    assert err.field.endswith("dense_ffn.hidden")
    assert "greater than 0" in err.message


def test_missing_file_and_bad_yaml(tmp_path):
    assert "file not found" in _error(load_workload, str(tmp_path / "nope.yaml")).message
    path = write(tmp_path, "bad.yaml", "name: [unclosed\n")
    err = _error(load_workload, str(path))
    assert "not valid YAML" in err.message and err.field.startswith("line")


def test_python_tags_are_refused_by_safe_load(tmp_path):
    path = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo hi']\nmode: train\n")
    assert "not valid YAML" in _error(load_workload, str(path)).message


def test_missing_device_reference_names_file_and_field(tmp_path):
    write(tmp_path, "hw/devices/gpu.yaml", "kind: device\nname: g\nsource: s\npeak_tflops: {bf16: 1}\n"
          "memory_gb: 1\nmemory_bandwidth_gb_s: 1\npower: {tdp_w: 1, idle_w: 0}\n")
    node = write(tmp_path, "hw/nodes/n.yaml", "kind: node\nname: n\nsource: s\ndevice: gpuu\ndevices_per_node: 1\n"
                 "host_link: {bandwidth_gb_s: 1, latency_us: 1}\n")
    err = _error(load_hardware, str(node))
    assert err.source == str(node) and err.field == "device"
    assert "no device named 'gpuu'" in err.message and "did you mean 'gpu'" in err.message


def test_error_inside_a_referenced_device_names_that_file(tmp_path):
    device = write(tmp_path, "hw/devices/gpu.yaml", "kind: device\nname: g\nsource: s\npeak_tflops: {bf16: 1}\n"
                   "memory_gb: 0\nmemory_bandwidth_gb_s: 1\npower: {tdp_w: 1, idle_w: 0}\n")
    node = write(tmp_path, "hw/nodes/n.yaml", "kind: node\nname: n\nsource: s\ndevice: gpu\ndevices_per_node: 1\n"
                 "host_link: {bandwidth_gb_s: 1, latency_us: 1}\n")
    err = _error(load_hardware, str(node))
    assert err.source == str(device) and err.field == "memory_gb"


def test_overrides_apply_and_are_validated(root):
    workload, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.pp=2", "train.total_tokens=2e12"])
    assert workload.parallelism.pp == 2
    assert workload.train.total_tokens == 2e12
    err = _error(load_workload, "mixtral_8x7b_train_64xh100", ["parallelism.tp=abc"])
    assert err.source.startswith("--set parallelism.tp=abc (in ") and err.field == "parallelism.tp"
    err = _error(load_workload, "mixtral_8x7b_train_64xh100", ["parallelism.tpp=2"])
    assert "did you mean 'tp'" in err.message
    err = _error(load_workload, "mixtral_8x7b_train_64xh100", ["parallelism"])
    assert "key.path=value" in err.message


def test_hardware_overrides(root):
    system = load_hardware("dgx_h100_x4", ["node.intra_link.bandwidth_gb_s=900", "nodes=2"])
    assert system.intra_link.bandwidth_gb_s == 900 and system.nodes == 2
    err = _error(load_hardware, "dgx_h100_x4", ["nodes=0"])
    assert err.field == "nodes" and err.source.startswith("--set nodes=0 (in ")


def test_a_section_check_names_the_override_that_broke_it():
    err = _error(load_workload, "mixtral_8x7b_train_64xh100", ["model.blocks.1.blocks.1.moe_ffn.gating.policy=hierarchical"])
    assert err.source.startswith("--set model.blocks.1.blocks.1.moe_ffn.gating.policy=hierarchical")
    assert "needs gating.groups" in err.message


def test_inconsistent_moe_spec(tmp_path):
    text = WORKLOAD.replace("- dense_ffn: {hidden: 1024}", "- moe_ffn: {experts: 4, k: 2, expert_hidden: 64, gating: {policy: switch}}")
    err = _error(load_workload, str(write(tmp_path, "w.yaml", text)))
    assert "switch gating is top-1" in err.message


def test_input_error_survives_being_rebuilt_from_its_args():
    err = InputError("w.yaml", "serve", "does not fit")
    copy = type(err)(*err.args)  # what simpy does with an error raised inside a process
    assert str(copy) == str(err) == "w.yaml: serve: does not fit"


def test_each_vocabulary_is_one_table():
    """A dtype needs its bytes and a peak field; the Literals accept exactly the described names."""
    from typing import get_args

    from simcc.specs import vocab
    from simcc.specs.hardware import PeakTflops

    dtypes = list(get_args(vocab.Dtype))
    assert list(vocab.WEIGHT_FORMATS) == list(vocab.WEIGHT_FORMAT_BITS) and not set(dtypes) & set(vocab.WEIGHT_FORMATS)
    assert dtypes == list(vocab.DTYPES) == list(vocab.DTYPE_BYTES) == list(PeakTflops.model_fields)
    for literal, names in ((vocab.Collective, vocab.COLLECTIVES), (vocab.GatingPolicy, vocab.GATING_POLICIES),
                           (vocab.CapacityFormula, vocab.CAPACITY_FORMULAS), (vocab.WeightFormat, vocab.WEIGHT_FORMATS)):
        assert list(get_args(literal)) == list(names) and all(names.values())


def test_a_name_outside_a_vocabulary_lists_the_valid_ones(tmp_path):
    path = write(tmp_path, "w.yaml", WORKLOAD + "precision: {compute: bf17}\n")
    err = _error(load_workload, str(path))
    assert err.field == "precision.compute" and "'bf16'" in err.message and "'bf17'" in err.message


def test_a_set_on_an_aliased_block_changes_that_block_only(tmp_path):
    """Blocks that share a YAML anchor are independent copies once read: a change to one (as
    `--set` makes) leaves the others that came from the same alias alone."""
    from simcc.specs.loader import read_yaml

    path = write(tmp_path, "w.yaml", "shared: &moe {experts: 8, routing: {capacity_factor: 1.0}}\n"
                                     "blocks: [{moe_ffn: *moe}, {moe_ffn: *moe}]\n")
    loaded = read_yaml(path)
    loaded["blocks"][1]["moe_ffn"]["routing"]["capacity_factor"] = 0.5
    assert [b["moe_ffn"]["routing"]["capacity_factor"] for b in loaded["blocks"]] == [1.0, 0.5]
    assert loaded["shared"]["routing"]["capacity_factor"] == 1.0


def test_switch_decoder_capacity_override_leaves_the_encoder_alone():
    workload, _ = load_workload("switch_base_128_train", ["model.blocks.2.blocks.5.moe_ffn.routing.capacity_factor=0.5"])
    encoder, decoder = workload.model.blocks[1].blocks[3], workload.model.blocks[2].blocks[5]
    assert (encoder.moe_ffn.routing.capacity_factor, decoder.moe_ffn.routing.capacity_factor) == (1.0, 0.5)
