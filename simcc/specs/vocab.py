"""The names the specs accept, each vocabulary defined once with the help text `simcc list` shows.

Each Literal is built from its help table, so a name cannot be accepted without being described.
Tables elsewhere that give a name its behaviour (bytes per element here; capacity rules in
routing/load.py) are keyed by the same Literal and checked against it by the tests.
"""

from __future__ import annotations

from typing import Any, Literal


def literal_of(names: dict[str, str]) -> Any:
    """A Literal type accepting exactly the table's names, in its order (pydantic lists them on error)."""
    return Literal[tuple(names)]


DTYPES = {
    "fp32": "IEEE 754 single precision, 4 bytes",
    "tf32": "TensorFloat-32: stored as fp32 (4 bytes), multiplied with a 10-bit mantissa on tensor cores",
    "bf16": "bfloat16: fp32's 8-bit exponent, 7-bit mantissa, 2 bytes",
    "fp16": "IEEE 754 half precision, 2 bytes",
    "fp8": "8-bit float (E4M3 or E5M2), 1 byte",
    "int8": "8-bit integer, 1 byte",
}
Dtype = literal_of(DTYPES)

# Storage bytes per element, keyed by Dtype.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}

# Quantized storage formats for served weights: bits per weight including each block's scales and
# minimums, from the block layouts of ggml's quantization types (ggml-common.h in
# github.com/ggml-org/llama.cpp: block_q8_0 is 32 int8 and an fp16 scale, 34 bytes per 32 weights;
# the k-quants of llama.cpp PR #1684 pack 256 weights per super-block: block_q4_K is two fp16
# scales, 12 bytes of 6-bit sub-block scales and mins and 128 bytes of nibbles, 144 bytes per 256).
# `int4` is a GPTQ/AWQ-style 4-bit weight with an fp16 scale per group of 128 (Frantar et al. 2022,
# arXiv 2210.17323; Lin et al. 2023, arXiv 2306.00978). Dequantized to the compute dtype in the
# GEMM kernel; a figure of bits per weight (e.g. a GGUF file's size x 8 / parameters) is accepted too.
WEIGHT_FORMATS = {
    "int4": "4-bit integers, an fp16 scale per 128 weights (GPTQ/AWQ group size 128): 4.125 bits",
    "q8_0": "GGUF Q8_0: 32 int8 and an fp16 scale per block: 8.5 bits",
    "q4_0": "GGUF Q4_0: 32 4-bit weights and an fp16 scale per block: 4.5 bits",
    "q4_1": "GGUF Q4_1: Q4_0 plus an fp16 minimum per block: 5 bits",
    "q5_0": "GGUF Q5_0: 32 5-bit weights and an fp16 scale per block: 5.5 bits",
    "q2_k": "GGUF Q2_K: 256-weight super-blocks of 2-bit weights, 4-bit scales and mins: 2.625 bits",
    "q3_k": "GGUF Q3_K: 256-weight super-blocks of 3-bit weights, 6-bit scales: 3.4375 bits",
    "q4_k": "GGUF Q4_K: 256-weight super-blocks of 4-bit weights, 6-bit scales and mins: 4.5 bits",
    "q5_k": "GGUF Q5_K: 256-weight super-blocks of 5-bit weights, 6-bit scales and mins: 5.5 bits",
    "q6_k": "GGUF Q6_K: 256-weight super-blocks of 6-bit weights, 8-bit scales: 6.5625 bits",
}
WeightFormat = literal_of(WEIGHT_FORMATS)
# What tables keyed by format (a profile's quantized_matmul) call every format they do not name,
# a bits-per-weight figure (a mix of formats) included.
OTHER_FORMATS = "other"
WEIGHT_FORMAT_BITS: dict[str, float] = {"int4": 4.125, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5,
                                        "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
# Per weight, dequantizing in the kernel: scale (and minimum) applied, one multiply and one add.
DEQUANT_FLOPS_PER_WEIGHT = 2.0


def bytes_per_weight(stored: "str | float") -> float:
    """Bytes one stored weight takes: a dtype's, a quantized format's (scales included), or a
    user's bits per weight."""
    if isinstance(stored, (int, float)):
        return float(stored) / 8.0
    if stored in WEIGHT_FORMAT_BITS:
        return WEIGHT_FORMAT_BITS[stored] / 8.0
    return float(DTYPE_BYTES[stored])


def is_quantized(stored: "str | float") -> bool:
    """Stored narrower than any compute dtype, dequantized in the kernel."""
    return not isinstance(stored, str) or stored in WEIGHT_FORMAT_BITS


# Bus-bandwidth factors follow nccl-tests' PERFORMANCE.md.
COLLECTIVES = {
    "all_reduce": "every rank ends with the sum of all buffers (bus bandwidth = algbw x 2(n-1)/n)",
    "all_gather": "every rank ends with every rank's shard (busbw = algbw x (n-1)/n)",
    "reduce_scatter": "every rank ends with its shard of the sum (busbw = algbw x (n-1)/n)",
    "all_to_all": "every rank sends a distinct slice to every other rank (busbw = algbw x (n-1)/n)",
    "p2p": "one rank sends to one other, as between pipeline stages (busbw = algbw)",
}
Collective = literal_of(COLLECTIVES)

GATING_POLICIES = {
    "topk": "softmax over E experts, keep the top k",
    "noisy_topk": "noise_std: N(0,1)*softplus(x Wnoise) added before top-k; two d x E gate products (Shazeer 2017)",
    "switch": "top-1 (k: 1); router in fp32 (Fedus 2021)",
    "gshard": "top-2 (k: 2); second expert kept with probability min(1, 2 g2) (Lepikhin 2020)",
    "expert_choice": "each expert takes its top cf*T*k/E tokens; tokens get 0..E experts (Zhou 2022)",
    "base": "balanced assignment: every expert exactly T/E tokens (Lewis 2021)",
    "hash": "vocab, token_zipf: expert = hash(token id); balance follows token frequencies (Roller 2021)",
    "hierarchical": "groups, k_primary, noisy: a primary gate picks k_primary groups, each group's gate picks k/k_primary (Shazeer 2017)",
    "moefication": "router = the k-means centroids of the FFN's W_in rows: d x E scores, keep the top k (Zhang 2022; SSD 2024)",
    "round_robin": "token i takes experts i*k .. i*k+k-1 (mod E), whatever its data: exactly balanced, each token's experts "
                   "neighbours (NeMo AutoModel's FakeBalancedGate, a benchmarking gate)",
}
GatingPolicy = literal_of(GATING_POLICIES)
# Policies under which every token takes exactly k experts: with uniform popularity their expert
# shares are exactly 1/E, and no routing sample is drawn.
K_PER_TOKEN_POLICIES = ("topk", "noisy_topk", "switch", "moefication", "hierarchical")
# Policies that pick experts without a learned gate: no gate weights, no gate product, no top-k.
GATELESS_POLICIES = ("hash", "round_robin")

# T tokens in the routing group, E experts, k experts per token, cf the capacity factor.
CAPACITY_FORMULAS = {
    "switch": "C = ceil(cf * k * T / E) (Fedus et al. 2021)",
    "gshard": "C = ceil(cf * 2 * T / E) (Lepikhin et al. 2020)",
    "deepspeed": "C = max(ceil(cf * T / E) * k, min_capacity) (DeepSpeed-MoE, Rajbhandari et al. 2022)",
    "tutel": "C = k * int(cf * ceil(T / E)), rounded up to capacity_alignment (Hwang et al. 2023)",
}
CapacityFormula = literal_of(CAPACITY_FORMULAS)
