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
}
GatingPolicy = literal_of(GATING_POLICIES)

# T tokens in the routing group, E experts, k experts per token, cf the capacity factor.
CAPACITY_FORMULAS = {
    "switch": "C = ceil(cf * k * T / E) (Fedus et al. 2021)",
    "gshard": "C = ceil(cf * 2 * T / E) (Lepikhin et al. 2020)",
    "deepspeed": "C = max(ceil(cf * T / E) * k, min_capacity) (DeepSpeed-MoE, Rajbhandari et al. 2022)",
    "tutel": "C = k * int(cf * ceil(T / E)), rounded up to capacity_alignment (Hwang et al. 2023)",
}
CapacityFormula = literal_of(CAPACITY_FORMULAS)
