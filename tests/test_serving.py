"""The serving simulator: queueing against closed forms, batching, KV limits, traces, expert cache."""

from __future__ import annotations

import statistics

import pytest

from simcc.errors import InputError
from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.sim.serving import Request, poisson_requests, read_request_csv, simulate_serving
from simcc.specs.loader import load_hardware, load_workload
from simcc.plan.serving import measure_expert_cache, serving_costs

from conftest import write

SMALL = ["serve.batch=1", "serve.prompt_tokens=16", "serve.output_tokens=8"]


def _costs(workload_overrides, hardware="h100_sxm", hardware_overrides=()):
    workload, src = load_workload("mixtral_8x7b_serve_edge", list(workload_overrides))
    system = load_hardware(hardware, list(hardware_overrides))
    layout = build_layout(workload, system, src)
    return workload, serving_costs(workload, system, layout)


def _service_time(costs, serve) -> float:
    return costs.prefill.at(1) + (serve.output_tokens - 1) * costs.decode.at(1)


@pytest.mark.parametrize("load", [0.2, 0.5])
def test_m_d_1_queueing_matches_pollaczek_khinchine(load):
    workload, costs = _costs(SMALL, "h200", ["memory_gb=200"])
    serve = workload.serve
    service = _service_time(costs, serve)
    rate = load / service
    result = simulate_serving(costs, serve, poisson_requests(rate, 20000, serve, seed=1), 1)
    waiting = load * service / (2 * (1 - load))  # M/D/1 mean wait in queue (Pollaczek-Khinchine)
    assert statistics.fmean(result.queueing) == pytest.approx(waiting, rel=0.1)
    assert statistics.fmean(result.latency) == pytest.approx(waiting + service, rel=0.05)
    assert result.busy / result.span == pytest.approx(load, rel=0.05)


def test_unloaded_request_latency_is_prefill_plus_decode_steps():
    workload, costs = _costs(SMALL, "h200", ["memory_gb=200"])
    serve = workload.serve
    result = simulate_serving(costs, serve, [Request(0.0, 16, 8), Request(1e6, 16, 8)], 1)
    assert result.ttft[0] == pytest.approx(costs.prefill.at(1))
    assert result.latency[0] == pytest.approx(_service_time(costs, serve))
    assert result.tpot[0] == pytest.approx(costs.decode.at(1))


def test_events_follow_requests_not_tokens():
    workload, costs = _costs(SMALL, "h200", ["memory_gb=200"])
    result = simulate_serving(costs, workload.serve, [Request(0.0, 16, 8), Request(1e6, 16, 8)], 1)
    # prefill, all 7 decode steps as one stretch, idle until the second arrival, its prefill and stretch
    assert result.events == 5
    assert result.span == pytest.approx(1e6 + _service_time(costs, workload.serve))


def test_continuous_batching_raises_throughput_under_a_burst():
    def burst_throughput(batch: int) -> float:
        workload, costs = _costs([f"serve.batch={batch}", "serve.prompt_tokens=64", "serve.output_tokens=32"],
                                 "h200", ["memory_gb=200"])
        result = simulate_serving(costs, workload.serve, poisson_requests(None, 64, workload.serve, 0), 1)
        assert len(result.latency) == 64
        return result.output_tokens / result.span
    assert burst_throughput(16) > 4 * burst_throughput(1)


def test_kv_cache_limits_the_batch():
    workload, costs = _costs(["serve.batch=32", "serve.prompt_tokens=1024", "serve.output_tokens=16"], "h200",
                             ["memory_gb=200"])
    roomy = simulate_serving(costs, workload.serve, poisson_requests(None, 32, workload.serve, 0), 1)
    tight_costs = costs.__class__(**{**costs.__dict__, "kv_bytes_per_token": costs.memory.capacity / 4000})
    tight = simulate_serving(tight_costs, workload.serve, poisson_requests(None, 32, workload.serve, 0), 1)
    assert tight.span > roomy.span  # fewer requests fit at once, so the burst drains more slowly


def test_input_dependent_compute_widens_the_tail():
    workload, costs = _costs(SMALL, "h200", ["memory_gb=200"])
    serve = workload.serve
    rate = 0.5 / _service_time(costs, serve)
    base = poisson_requests(rate, 4000, serve, seed=2)
    varied = [Request(r.arrival, r.prompt, r.output, 3.0 if i % 5 == 0 else 0.5) for i, r in enumerate(base)]
    steady = simulate_serving(costs, serve, base, 1)
    spiky = simulate_serving(costs, serve, varied, 1)
    # same mean compute (0.2*3 + 0.8*0.5 = 1), heavier tail
    q = lambda xs: sorted(xs)[int(0.99 * len(xs))]  # noqa: E731
    assert q(spiky.latency) > q(steady.latency)


def test_trace_csv_is_read_and_validated(tmp_path):
    good = write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens,compute_scale\n0.5,10,4,1\n0.1,20,2,2\n")
    requests = read_request_csv(str(good))
    assert [r.arrival for r in requests] == [0.1, 0.5] and requests[0].compute_scale == 2
    with pytest.raises(InputError, match="missing column"):
        read_request_csv(str(write(tmp_path, "m.csv", "arrival_s,prompt_tokens\n0,1\n")))
    with pytest.raises(InputError, match="line 3: output_tokens"):
        read_request_csv(str(write(tmp_path, "b.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n1,2,x\n")))


def test_expert_cache_hit_rate_follows_routing_skew():
    workload, costs = _costs([], "jetson_agx_orin")
    assert 0 < costs.resident_experts < 256
    uniform = measure_expert_cache(costs, workload.serve, seed=0)
    skewed_workload, skewed_costs = _costs(["model.blocks.1.blocks.1.moe_ffn.load.distribution=zipf",
                                            "model.blocks.1.blocks.1.moe_ffn.load.alpha=1.5"], "jetson_agx_orin")
    skewed = measure_expert_cache(skewed_costs, skewed_workload.serve, seed=0)
    assert skewed.hit_rate > uniform.hit_rate
    assert skewed.decode_load_seconds[0] < uniform.decode_load_seconds[0]
    everything = measure_expert_cache(_costs([], "jetson_agx_orin", ["device.memory_gb=256"])[1], workload.serve, 0)
    assert everything.hit_rate == 1.0 and everything.decode_load_seconds == (0.0,)


def test_serving_estimate_reports_tails_and_cache():
    result = estimate(*load_workload("mixtral_8x7b_serve_edge")[:1], load_hardware("jetson_agx_orin"), "w",
                      SimulationOptions(request_count=200))
    latency = result.latency
    assert latency.ttft_p50_s <= latency.ttft_p95_s <= latency.ttft_p99_s
    assert latency.latency_p50_s <= latency.latency_p99_s
    assert 0 < result.expert_cache.hit_rate < 1
    assert 0 < result.expert_cache.loading_share_of_busy_time < 1


def test_a_request_that_can_never_fit_names_the_workload_file():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "simcc", "estimate", "mixtral_8x7b_serve_edge", "-H", "h200",
                             "--set", "serve.prompt_tokens=2000000", "--requests", "5"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "mixtral_8x7b_serve_edge.yaml: serve: one request's KV cache" in result.stderr


def _expert_weight_reads(workload, batch: int, tp: int = 1) -> float:
    """Bytes of expert weights one decode step at `batch` reads in one MoE layer (up + down), on
    one of `tp` ranks that shard the sequence and each expert (sequence and expert TP)."""
    from simcc.model.blocks import Batch, Shard
    from simcc.model.kinds.moe_ffn import work

    spec = next(b.moe_ffn for b in workload.model.blocks[1].blocks if getattr(b, "moe_ffn", None))
    shard = Shard(tp=tp, sequence_parallel=tp > 1, expert_tp=tp, seed=3, sample_seed=3)
    forward = work(spec, workload.model.hidden, Batch(batch, 1, 128), shard)
    experts = [op for op in forward.forward if op.name in ("moe.expert_up", "moe.expert_down")]
    rows = sum(op.kernels[0][0][0] * len(op.kernels[0]) for op in experts[:1])  # tokens x k
    return sum(op.bytes for op in experts), rows


@pytest.mark.parametrize("experts,k,batch", [(8, 2, 1), (8, 2, 4), (128, 8, 1), (128, 8, 16), (64, 6, 64)])
def test_a_decode_step_reads_the_experts_its_tokens_picked(experts, k, batch):
    """Mixtral at batch 1 reads 2 of its 8 experts, a 128-expert top-8 model 8 of 128; at batch B
    uniform routing reads E (1 - (1 - k/E)^B) distinct experts (hand-derived), not every expert
    some sampled step touched."""
    workload, _ = load_workload("mixtral_8x7b_serve_edge", [
        f"model.blocks.1.blocks.1.moe_ffn.experts={experts}", f"model.blocks.1.blocks.1.moe_ffn.k={k}"])
    hidden, ffn = workload.model.hidden, 14336
    one_expert = 3 * hidden * ffn * 2  # gated: up (2 x ffn) and down, fp16
    distinct = experts * (1 - (1 - k / experts) ** batch)
    token_rows = batch * k * (hidden + 2 * ffn) * 2 + batch * k * (ffn + hidden) * 2  # activations in and out
    moved, _ = _expert_weight_reads(workload, batch)
    assert moved == pytest.approx(distinct * one_expert + token_rows, rel=1e-6)


@pytest.mark.parametrize("tp", [2, 4])
def test_expert_tensor_parallel_ranks_read_the_experts_of_the_whole_batch(tp):
    """With sequence parallelism each TP rank routes 8 / tp of a batch of 8, but the expert-TP
    all-gather hands every rank the whole batch: each reads its 1/tp slice of every expert any of
    the 8 tokens picked, 8 (1 - (6/8)^8) = 7.20 of Mixtral's 8 (hand-derived), not the 5.5 that
    one rank's own tokens pick."""
    workload, _ = load_workload("mixtral_8x7b_serve_edge", [])
    hidden, ffn, batch = workload.model.hidden, 14336, 8
    distinct = 8 * (1 - (6 / 8) ** batch)
    token_rows = batch * 2 * (hidden + 2 * ffn / tp) * 2 + batch * 2 * (ffn / tp + hidden) * 2
    moved, rows = _expert_weight_reads(workload, batch, tp)
    assert rows == pytest.approx(batch * 2, rel=0.35)  # the gathered batch's token copies, not 1/tp of them
    assert moved == pytest.approx(distinct * 3 * hidden * ffn * 2 / tp + token_rows, rel=1e-6)


def test_decode_step_time_grows_with_the_experts_a_batch_reads():
    """Memory-bound decode of Mixtral on an H100: batch 2 reads 3.5 experts per layer instead of 2,
    so its step costs more than batch 1 but far less than twice; batch 1's step streams the active
    parameters (12.9B at fp16) once, about 26 GB, plus a few microseconds per kernel launched (about
    800 kernels); reading all 8 experts (93 GB) would take over 3x as long."""
    workload, costs = _costs(["serve.batch=2"], "h200", ["memory_gb=200"])
    one, two = costs.decode.at(1), costs.decode.at(2)
    assert 1.2 < two / one < 1.8
    streamed = 12.9e9 * 2 / 4.8e12  # H200: 4.8 TB/s
    assert streamed < one < 2 * streamed


# Bits per weight from ggml's block layouts (bytes per block x 8 / weights per block), derived here
# by hand: Q8_0 34 B / 32, Q4_0 18 B / 32, Q4_K 144 B / 256, Q6_K 210 B / 256, Q2_K 84 B / 256.
@pytest.mark.parametrize("stored,bits", [("q8_0", 34 * 8 / 32), ("q4_0", 18 * 8 / 32), ("q4_k", 144 * 8 / 256),
                                         ("q6_k", 210 * 8 / 256), ("q2_k", 84 * 8 / 256), ("int4", 4 + 16 / 128),
                                         (4.85, 4.85), ("fp16", 16), ("fp8", 8)])
def test_a_decode_step_streams_weights_at_their_stored_bits(stored, bits):
    """Weight bytes per generated token at batch 1 are the active parameters times the stored bits;
    the KV cache and activations are the only other reads."""
    base, _ = load_workload("mixtral_8x7b_serve_edge", SMALL)
    quantized, _ = load_workload("mixtral_8x7b_serve_edge", SMALL + [f"precision.weights={stored}"])
    system = load_hardware("h200", ["memory_gb=200"])
    from simcc.plan.training import forward_work, shard_of  # noqa: F401 (the plan's own ops)
    from simcc.model.anytime import served_units
    from simcc.model.blocks import Batch

    def weight_reads(workload) -> float:
        layout = build_layout(workload, system, "w")
        work = forward_work(served_units(workload), workload, layout, Batch(1, 1, 16))
        return sum(op.bytes for op in work.items if getattr(op, "family", "") in ("gemm", "grouped_gemm"))

    # fp16 reads 2 bytes a weight; the difference is the active weights (12.9B) at 2 - bits/8 bytes.
    active = 12.88e9 - 32000 * 4096  # the input embedding is a lookup, not a GEMM
    saved = weight_reads(base) - weight_reads(quantized)
    assert saved == pytest.approx(active * (2 - bits / 8), rel=0.01)


def test_experts_stored_narrower_than_the_rest_shrink_memory_and_decode():
    """2-bit experts beside 4-bit attention (as Eliseev & Mazur 2023 serve Mixtral): expert weights
    are 45.1B of Mixtral's 46.7B, so memory drops by 45.1B x (4.5 - 2.625) / 8 bytes."""
    four, _ = load_workload("mixtral_8x7b_serve_edge", SMALL + ["precision.weights=q4_0"])
    mixed, _ = load_workload("mixtral_8x7b_serve_edge", SMALL + ["precision.weights=q4_0", "precision.expert_weights=q2_k"])
    system = load_hardware("h200", ["memory_gb=200"])
    costs = [serving_costs(w, system, build_layout(w, system, "w")) for w in (four, mixed)]
    expert_params = 32 * 8 * 3 * 4096 * 14336
    assert costs[0].memory.weights - costs[1].memory.weights == pytest.approx(expert_params * (4.5 - 2.625) / 8, rel=1e-3)
    assert costs[1].decode.at(1) < costs[0].decode.at(1)
    assert costs[1].expert_bytes / costs[0].expert_bytes == pytest.approx(2.625 / 4.5)


def test_an_output_head_kept_in_fp16_beside_int4_weights_costs_its_own_bytes():
    """TensorRT-LLM's weight-only exports quantize the linears and leave lm_head in fp16: Llama 3 8B's
    head (128,256 x 4,096) then weighs 2 bytes a weight, not 0.5, in memory and in every decode step."""
    sets = ["precision.weights=4.0", "precision.compute=fp16", "serve.batch=1"]
    four, _ = load_workload("llama3_8b_serve", sets)
    kept, _ = load_workload("llama3_8b_serve", sets + ["precision.head_weights=fp16"])
    system = load_hardware("jetson_agx_orin")
    costs = [serving_costs(w, system, build_layout(w, system, "w")) for w in (four, kept)]
    head = 128256 * 4096
    assert costs[1].memory.weights - costs[0].memory.weights == pytest.approx(head * (2 - 0.5), rel=1e-9)
    from simcc.model.anytime import served_units
    from simcc.model.blocks import Batch
    from simcc.plan.training import forward_work

    def head_reads(workload) -> float:
        work = forward_work(served_units(workload), workload, build_layout(workload, system, "w"), Batch(1, 1, 16))
        return next(op.bytes for op in work.items if op.name == "head.logits")

    assert head_reads(kept) - head_reads(four) == pytest.approx(head * (2 - 0.5))
    assert costs[1].decode.at(1) > costs[0].decode.at(1)
    with pytest.raises(InputError, match="precision.head_weights: quantized formats are for served weights"):
        load_workload("mixtral_8x7b_train_64xh100", ["precision.head_weights=q6_k"])


def test_quantized_weights_are_refused_for_training(tmp_path):
    with pytest.raises(InputError, match="precision.weights: quantized formats are for served weights"):
        load_workload("mixtral_8x7b_train_64xh100", ["precision.weights=q4_k"])


@pytest.mark.parametrize("stored", ["q9", 0.5, 40, True])
def test_a_stored_weight_format_outside_the_table_names_the_valid_ones(stored):
    with pytest.raises(InputError, match="expected a dtype or quantized format .*q4_k.* or bits per weight from 1 to 32"):
        load_workload("mixtral_8x7b_serve_edge", [f"precision.weights={stored}"])


def test_an_engines_step_overhead_is_paid_once_per_serving_step():
    """`efficiency.serving_step_us` adds its time to every prefill and decode step, whatever the batch."""
    _, plain = _costs(["serve.batch=4"], "h200", ["memory_gb=200"])
    _, engine = _costs(["serve.batch=4"], "h200", ["memory_gb=200", "efficiency.serving_step_us=4200"])
    for table in ("decode", "prefill"):
        before, after = getattr(plain, table), getattr(engine, table)
        assert [b - a for a, b in zip(before.seconds, after.seconds)] == pytest.approx([4.2e-3] * len(before.seconds))


def test_a_threshold_tree_reads_only_the_blocks_that_fire():
    """Gallicchio & Nuti 2025: a higher threshold fires fewer blocks, so serving gets faster; at
    batch 1 a level reads the weights of its fired blocks only (hand-derived from the firing profile)."""
    from simcc.model.blocks import Batch, Shard
    from simcc.model.kinds.threshold_tree import work

    latencies = []
    for threshold in (0.001, 0.1, 0.5, 0.99):
        workload, src = load_workload("ray_tracing_mlp_serve_rpi5", [f"model.blocks.1.threshold_tree.threshold={threshold}"])
        system = load_hardware("raspberry_pi_5")
        costs = serving_costs(workload, system, build_layout(workload, system, src))
        latencies.append(costs.prefill.at(1))
        spec = workload.model.blocks[1].threshold_tree
        forward = work(spec, 256, Batch(1, 1, 1), Shard())
        for level in range(spec.levels):
            op = next(o for o in forward.forward if o.name == f"tree.level{level}.fc0")
            fired = op.flops / (2 * 256 * 1024)  # one input: the blocks that fired at this level
            assert 0 < fired <= 2**level
            assert op.bytes == pytest.approx((fired * 256 * 1024 + fired * (256 + 1024)) * 2)  # their weights only (bf16)
    assert latencies == sorted(latencies, reverse=True) and latencies[0] > 5 * latencies[-1]


def test_goodput_counts_the_requests_that_meet_every_objective():
    """Two requests alone on the server: each gets the unloaded TTFT (one prefill) and TPOT (one
    decode step). An objective just above both keeps both, the request and token rates over the
    run's span; one just below either drops both; none given, no goodput section."""
    workload, src = load_workload("mixtral_8x7b_serve_edge", SMALL)
    system = load_hardware("h200", ["memory_gb=200"])
    costs = serving_costs(workload, system, build_layout(workload, system, src))
    ttft, tpot = costs.prefill.at(1), costs.decode.at(1)
    trace = [Request(0.0, 16, 8), Request(100.0, 16, 8)]

    def goodput(slo_ttft, slo_tpot):
        return estimate(workload, system, src, SimulationOptions(requests=trace, slo_ttft_s=slo_ttft,
                                                                  slo_tpot_s=slo_tpot)).goodput

    met = goodput(ttft * 1.01, tpot * 1.01)
    span = 100.0 + ttft + 7 * tpot
    assert met.share_meeting_slo == 1.0
    assert met.goodput_requests_per_s == pytest.approx(2 / span)
    assert met.goodput_tokens_per_s == pytest.approx(16 / span)
    assert goodput(ttft * 0.99, None).share_meeting_slo == 0.0
    assert goodput(None, tpot * 0.99).goodput_tokens_per_s == 0.0
    assert goodput(None, None) is None


@pytest.mark.parametrize("batch,per_pair", [(8, True), (31, True), (32, False)])
def test_an_engine_that_reads_each_token_expert_pair_pays_for_repeats(batch, per_pair):
    """llama.cpp's Metal backend runs a matrix-vector product per (token, expert) pair below 32
    tokens: a 128-expert top-8 layer at batch 8 reads 64 expert slices, not the 51.6 distinct
    experts E (1 - (1 - k/E)^B) a per-expert GEMM reads (hand-derived); from 32 tokens it gathers
    each expert's rows and reads it once. The extra bytes stream at the device's bandwidth."""
    from simcc.costs.compute import op_cost
    from simcc.model.blocks import Batch, Shard
    from simcc.model.kinds.moe_ffn import work

    workload, _ = load_workload("mixtral_8x7b_serve_edge", [
        "model.blocks.1.blocks.1.moe_ffn.experts=128", "model.blocks.1.blocks.1.moe_ffn.k=8"])
    spec = next(b.moe_ffn for b in workload.model.blocks[1].blocks if getattr(b, "moe_ffn", None))
    hidden, ffn = workload.model.hidden, 14336
    up = next(op for op in work(spec, hidden, Batch(batch, 1, 128), Shard(seed=3, sample_seed=3)).forward
              if op.name == "moe.expert_up")
    distinct = 128 * (1 - (1 - 8 / 128) ** batch)
    one_up = hidden * 2 * ffn * 2  # fp16 up and gate slices of one expert
    assert up.pair_reads.extra_bytes == pytest.approx((batch * 8 - distinct) * one_up, rel=1e-6)

    device = load_hardware("apple_m2_ultra").device
    assert device.efficiency.expert_matvec_below_tokens == 32
    grouped = device.model_copy(update={"efficiency": device.efficiency.model_copy(
        update={"expert_matvec_below_tokens": 0})})
    extra = op_cost(device, up).seconds - op_cost(grouped, up).seconds
    stream = device.memory_bandwidth_gb_s * 1e9 * device.efficiency.memory
    assert extra == pytest.approx(up.pair_reads.extra_bytes / stream if per_pair else 0.0, rel=1e-6, abs=1e-12)


def test_a_prefill_runs_the_output_head_on_each_prompts_last_token():
    """Serving engines sample one token per prompt, so a prefill of B prompts of P tokens runs the
    head's GEMM on B rows (2 B x hidden x vocab FLOPs), not B x P; `prompt_logits: all` (llama.cpp
    before PR #6122) runs it on every position. Nothing else in the step changes."""
    from simcc.plan.serving import _step_tables  # noqa: F401 (the table the prefill step uses)
    from simcc.model.anytime import served_units
    from simcc.model.blocks import Batch
    from simcc.plan.training import forward_work

    workload, src = load_workload("llama3_8b_serve", ["serve.batch=4", "serve.prompt_tokens=256"])
    system = load_hardware("h100_sxm")
    layout = build_layout(workload, system, src)

    def head_flops(batch):
        work = forward_work(served_units(workload), workload, layout, batch)
        return next(op.flops for op in work.items if op.name == "head.logits")

    hidden, vocab = 4096, 128256
    assert head_flops(Batch(4, 256, 256, sampled=4)) == pytest.approx(2 * 4 * hidden * vocab)
    assert head_flops(Batch(4, 256, 256)) == pytest.approx(2 * 4 * 256 * hidden * vocab)
    last = serving_costs(workload, system, layout)
    every, _ = load_workload("llama3_8b_serve", ["serve.batch=4", "serve.prompt_tokens=256", "serve.prompt_logits=all"])
    all_positions = serving_costs(every, system, build_layout(every, system, src))
    # The head's 255 x 4 extra rows are compute-bound: at least their FLOPs at the H100's bf16 peak.
    extra = 2 * 4 * 255 * hidden * vocab / 989e12
    assert all_positions.prefill.at(4) - last.prefill.at(4) > extra
    assert all_positions.decode.at(4) == pytest.approx(last.decode.at(4))
    with pytest.raises(InputError, match="serve.prompt_logits: expected 'last' or 'all'"):
        load_workload("llama3_8b_serve", ["serve.prompt_logits=first"])


@pytest.mark.parametrize("stored, fraction", [("q4_0", 0.33), ("q6_k", 0.22), ("q4_k", 0.094), (2.7, 0.094)])
def test_a_cpu_engine_multiplies_quantized_weights_at_its_formats_integer_rate(stored, fraction):
    """On a Raspberry Pi 5 llama.cpp quantizes activations to 8 bits and multiplies with SDOT: a
    prefill GEMM over quantized weights takes its products (2 m k n, the per-weight unpacking
    included in the measured rate) over the int8 peak (614 GOP/s) times its format's fraction;
    formats without one (Q4_K here, a bits-per-weight mix) take `other`'s."""
    from simcc.costs.compute import op_cost
    from simcc.model.ops import GemmOperands, gemm

    pi = load_hardware("raspberry_pi_5").device
    format_name = stored if isinstance(stored, str) else "other"
    operands = GemmOperands(weight_bytes=0.5, dequant_flops=2.0, weight_format=format_name)
    m, k, n = 512, 2048, 2048
    op = gemm("up", m, k, n, "fp32", operands=operands)
    products = 2 * m * k * n
    memory = op.bytes / (pi.memory_bandwidth_gb_s * 1e9 * pi.efficiency.memory)
    expected = max(products / (0.614e12 * fraction), memory) + pi.efficiency.kernel_launch_us * 1e-6
    assert op_cost(pi, op).seconds == pytest.approx(expected, rel=1e-9)
    # Weights the engine dequantizes to the compute dtype (no format) stay on the fp32 roofline.
    plain = gemm("up", m, k, n, "fp32", operands=GemmOperands(weight_bytes=0.5, dequant_flops=2.0))
    assert op_cost(pi, plain).seconds == pytest.approx(
        max(op.flops / (0.154e12 * pi.efficiency.matmul), memory) + pi.efficiency.kernel_launch_us * 1e-6, rel=1e-9)


def test_a_weight_only_quantized_gemm_runs_at_the_mixed_input_share_of_the_dense_rate():
    """On an A100, int8 weights under fp16 activations are converted to fp16 inside a mixed-input
    kernel's main loop: a compute-bound prefill GEMM (512 x 4096 x 4096: 17.2 GFLOP against 25 MB)
    takes its dense time over the profile's 0.66. A one-token product streams its weights through a
    matrix-vector kernel and a GEMM over fp16 weights is no mixed-input kernel: neither changes."""
    from simcc.costs.compute import op_cost
    from simcc.model.ops import GemmOperands, gemm

    a100 = load_hardware("a100_80gb").device
    assert a100.efficiency.weight_only_matmul == 0.66
    dense_kernels = a100.model_copy(update={"efficiency": a100.efficiency.model_copy(update={"weight_only_matmul": None})})
    launch = a100.efficiency.kernel_launch_us * 1e-6
    int8_weights = GemmOperands(weight_bytes=1.0)
    prefill = gemm("up", 512, 4096, 4096, "fp16", operands=int8_weights)
    assert prefill.mixed_input
    assert op_cost(a100, prefill).seconds - launch == pytest.approx((op_cost(dense_kernels, prefill).seconds - launch) / 0.66,
                                                                   rel=1e-9)
    decode = gemm("up", 1, 4096, 4096, "fp16", operands=int8_weights)
    assert op_cost(a100, decode).seconds == pytest.approx(op_cost(dense_kernels, decode).seconds, rel=1e-12)
    fp16_weights = gemm("up", 512, 4096, 4096, "fp16")
    assert not fp16_weights.mixed_input
    assert op_cost(a100, fp16_weights).seconds == pytest.approx(op_cost(dense_kernels, fp16_weights).seconds, rel=1e-12)


@pytest.mark.parametrize("setting, message", [
    ("device.efficiency.quantized_matmul={q9_0: 0.3}", "quantized_matmul.q9_0: expected a weight format"),
    ("device.efficiency.quantized_matmul={q4_0: 1.5}", "quantized_matmul.q4_0"),
    ("device.peak_tflops={fp32: 0.154}", "efficiency.quantized_matmul needs peak_tflops.int8"),
    ("device.efficiency.weight_only_matmul=1.5", "efficiency.weight_only_matmul"),
    ("device.efficiency.weight_only_matmul=abc", "efficiency.weight_only_matmul"),
])
def test_a_quantized_rate_table_names_formats_and_needs_an_integer_peak(setting, message):
    with pytest.raises(InputError, match=message):
        load_hardware("raspberry_pi_5", [setting])
