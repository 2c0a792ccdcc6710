"""Chunked prefill (Sarathi-Serve hybrid steps) and request-length distributions in serving."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from simcc.layout import build_layout
from simcc.model.anytime import served_units
from simcc.model.blocks import Batch
from simcc.model.graph import Unit
from simcc.plan.serving import serving_costs, unmasked_units, with_hybrid_steps
from simcc.plan.training import forward_work
from simcc.sim.serving import Request, draw_lengths, poisson_requests, simulate_serving
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import LENGTH_DATASETS

from conftest import ROOT, write

# A tiny model: hidden 64; attention with 4 heads of 16 (fused, causal); a ReLU FFN of 256.
TINY = """\
name: tiny
mode: serve
model:
  name: tiny
  hidden: 64
  blocks:
    - attention: {heads: 4, head_dim: 16, impl: flash}
    - dense_ffn: {hidden: 256, gated: false, activation: relu}
precision: {weights: fp16, compute: fp16, gradients: fp16, communication: fp16, kv_cache: fp16}
serve: {batch: 8, prompt_tokens: 509, output_tokens: 16}
"""


def _tiny(tmp_path, *overrides: str):
    path = write(tmp_path, "tiny.yaml", TINY)
    workload, src = load_workload(str(path), list(overrides))
    system = load_hardware("h200", ["memory_gb=200"])
    return workload, system, build_layout(workload, system, src)


def _llama(*overrides: str):
    workload, src = load_workload("workloads/validation/llama2_7b_serve.yaml", list(overrides))
    system = load_hardware("h100_sxm", [])
    return workload, system, build_layout(workload, system, src)


def test_hybrid_step_work_by_hand(tmp_path):
    """3 decodes + a 509-token chunk under C = 512, the chunk 1,000 tokens into its prompt.

    Token-parallel part: one forward over 3 + 509 = 512 tokens. GEMM weights (hidden 64):
    qkv 64 x (4 + 2*4)*16 = 64 x 192 = 12,288; out 64 x 64 = 4,096; up 64 x 256 = 16,384;
    down 256 x 64 = 16,384; total 49,152. FLOPs = 2 x 512 x 49,152 = 50,331,648. Bytes (fp16):
    each weight read once (49,152 x 2 = 98,304 B) plus activations in and out,
    2 x 512 x (64+192 + 64+64 + 64+256 + 256+64) = 1,048,576 B.
    Attention of the chunk: 4 FLOPs per (query, key) pair per head dim, 4 heads x 16:
    own tokens, causal (fused kernel skips the masked half): 0.5 x 509^2 pairs -> 4 x 0.5 x 509^2 x 64
    = 33,160,832; the 1,000-token prefix, unmasked: 509 x 1,000 pairs -> 4 x 509,000 x 64 = 130,304,000.
    """
    workload, _, layout = _tiny(tmp_path, "serve.chunked_prefill_tokens=512")
    units = served_units(workload)
    step = forward_work(units, workload, layout, Batch(1, 512, 0))
    gemms = [i for i in step.items if getattr(i, "family", None) == "gemm"]
    assert sum(g.flops for g in gemms) == 2 * 512 * 49_152
    assert sum(g.bytes for g in gemms) == 49_152 * 2 + 1_048_576

    attention = [Unit(tuple(b for b in u.blocks if b.kind == "attention")) for u in units]
    own = forward_work(attention, workload, layout, Batch(1, 509, 509))
    prefix = forward_work(unmasked_units(attention), workload, layout, Batch(1, 509, 1000))
    core = lambda work: sum(i.flops for i in work.items if i.name == "attn.core")  # noqa: E731
    assert core(own) == 4 * 0.5 * 509**2 * 64
    assert core(prefix) == 4 * 509 * 1000 * 64


def test_piggybacked_decodes_share_the_weight_reads(tmp_path):
    """A step of 3 decode tokens and a 509-token chunk reads the weights once: cheaper than the
    two run apart, by at least one weight read and the step overhead."""
    workload, system, layout = _llama("serve.batch=8", "serve.prompt_tokens=509", "serve.output_tokens=16",
                                      "serve.chunked_prefill_tokens=512")
    costs = with_hybrid_steps(serving_costs(workload, system, layout), workload, system, layout, 4096)
    hybrid = costs.hybrid
    # LLaMA-2 7B's ~13 GB of fp16 weights take milliseconds to stream on an H100: a second read is
    # most of a small step's cost
    together = hybrid.tokens(512)
    apart = hybrid.tokens(3) + hybrid.tokens(509)
    assert together < apart - 0.5 * hybrid.tokens(3)
    # the prefix block is c x p pairs: twice the prefix, about twice its cost (the device's attention
    # efficiency curve moves it by a few percent)
    extra = lambda p: hybrid.chunk(512, p) - hybrid.chunk(512, 0)  # noqa: E731
    assert extra(2048) == pytest.approx(2 * extra(1024), rel=0.15)
    assert extra(1024) > 0


def test_a_lone_long_prompt_spans_ceil_p_over_c_steps(tmp_path):
    workload, system, layout = _llama("serve.batch=8", "serve.prompt_tokens=1000", "serve.output_tokens=16",
                                      "serve.chunked_prefill_tokens=256")
    costs = with_hybrid_steps(serving_costs(workload, system, layout), workload, system, layout, 1000)
    result = simulate_serving(costs, workload.serve, [Request(0.0, 1000, 1)], 1)
    assert result.events == math.ceil(1000 / 256)  # 4 steps of 256, 256, 256, 232 tokens; one output token
    hybrid = costs.hybrid
    expected = sum(hybrid.tokens(c) + hybrid.chunk(c, done) for c, done in ((256, 0), (256, 256), (256, 512), (232, 768)))
    assert result.ttft[0] == pytest.approx(expected, rel=1e-12)


def test_a_chunk_holding_the_whole_prompt_is_todays_prefill():
    """C >= prompt + decodes on a lone request: one step, as the unchunked server. An even output
    makes the decodes' mean context (prompt + output/2) the decode table's reference."""
    base = ["serve.batch=4", "serve.prompt_tokens=512", "serve.output_tokens=64"]
    workload, system, layout = _llama(*base)
    today = simulate_serving(serving_costs(workload, system, layout), workload.serve, [Request(0.0, 512, 64)], 1)
    chunked_wl, _, _ = _llama(*base, "serve.chunked_prefill_tokens=1024")
    costs = with_hybrid_steps(serving_costs(chunked_wl, system, layout), chunked_wl, system, layout, 512)
    chunked = simulate_serving(costs, chunked_wl.serve, [Request(0.0, 512, 64)], 1)
    assert chunked.ttft[0] == pytest.approx(today.ttft[0], rel=1e-9)
    assert chunked.latency[0] == pytest.approx(today.latency[0], rel=1e-9)
    assert chunked.tpot[0] == pytest.approx(today.tpot[0], rel=1e-9)


def _mixed_load(chunk: int | None):
    """Long prompts arriving into a batch of decoding requests."""
    overrides = ["serve.batch=32", "serve.prompt_tokens=4096", "serve.output_tokens=128", "serve.arrival_rate=6"]
    if chunk:
        overrides.append(f"serve.chunked_prefill_tokens={chunk}")
    workload, system, layout = _llama(*overrides)
    costs = with_hybrid_steps(serving_costs(workload, system, layout), workload, system, layout, 4096)
    requests = poisson_requests(6.0, 600, workload.serve, seed=3)
    return costs, simulate_serving(costs, workload.serve, requests, 1)


def test_chunking_stops_prompts_stalling_the_decodes():
    _, whole = _mixed_load(None)
    _, chunked = _mixed_load(512)
    p99 = lambda r: float(np.percentile(r.tpot, 99))  # noqa: E731
    assert p99(chunked) < 0.8 * p99(whole)  # a 4,096-token prefill no longer stalls a decode whole
    # a lone long request waits for several chunk steps instead of one: its TTFT rises slightly
    lone = {}
    for chunk in (None, 512):
        costs, _ = _mixed_load(chunk)
        workload, _, _ = _llama("serve.batch=32", "serve.prompt_tokens=4096", "serve.output_tokens=128",
                                *([f"serve.chunked_prefill_tokens={chunk}"] if chunk else []))
        lone[chunk] = simulate_serving(costs, workload.serve, [Request(0.0, 4096, 2)], 1).ttft[0]
    assert lone[None] < lone[512] < 1.3 * lone[None]


def test_ttft_and_tpot_are_measured_from_the_step_that_finishes_the_prompt():
    costs, result = _mixed_load(512)
    assert len(result.ttft) == len(result.latency) == 600
    for ttft, tpot, output in result.finished:
        assert ttft > 0 and tpot > 0 and output == 128
    # latency = TTFT + (output - 1) x TPOT, request by request
    ends = sorted(f[0] + (f[2] - 1) * f[1] for f in result.finished)
    assert ends == pytest.approx(sorted(result.latency), rel=1e-9)


# ------------------------------------------------------------------------- length distributions

def _serve(tmp_path, lengths: str):
    workload, _, _ = _tiny(tmp_path, *lengths.split())
    return workload.serve


def test_lognormal_lengths_have_their_median_and_sigma(tmp_path):
    serve = _serve(tmp_path, "serve.lengths.prompt.distribution=lognormal serve.lengths.prompt.median=800 "
                             "serve.lengths.prompt.sigma=0.7")
    prompts, outputs = draw_lengths(serve, 40_000, np.random.default_rng(0))
    assert np.median(prompts) == pytest.approx(800, rel=0.02)
    # std of log: sigma; standard error ~ 0.7 / sqrt(2 n) = 0.0025
    assert np.log(prompts).std() == pytest.approx(0.7, abs=0.01)
    assert set(outputs.tolist()) == {16}  # the side left out keeps serve.output_tokens


def test_uniform_lengths_and_the_context_cut(tmp_path):
    serve = _serve(tmp_path, "serve.lengths.output.distribution=uniform serve.lengths.output.low=10 "
                             "serve.lengths.output.high=30 serve.lengths.max_context=520")
    prompts, outputs = draw_lengths(serve, 40_000, np.random.default_rng(0))
    # prompt 509 leaves 520 - 509 = 11 tokens: outputs 10..30 cut to 11
    assert outputs.min() == 10 and outputs.max() == 11
    serve = _serve(tmp_path, "serve.lengths.output.distribution=uniform serve.lengths.output.low=10 "
                             "serve.lengths.output.high=30")
    _, outputs = draw_lengths(serve, 40_000, np.random.default_rng(0))
    assert outputs.min() == 10 and outputs.max() == 30
    assert outputs.mean() == pytest.approx(20, abs=0.1)  # (10 + 30) / 2; se = sqrt((21^2-1)/12 / n) = 0.03


def test_a_named_trace_keeps_its_published_medians(tmp_path):
    """Splitwise (arXiv 2311.18677, Sec. III-B): conversation medians 1,020 prompt / 129 output."""
    serve = _serve(tmp_path, "serve.lengths.dataset=azure_conv_2023")
    prompts, outputs = draw_lengths(serve, 50_000, np.random.default_rng(1))
    assert np.median(prompts) == pytest.approx(1020, rel=0.03)
    assert np.median(outputs) == pytest.approx(129, rel=0.05)
    assert prompts.max() <= LENGTH_DATASETS["azure_conv_2023"][0].tokens[-1]


def test_lengths_are_deterministic_by_seed(tmp_path):
    serve = _serve(tmp_path, "serve.lengths.dataset=azure_code_2023 serve.arrival_rate=5")
    first = poisson_requests(5.0, 500, serve, seed=7)
    assert first == poisson_requests(5.0, 500, serve, seed=7)
    assert first != poisson_requests(5.0, 500, serve, seed=8)
    fixed = _serve(tmp_path, "serve.arrival_rate=5")
    # arrivals are drawn first, so varying the lengths leaves them where they were
    assert [r.arrival for r in first] == [r.arrival for r in poisson_requests(5.0, 500, fixed, seed=7)]


def test_varying_prompts_are_costed_with_their_quadratic_attention():
    """A batch of prompts 256 and 3,840 costs more than two of 2,048: the same tokens, but
    attention pairs 256^2/2 + 3840^2/2 > 2 x 2048^2/2."""
    workload, system, layout = _llama("serve.batch=2", "serve.prompt_tokens=2048", "serve.output_tokens=2",
                                      "serve.lengths.dataset=azure_conv_2023")
    costs = with_hybrid_steps(serving_costs(workload, system, layout), workload, system, layout, 3840)
    even = simulate_serving(costs, workload.serve, [Request(0.0, 2048, 1), Request(0.0, 2048, 1)], 1)
    uneven = simulate_serving(costs, workload.serve, [Request(0.0, 256, 1), Request(0.0, 3840, 1)], 1)
    assert uneven.ttft[0] > even.ttft[0]


def test_estimate_notes_the_prefill_mode_and_lengths():
    out = subprocess.run([sys.executable, "-m", "simcc", "estimate", "workloads/validation/llama2_7b_serve.yaml",
                          "--hardware", "h100_sxm", "--requests", "300", "--set", "serve.batch=16",
                          "--set", "serve.arrival_rate=4", "--set", "serve.chunked_prefill_tokens=256",
                          "--set", "serve.lengths.dataset=azure_conv_2023"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "chunked prefill, 256 tokens per step" in out.stdout
    assert "lengths drawn from azure_conv_2023" in out.stdout


@pytest.mark.parametrize("setting, field", [
    ("serve.chunked_prefill_tokens=0", "chunked_prefill_tokens"),
    ("serve.chunked_prefill_tokens=-1", "chunked_prefill_tokens"),
    ("serve.chunked_prefill_tokens=abc", "chunked_prefill_tokens"),
    ("serve.chunked_prefill_tokens=4", "chunked_prefill_tokens"),  # below batch 16
    ("serve.lengths.prompt.distribution=lognormal serve.lengths.prompt.median=100 serve.lengths.prompt.sigma=-1",
     "sigma"),
    ("serve.lengths.dataset=sharegpt_unknown", "dataset"),
    ("serve.lengths.output.distribution=uniform serve.lengths.output.low=50 serve.lengths.output.high=10",
     "low"),
    ("serve.lengths.prompt.distribution=lognormal serve.lengths.prompt.median=nan serve.lengths.prompt.sigma=1",
     "median"),
])
def test_hostile_inputs_give_one_line_and_exit_2(setting, field):
    args = [sys.executable, "-m", "simcc", "estimate", "workloads/validation/llama2_7b_serve.yaml", "--hardware",
            "h100_sxm", "--requests", "10", "--set", "serve.batch=16"]
    for item in setting.split():
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and field in out.stderr
