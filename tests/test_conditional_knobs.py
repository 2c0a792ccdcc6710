"""The activation and leaf-popularity knobs of the conditional-computation kinds: bit-pattern
gating (Cho & Bengio 2014, arXiv 1406.7362) and threshold-fired block trees (Gallicchio & Nuti
2025, arXiv 2502.14788). Every expected figure is worked out by hand in the test."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds import bitpattern, threshold_tree
from simcc.model.ops import Op
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import BitPatternBlock, ThresholdTreeBlock

BITS = "model.blocks.1.blocks.0.bitpattern"
TREE = "model.blocks.1.threshold_tree"


def matmul_flops(ops: list) -> float:
    return sum(o.flops for o in ops if isinstance(o, Op) and o.is_matmul)


def op(work, name: str) -> Op:
    return next(o for o in work.forward if o.name == name)


# ---------------------------------------------------------------- activation: bit-pattern gating

@pytest.mark.parametrize("activation, expert, active, replicated, rows_cols", [
    # 3 bits, tree: 2^4 - 1 = 15 matrices of 32 x 48, 3 + 1 = 4 on a token's path; the gater 3 x 32, the bias 48
    ("relu", 15 * 32 * 48, 4 * 32 * 48, 3 * 32 + 48, 15 * (32 + 48)),  # 23,040 / 6,144 / 144 / 1,200
    ("gelu", 15 * 32 * 48, 4 * 32 * 48, 3 * 32 + 48, 15 * (32 + 48)),
    # gated: each matrix's product (the output side, not the input) is twice as wide, 32 x 96, and its bias
    ("swiglu", 15 * 32 * 96, 4 * 32 * 96, 3 * 32 + 96, 15 * (32 + 96)),  # 46,080 / 12,288 / 192 / 1,920
    ("geglu", 15 * 32 * 96, 4 * 32 * 96, 3 * 32 + 96, 15 * (32 + 96)),
])
def test_a_gated_bitpattern_block_doubles_each_matrix_product(activation, expert, active, replicated, rows_cols):
    spec = BitPatternBlock(bits=3, input=32, output=48, activation=activation)
    p = bitpattern.params(spec, 999)
    assert (p.expert, p.active_expert, p.replicated, p.expert_rows_cols) == (expert, active, replicated, rows_cols)
    assert p.expert_tensors == 15  # a gated matrix is one fused tensor, as an FFN's gated up projection


@pytest.mark.parametrize("activation, per_token", [
    ("relu", 2 * 32 * 3 + 4 * 2 * 32 * 48),  # gater + 4 levels: 192 + 12,288 = 12,480
    ("silu", 2 * 32 * 3 + 4 * 2 * 32 * 48),
    ("swiglu", 2 * 32 * 3 + 4 * 2 * 32 * 96),  # 192 + 24,576 = 24,768
])
def test_bitpattern_forward_flops_per_token_follow_the_activation(activation, per_token):
    spec = BitPatternBlock(bits=3, input=32, output=48, activation=activation)
    work = bitpattern.work(spec, 999, Batch(1, 1000, 1000), Shard(executed=False))
    assert matmul_flops(work.forward) == pytest.approx(1000 * per_token)


def test_bitpattern_activation_op_reads_keeps_and_computes_as_the_activation_says():
    """Bit-pattern output 48 wide, 100 tokens, bf16 (2 B). ReLU keeps nothing of its own (its
    output is the next product's saved input), GeLU its input, a gated one both halves, which it
    also reads (and multiplies: one FLOP more each)."""
    elements = 100 * 48
    expected = {  # activation: (bytes, saved bytes, flops)
        "relu": (elements * 2 * 2, 0.0, elements),
        "gelu": (elements * 2 * 2, elements * 2, elements),
        "swiglu": (elements * 3 * 2, 2 * elements * 2, 2 * elements),
    }
    for activation, (moved, saved, flops) in expected.items():
        spec = BitPatternBlock(bits=3, input=32, output=48, activation=activation)
        work = bitpattern.work(spec, 999, Batch(1, 100, 100), Shard())
        act = op(work, "bits.act")
        assert (act.bytes, act.saved_bytes, act.flops) == (moved, saved, flops), activation
        # the tree sums the 4 levels' products: as wide as they are
        width = 96 if activation == "swiglu" else 48
        assert op(work, "bits.sum").bytes == 100 * width * (4 + 1) * 2


def _bitpattern_estimate(*sets: str):
    workload, src = load_workload("bitpattern_tree_mlp_train", list(sets))
    return estimate(workload, load_hardware("dgx_a100_x1"), src)


def test_the_bitpattern_workload_follows_its_activation():
    """bitpattern_tree_mlp_train: hidden 512, MLP 784 -> 512, 4 bit-pattern layers of 10 bits
    (2,047 matrices, 11 per token), MLP 512 -> 10, fp32.
    Parameters: 784*512 + 512 + 512*10 + 10 = 407,050 outside; a layer holds 2047*512*512 + 10*512
    + 512 = 536,614,400 (relu), 2047*512*1024 + 10*512 + 1024 = 1,073,223,680 (swiglu).
    Forward FLOPs per token: 2*784*512 + 2*512*10 = 813,056 outside; a layer 2*512*10 + 11*2*512*512
    = 5,777,408 (relu), 2*512*10 + 11*2*512*1024 = 11,544,576 (swiglu)."""
    relu, gelu, swiglu = (_bitpattern_estimate("parallelism.micro_batch=8", f"{BITS}.activation={a}")
                          for a in ("relu", "gelu", "swiglu"))
    assert relu.model.params_b * 1e9 == pytest.approx(407_050 + 4 * 536_614_400)
    assert swiglu.model.params_b * 1e9 == pytest.approx(407_050 + 4 * 1_073_223_680)
    assert relu.model.forward_gflop_per_token * 1e9 == pytest.approx(813_056 + 4 * 5_777_408)
    assert swiglu.model.forward_gflop_per_token * 1e9 == pytest.approx(813_056 + 4 * 11_544_576)
    assert gelu.model == relu.model
    # twice the matrix products: slower; GeLU runs as ReLU does
    assert swiglu.step.step_s > relu.step.step_s * 1.2
    assert gelu.step.compute_s == pytest.approx(relu.step.compute_s)
    # GeLU keeps its 512-wide fp32 input per token of a micro-batch of 8, in each of the 4 layers;
    # a gated one both halves
    per_copy = 4 * 8 * 512 * 4 / 1e9
    assert gelu.memory.activations_gb - relu.memory.activations_gb == pytest.approx(per_copy)
    assert swiglu.memory.activations_gb - relu.memory.activations_gb == pytest.approx(2 * per_copy)


# ---------------------------------------------------------------- activation: threshold trees

def only_the_root(**kw) -> ThresholdTreeBlock:
    """threshold 1.0: no child ever takes the root's whole rate, so only the root fires."""
    return ThresholdTreeBlock(widths=[64, 256, 64], levels=5, threshold=1.0, samples=200, **kw)


@pytest.mark.parametrize("activation, per_block, biases", [
    ("relu", 64 * 256 + 256 * 64, 256 + 64),  # 32,768 weights, 320 biases
    ("tanh", 64 * 256 + 256 * 64, 256 + 64),
    ("swiglu", 64 * 512 + 256 * 128, 512 + 128),  # each layer's product twice as wide: 65,536, 640
])
def test_a_gated_threshold_tree_doubles_each_layers_product(activation, per_block, biases):
    spec = only_the_root(activation=activation)
    p = threshold_tree.params(spec, 999)
    blocks = 1 + 2 + 4 + 8 + 16
    assert (p.expert, p.replicated, p.active_expert) == (blocks * per_block, blocks * biases, per_block)
    work = threshold_tree.work(spec, 999, Batch(1, 10, 10), Shard())
    assert matmul_flops(work.forward) == pytest.approx(10 * 2 * per_block)  # 10 inputs through the root only


def test_threshold_tree_activation_ops_follow_the_activation():
    """The root's two activations on 10 inputs, 256 then 64 wide, bf16."""
    for activation, reads, saved_copies in (("relu", 1, 0), ("gelu", 1, 1), ("geglu", 2, 2)):
        work = threshold_tree.work(only_the_root(activation=activation), 999, Batch(1, 10, 10), Shard())
        for i, width in enumerate((256, 64)):
            act = op(work, f"tree.level0.act{i}")
            assert act.bytes == 10 * width * (reads + 1) * 2, activation
            assert act.saved_bytes == 10 * width * 2 * saved_copies, activation


def test_a_gated_threshold_tree_serves_slower():
    def latency(activation: str) -> float:
        workload, src = load_workload("ray_tracing_mlp_serve_rpi5", [f"{TREE}.activation={activation}"])
        result = estimate(workload, load_hardware("raspberry_pi_5"), src, SimulationOptions(request_count=100))
        return result.latency.latency_p50_s

    assert latency("swiglu") > 1.3 * latency("relu")


# ---------------------------------------------------------------- skewed leaves

def test_leaf_popularity_is_the_expert_vocabulary_and_prefixes_sum_their_leaves():
    """Zipf(1) over 4 leaves: weights 1, 1/2, 1/3, 1/4, total 25/12: shares 12/25, 6/25, 4/25, 3/25,
    placed at random leaves; a level-1 prefix holds two neighbouring leaves."""
    spec = BitPatternBlock(bits=2, tree=True, leaves={"distribution": "zipf", "alpha": 1.0})
    root, halves, leaves = bitpattern.prefix_shares(spec, seed=0)
    assert sorted(leaves) == pytest.approx([0.12, 0.16, 0.24, 0.48])
    assert halves == pytest.approx([leaves[0] + leaves[1], leaves[2] + leaves[3]])
    assert root == pytest.approx([1.0])
    uniform = bitpattern.prefix_shares(BitPatternBlock(bits=2), seed=0)
    assert [s.tolist() for s in uniform] == [[1.0], [0.5, 0.5], [0.25] * 4]  # exact


def _leaf_op(leaves: dict, tokens: int, seed: int) -> Op:
    spec = BitPatternBlock(bits=2, tree=False, input=64, output=64, leaves=leaves)
    return op(bitpattern.work(spec, 64, Batch(1, tokens, tokens), Shard(seed=seed)), "bits.level2")


def test_skewed_leaves_read_fewer_matrices_and_the_same_flops():
    """4 tokens over 4 leaves; a step reads the matrices of the leaves its tokens reach, in
    expectation sum_l 1 - (1 - p_l)^4:
      uniform: 4 (1 - 0.75^4) = 2.734375
      Zipf(1): (1 - 0.52^4) + (1 - 0.76^4) + (1 - 0.84^4) + (1 - 0.88^4)
             = 0.92688384 + 0.66637824 + 0.50212864 + 0.40030464 = 2.49569536,
    0.23867964 matrices fewer, each 64 x 64 bf16 = 8,192 B. Averaged over 4,000 steps (standard
    error ~0.011 matrices)."""
    token_bytes = 4 * (64 * 2 + 64 * 2)  # each token's input read and output written, bf16
    matrix_bytes = 64 * 64 * 2

    def mean_matrices(leaves: dict) -> float:
        ops = [_leaf_op(leaves, 4, seed) for seed in range(4000)]
        assert all(o.flops == 4 * 2 * 64 * 64 for o in ops)  # skew moves no FLOPs: every token still runs one leaf
        return float(np.mean([(o.bytes - token_bytes) / matrix_bytes for o in ops]))

    uniform, zipf = mean_matrices({}), mean_matrices({"distribution": "zipf", "alpha": 1.0})
    assert uniform == pytest.approx(2.734375, abs=0.035)
    assert zipf == pytest.approx(2.49569536, abs=0.035)
    assert uniform - zipf == pytest.approx(0.23867964, abs=0.05)


def test_uniform_leaves_are_todays_even_split():
    """The default and an explicit uniform split give the same work, and it is one step's
    multinomial draw of the tokens over 2^l equally likely prefixes per level (model FLOPs: T/2^l
    each); the weights read are those of the prefixes the draw reached."""
    spec = BitPatternBlock(bits=6, input=64, output=64)
    explicit = BitPatternBlock(bits=6, input=64, output=64, leaves={"distribution": "uniform"})
    for shard in (Shard(seed=5), Shard(executed=False)):
        assert bitpattern.work(spec, 64, Batch(1, 300, 300), shard) == bitpattern.work(explicit, 64, Batch(1, 300, 300), shard)
    work = bitpattern.work(spec, 64, Batch(1, 300, 300), Shard(seed=5))
    rng = np.random.default_rng(5)
    for level in range(7):
        drawn = rng.multinomial(300, np.full(2**level, 1.0 / 2**level))
        product = op(work, f"bits.level{level}")
        assert [m for m, *_ in product.kernels[0]] == [float(t) for t in drawn if t > 0]
        assert product.bytes == 300 * (64 * 2 + 64 * 2) + np.count_nonzero(drawn) * 64 * 64 * 2
    model = bitpattern.work(spec, 64, Batch(1, 300, 300), Shard(executed=False))
    assert [m for m, *_ in op(model, "bits.level6").kernels[0]] == [300 / 64] * 64


def test_skewed_leaves_make_small_batches_faster():
    """A micro-batch of 8 tokens over 1,024 leaves reaches ~8 of them uniformly; Zipf popularity
    puts tokens on shared hot leaves, fewer matrices are read, and the more skew the fewer."""
    steps = [_bitpattern_estimate("parallelism.micro_batch=8", *sets).step.step_s for sets in (
        (), (f"{BITS}.leaves.distribution=zipf",), (f"{BITS}.leaves.distribution=zipf", f"{BITS}.leaves.alpha=2"))]
    assert steps[0] > steps[1] > steps[2]


@pytest.mark.parametrize("leaves, message", [
    ({"distribution": "histogram", "histogram": "x.csv"},
     "distribution histogram does not apply to bit-pattern leaves; use one of uniform, zipf, cv"),
    ({"router_temperature": 2.0}, "router_temperature is an MoE router setting; bit-pattern leaves take distribution, alpha, cv"),
    ({"distribution": "zipf", "w_load": 0.1}, "w_load is an MoE router setting"),
    ({"distribution": "aux_loss"}, "distribution aux_loss does not apply"),  # not the router's train_tokens rule
])
def test_leaf_settings_that_do_not_apply_are_refused(leaves, message):
    with pytest.raises(ValidationError, match=message):
        BitPatternBlock(bits=4, leaves=leaves)


def test_a_refused_leaf_setting_is_one_line_naming_the_field():
    with pytest.raises(InputError) as refused:
        load_workload("bitpattern_tree_mlp_train", [f"{BITS}.leaves.distribution=histogram", f"{BITS}.leaves.histogram=x.csv"])
    line = str(refused.value)
    assert "\n" not in line and f"{BITS}.leaves: distribution histogram" in line and "uniform, zipf, cv" in line
