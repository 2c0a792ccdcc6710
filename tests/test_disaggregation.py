"""Prefill/decode disaggregation (serve.disaggregated): DistServe (Zhong et al. OSDI'24) and
Splitwise (Patel et al. ISCA'24) run prompts and decodes on separate pools and move each prompt's
KV cache between them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.plan.serving import disaggregation_link, serving_costs, with_hybrid_steps
from simcc.sim.serving import Request, percentile, poisson_requests, simulate_disaggregated, simulate_serving
from simcc.specs.loader import load_hardware, load_workload

from conftest import ROOT

LLAMA = "workloads/validation/llama2_7b_serve.yaml"
SPLIT = "serve.disaggregated.prefill_replicas={} serve.disaggregated.decode_replicas={}"

# A 50 GB/s, 10 us link per device: DGX H100 nodes with one 400 Gbit/s NIC per GPU (400/8 = 50 GB/s)
# and the protocol efficiency set to 1, so that the per-device bandwidth is exactly 50e9 B/s.
LINK_50 = ["network.efficiency=1.0", "network.latency_us=10"]


def _setup(hardware: str, hardware_overrides: list[str], *overrides: str):
    workload, src = load_workload(LLAMA, [o for item in overrides for o in item.split()])
    system = load_hardware(hardware, hardware_overrides)
    layout = build_layout(workload, system, src)
    return workload, system, layout, src


def _link(workload, system, layout, src):
    return disaggregation_link(workload.serve.disaggregated, system, layout, src)


# LLaMA-2 7B, tp = 1: 32 layers x (K and V) x 32 heads x 128 dims x 2 bytes (fp16) = 524,288 B per
# token on one device, no sliding window. A 2,000-token prompt: 2,000 x 524,288 = 1,048,576,000 B.
KV_PER_TOKEN = 32 * 2 * 32 * 128 * 2
PROMPT = 2000
SHARD = PROMPT * KV_PER_TOKEN
TRANSFER = 10e-6 + SHARD / 50e9  # = 0.02098152 s


def test_kv_transfer_and_a_lone_request_by_hand():
    """A lone request: its first token at the end of its prefill (one prompt: the prefill table at
    batch 1), its prompt's KV cache then crosses the link (latency + bytes / bandwidth), and its
    second token comes one decode step (the decode table at batch 1) after the transfer ends."""
    workload, system, layout, src = _setup("dgx_h100_x4", LINK_50, "serve.batch=8", f"serve.prompt_tokens={PROMPT}",
                                           "serve.output_tokens=64", SPLIT.format(1, 1))
    costs = serving_costs(workload, system, layout)
    assert costs.kv_bytes_per_token == KV_PER_TOKEN
    assert TRANSFER == pytest.approx(0.02098152, abs=1e-12)
    link = _link(workload, system, layout, src)
    assert link.seconds(SHARD) == pytest.approx(TRANSFER, rel=1e-12)

    prefill, decode = costs.prefill.at(1), costs.decode.at(1)
    for output in (2, 3):
        pools = simulate_disaggregated(costs, workload.serve, [Request(1.0, PROMPT, output)], link)
        served = pools.serving
        assert served.ttft == [pytest.approx(prefill, rel=1e-12)]
        assert pools.transfer == [pytest.approx(TRANSFER, rel=1e-12)]
        assert pools.shard_bytes == [SHARD]
        assert pools.handoff == [pytest.approx(TRANSFER, rel=1e-9)]  # the batch was empty: it joins at once
        # second token = prefill + transfer + one decode step; each later token one more step
        assert served.latency == [pytest.approx(prefill + TRANSFER + (output - 1) * decode, rel=1e-12)]
        assert served.tpot == [pytest.approx((TRANSFER + (output - 1) * decode) / (output - 1), rel=1e-12)]
        assert pools.prefill_busy == pytest.approx(prefill) and pools.decode_busy == pytest.approx((output - 1) * decode)


def test_no_per_token_events():
    """1,000 output tokens of a lone request: a prefill, an idle wait for the prompt, a pull, the
    transfer's end, one stretch of 999 decode steps; not one event per token."""
    workload, system, layout, src = _setup("dgx_h100_x4", LINK_50, "serve.batch=8", f"serve.prompt_tokens={PROMPT}",
                                           "serve.output_tokens=1000", SPLIT.format(1, 1))
    costs = serving_costs(workload, system, layout)
    pools = simulate_disaggregated(costs, workload.serve, [Request(0.0, PROMPT, 1000)], _link(workload, system, layout, src))
    assert pools.serving.events <= 6


def test_a_one_token_request_never_reaches_the_decode_pool():
    workload, system, layout, src = _setup("dgx_h100_x4", LINK_50, "serve.batch=8", SPLIT.format(1, 1))
    costs = serving_costs(workload, system, layout)
    pools = simulate_disaggregated(costs, workload.serve, [Request(0.0, 100, 1)], _link(workload, system, layout, src))
    assert pools.transfer == [] and pools.serving.latency == pools.serving.ttft
    assert pools.serving.output_tokens == 1


def test_chunked_prefill_on_the_prefill_pool_is_the_colocated_chunked_prefill_of_a_lone_prompt():
    """Alone, a colocated chunked server runs the prompt's chunks with no decodes beside them: the
    prefill instance's chunk steps are the same steps, so the first token comes at the same time."""
    base = ("serve.batch=8 serve.prompt_tokens=1000 serve.output_tokens=16 serve.chunked_prefill_tokens=256",)
    workload, system, layout, src = _setup("dgx_h100_x4", LINK_50, *base, SPLIT.format(1, 1))
    costs = with_hybrid_steps(serving_costs(workload, system, layout), workload, system, layout, 1000)
    colocated = simulate_serving(costs, workload.serve, [Request(0.0, 1000, 16)], 1)
    pools = simulate_disaggregated(costs, workload.serve, [Request(0.0, 1000, 16)], _link(workload, system, layout, src))
    assert pools.serving.ttft[0] == pytest.approx(colocated.ttft[0], rel=1e-12)
    assert pools.serving.latency[0] > colocated.latency[0]  # the transfer comes on top


def _mixed_load(*split: str):
    """LLaMA-2 7B on 8 H100s of one node, 2,000-token prompts and 128-token outputs at 16 requests/s
    (Poisson), whole-prompt prefill: colocated on 8 replicas, or 2 prefill + 6 decode instances."""
    base = ("serve.batch=32 serve.prompt_tokens=2000 serve.output_tokens=128 serve.arrival_rate=16",)
    workload, system, layout, src = _setup("dgx_h100_x1", [], *base, *split)
    costs = serving_costs(workload, system, layout)
    requests = poisson_requests(16.0, 3000, workload.serve, 0)
    if not split:
        return simulate_serving(costs, workload.serve, requests, layout.dp), None
    pools = simulate_disaggregated(costs, workload.serve, requests, _link(workload, system, layout, src))
    return pools.serving, pools


def test_disaggregation_lowers_tpot_p99_and_raises_ttft_p99():
    """DistServe's interference argument (Sec. 2.2): colocated, a 2,000-token prefill (~43 ms)
    stalls every running decode (~7 ms steps); on their own pool decodes never wait for a prompt,
    so the worst TPOT falls. The prompts now share 2 instances instead of 8, so the worst TTFT
    rises (queueing), though less than twofold at this load."""
    colocated, _ = _mixed_load()
    split, pools = _mixed_load(SPLIT.format(2, 6), "serve.disaggregated.kv_link=intra")
    assert percentile(split.tpot, 99) < 0.95 * percentile(colocated.tpot, 99)
    assert percentile(colocated.ttft, 99) < percentile(split.ttft, 99) < 2 * percentile(colocated.ttft, 99)
    assert len(split.latency) == len(colocated.latency) * 8 // 2  # 8 replicas each simulate 1/8; 2 groups each 1/2
    assert pools is not None and pools.groups == 2 and (pools.prefill_instances, pools.decode_instances) == (1, 3)


def test_a_faster_link_shortens_the_handoff():
    """The same 32 H100s (tp = 1), 8 prefill + 24 decode instances, over NVLink (450 GB/s x 0.8
    per device, 2 us) or the NIC (50 GB/s x 0.8, 5 us): each transfer shrinks by the bandwidth
    ratio, and the handoff and TPOT with it."""
    out = {}
    for link in ("intra", "inter"):
        workload, system, layout, src = _setup(
            "dgx_h100_x4", [], "serve.batch=32 serve.prompt_tokens=2000 serve.output_tokens=128",
            SPLIT.format(8, 24), f"serve.disaggregated.kv_link={link}")
        costs = serving_costs(workload, system, layout)
        out[link] = simulate_disaggregated(costs, workload.serve, poisson_requests(40.0, 4000, workload.serve, 0),
                                           _link(workload, system, layout, src))
    assert out["intra"].transfer[0] == pytest.approx(2e-6 + SHARD / (450e9 * 0.8), rel=1e-12)
    assert out["inter"].transfer[0] == pytest.approx(5e-6 + SHARD / (50e9 * 0.8), rel=1e-12)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(out["intra"].handoff) < mean(out["inter"].handoff)
    assert mean(out["intra"].serving.tpot) < mean(out["inter"].serving.tpot)


@pytest.mark.parametrize("hardware, settings, field, words", [
    ("dgx_h100_x1", [SPLIT.format(4, 5)], "serve.disaggregated", "9 instances"),  # 8 replicas
    ("dgx_h100", [SPLIT.format(1, 1)], "serve.disaggregated.kv_link", "one node"),  # inter needs a network
    ("dgx_h100_x4", [SPLIT.format(2, 4), "serve.disaggregated.kv_link=intra"], "serve.disaggregated.kv_link",
     "in one node"),  # tp 4: gcd 2, 1 + 2 instances of 4 devices = 12 > 8
    ("dgx_h100_x4", [SPLIT.format(3, 5), "serve.disaggregated.kv_link=intra"], "serve.disaggregated.kv_link",
     "in one node"),  # tp 4: gcd 1, 8 instances of 4 devices
])
def test_pool_sizing_errors(hardware, settings, field, words):
    overrides = ["parallelism.tp=4"] if hardware == "dgx_h100_x4" else []
    workload, system, layout, src = _setup(hardware, [], *overrides, *settings)
    with pytest.raises(InputError) as err:
        _link(workload, system, layout, src)
    assert err.value.field == field and words in err.value.message
    assert "\n" not in str(err.value)


def test_expert_groups_stay_in_one_pool():
    """Qwen3-30B-A3B with ep = 8 over tp = 1 replicas: an expert group spans 8 replicas, so each
    pool must hold whole groups."""
    workload, src = load_workload("workloads/validation/qwen3_30b_a3b_serve.yaml",
                                  ["parallelism.ep=8", *SPLIT.format(4, 12).split()])
    system = load_hardware("dgx_h100_x4", [])
    layout = build_layout(workload, system, src)
    with pytest.raises(InputError) as err:
        disaggregation_link(workload.serve.disaggregated, system, layout, src)
    assert err.value.field == "serve.disaggregated.prefill_replicas" and "multiple of 8" in err.value.message


@pytest.mark.parametrize("setting, field", [
    ("serve.disaggregated.prefill_replicas=0", "prefill_replicas"),
    ("serve.disaggregated.decode_replicas=-2", "decode_replicas"),
    ("serve.disaggregated.decode_replicas=abc", "decode_replicas"),
    ("serve.disaggregated.prefill_replicas=2000000", "prefill_replicas"),
    ("serve.disaggregated.kv_link=pcie", "kv_link"),
    ("serve.disaggregated.kv_lnk=inter", "kv_lnk"),
    ("serve.disaggregated.decode_replicas=40", "serve.disaggregated"),  # 41 of 32 instances
])
def test_hostile_inputs_give_one_line_and_exit_2(setting, field):
    args = [sys.executable, "-m", "simcc", "estimate", LLAMA, "--hardware", "dgx_h100_x4", "--requests", "10",
            "--set", "serve.disaggregated.prefill_replicas=1", "--set", "serve.disaggregated.decode_replicas=1",
            "--set", setting]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and field in out.stderr


def test_estimate_reports_the_pools_and_absent_section_changes_nothing():
    common = ["--hardware", "dgx_h100_x4", "--requests", "400", "--format", "json", "--slo-ttft", "0.2",
              "--slo-tpot", "0.01", "--set", "serve.batch=32", "--set", "serve.prompt_tokens=2000",
              "--set", "serve.output_tokens=128", "--set", "serve.arrival_rate=40"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "simcc", "estimate", LLAMA, *common, *extra],  # noqa: E731
                                        capture_output=True, text=True, cwd=ROOT)
    plain, split = run(), run("--set", "serve.disaggregated.prefill_replicas=8", "--set",
                              "serve.disaggregated.decode_replicas=24")
    assert plain.returncode == 0 and split.returncode == 0, plain.stderr + split.stderr
    plain_doc, split_doc = json.loads(plain.stdout), json.loads(split.stdout)
    assert "disaggregated" not in plain_doc
    pools = split_doc["disaggregated"]
    assert pools["prefill_instances"] == 8 and pools["decode_instances"] == 24 and pools["kv_link"] == "inter"
    assert pools["kv_mb_per_device_mean"] == pytest.approx(SHARD / 1e6)
    assert pools["kv_transfer_mean_s"] == pytest.approx(5e-6 + SHARD / 40e9, rel=1e-9)  # 50 GB/s x 0.8
    assert 0 < pools["prefill_busy_share"] < pools["decode_busy_share"] <= 1
    assert split_doc["latency"]["requests_simulated"] == 400
    assert 0 <= split_doc["goodput"]["share_meeting_slo"] <= 1
    # the same sections as before, with the same numbers whether the section is absent or null
    null = run("--set", "serve.disaggregated=null")
    assert null.returncode == 0 and json.loads(null.stdout) == plain_doc


def test_python_api_estimate_matches_the_simulator():
    workload, src = load_workload(LLAMA, ["serve.batch=8", "serve.prompt_tokens=500", "serve.output_tokens=32",
                                          "serve.arrival_rate=8", *SPLIT.format(2, 2).split(),
                                          "serve.disaggregated.kv_link=intra"])
    result = estimate(workload, load_hardware("dgx_h100_x1", []), src, SimulationOptions(request_count=200))
    assert result.disaggregated is not None and result.latency is not None
    assert result.latency.requests_simulated == 200
    assert any("4 of 8 replicas are in neither pool" in note for note in result.notes)
