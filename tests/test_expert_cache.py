"""Per-layer expert caches (LRU / LFU) and speculative prefetch (Eliseev & Mazur 2023, arXiv
2312.17238, sections 3.1-3.2): hand-built routing with hand-derived loads, the knobs' directions,
the absent section, and hostile inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from simcc.estimate import estimate
from simcc.layout import build_layout
from simcc.plan.serving import ExpertCacheReplay, serving_costs
from simcc.specs.loader import load_hardware, load_workload

LOAD = 0.1  # seconds per expert on the storage link


def _replay(policy: str, capacity: int, experts: int = 4, layers: int = 1, prefetch: int = 0,
            recall: float = 0.0) -> ExpertCacheReplay:
    probs = [np.full(experts, 1.0 / experts)] * layers
    return ExpertCacheReplay([experts] * layers, probs, capacity, policy, prefetch, recall, LOAD,
                             np.random.default_rng(0))


def _hits(replay: ExpertCacheReplay, trace: list[list[int]]) -> float:
    total = None
    for step in trace:
        loads = replay.step([np.array(step)], 1.0)
        total = loads if total is None else total + loads
    return total.hits / total.lookups


# Two hot experts (0, 1) every step, plus a cold one cycling 2, 3, 2, 3 ...; a cache of 2 per layer.
TRACE = [[0, 1, 2 + s % 2] for s in range(20)]


def test_lfu_keeps_the_hot_experts_lru_does_not():
    # Evictions run after the layer's touches (touch order 0, 1, cold), down to 2 experts.
    # LFU (uses over the run, ties to the least recent): step 1 {0,1,2} all miss, counts 1/1/1,
    # evict 0 (oldest) -> {1,2}. Step 2 {0,1,3}: 0 miss, 1 hit, 3 miss; counts 0:2 1:2 2:1 3:1 ->
    # evict 2 and 3 -> {0,1}. Steps 3..20: 0 and 1 hit, the cold one misses and is evicted at once
    # (its count, at most 10, stays below the hot ones'). Hits 1 + 2 x 18 = 37 of 60 lookups.
    assert _hits(_replay("lfu", 2), TRACE) == pytest.approx(37 / 60)
    # LRU: step 1 leaves [1,2]; step 2: 0 miss, 1 hit, 3 miss -> order [2,0,1,3] -> keep [1,3];
    # step 3: 0 miss, 1 hit, 2 miss -> keep [1,2]; and so on: one hit per step from step 2, 19 of 60.
    assert _hits(_replay("lru", 2), TRACE) == pytest.approx(19 / 60)


def test_cache_of_every_expert_hits_after_the_first_touch():
    # 4 experts, cache 4: only the first use of each expert misses (4 of 60 lookups).
    assert _hits(_replay("lru", 4), TRACE) == pytest.approx(56 / 60)
    assert _hits(_replay("lfu", 4), TRACE) == pytest.approx(56 / 60)


def test_prefetch_with_full_recall_hides_loads_up_to_the_compute():
    # Two layers, 4 experts, cache 1, each step needs expert s % 4 in both layers (always a miss).
    # Layer 0 cannot be guessed: 1 miss = 0.1 s exposed. Layer 1, recall 1, prefetch 1: its expert
    # loads (0.1 s) under layer 0's compute c; exposed max(0, 0.1 - c), hidden min(0.1, c).
    for compute, exposed, hidden in ((0.25, 0.1, 0.1), (0.04, 0.1 + 0.06, 0.04)):
        replay = _replay("lru", 1, layers=2, prefetch=1, recall=1.0)
        for s in range(4):
            loads = replay.step([np.array([s]), np.array([s])], compute)
            assert loads.exposed == pytest.approx(exposed)
            assert loads.hidden == pytest.approx(hidden)
            assert loads.wasted == 0.0
    none = _replay("lru", 1, layers=2).step([np.array([0]), np.array([0])], 0.25)
    assert none.exposed == pytest.approx(0.2)  # without prefetch both misses are serial


def test_prefetch_with_zero_recall_only_wastes_bandwidth():
    # Layer 1 guesses an unneeded expert (0.1 s on the link) under a 0.04 s compute: 0.06 s of it
    # delays the layer's own miss. Exposed 0.1 (layer 0) + 0.06 + 0.1 = 0.26 s vs 0.2 s without.
    replay = _replay("lru", 1, experts=2, layers=2, prefetch=1, recall=0.0)
    loads = replay.step([np.array([0]), np.array([0])], 0.04)
    assert loads.wasted == pytest.approx(0.1)
    assert loads.hidden == 0.0
    assert loads.exposed == pytest.approx(0.26)
    assert loads.exposed > _replay("lru", 1, experts=2, layers=2).step([np.array([0]), np.array([0])], 0.04).exposed


def _estimate(*overrides: str):
    workload, src = load_workload("mixtral_8x7b_serve_edge", list(overrides))
    system = load_hardware("jetson_agx_orin", [])
    return estimate(workload, system, src)


def test_absent_section_matches_the_global_cache_and_per_layer_lfu_differs():
    base = _estimate()
    assert base.expert_cache.policy == "lru (global)" and base.expert_cache.per_layer is None
    lfu = _estimate("serve.expert_cache.policy=lfu")
    assert lfu.expert_cache.policy == "lfu" and lfu.expert_cache.per_layer == 161 // 32
    # more recall hides more and wastes less, same knobs otherwise
    low = _estimate("serve.expert_cache.prefetch=2", "serve.expert_cache.prefetch_recall=0.2").expert_cache
    high = _estimate("serve.expert_cache.prefetch=2", "serve.expert_cache.prefetch_recall=1.0").expert_cache
    assert high.load_wasted_s_per_decode_step < low.load_wasted_s_per_decode_step
    assert high.prefetch_hit_share > low.prefetch_hit_share


def test_absent_section_leaves_the_costs_identical():
    # independent picks (the workload's consecutive-token reuse off) draw exactly as before
    workload, _ = load_workload("mixtral_8x7b_serve_edge", ["model.blocks.1.blocks.1.moe_ffn.load.consecutive_overlap=null"])
    system = load_hardware("jetson_agx_orin", [])
    costs = serving_costs(workload, system, build_layout(workload, system, "t"))
    assert costs.cache.hit_rate == pytest.approx(0.5354, abs=5e-5)  # the global LRU figure before reuse


@pytest.mark.parametrize("setting", [
    "serve.expert_cache.per_layer=0", "serve.expert_cache.per_layer=9", "serve.expert_cache.per_layer=6",
    "serve.expert_cache.prefetch_recall=1.5", "serve.expert_cache.policy=fifo", "serve.expert_cache.prefetch=2",
    "serve.expert_cache.prefetch=-1", "serve.expert_cache.prefetch=9",
])
def test_hostile_inputs_give_one_line_and_exit_2(setting):
    extra = ["--set", "serve.expert_cache.prefetch=1"] if "recall" in setting else []
    if setting.endswith("prefetch=9"):
        extra = ["--set", "serve.expert_cache.prefetch_recall=0.5"]
    out = subprocess.run([sys.executable, "-m", "simcc", "estimate", "mixtral_8x7b_serve_edge", "--hardware",
                          "jetson_agx_orin", "--set", setting, *extra], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "expert_cache" in out.stderr
