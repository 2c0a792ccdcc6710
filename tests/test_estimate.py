"""End-to-end estimates: hand-derived op times, the pipeline composer, consistency, monotonicity."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from simcc.costs.compute import efficiency, op_cost, quantization
from simcc.estimate import estimate
from simcc.model.ops import Op, backward_of, gemm, grouped_gemm
from simcc.specs.hardware import EfficiencyCurve
from simcc.specs.loader import load_hardware, load_workload


def _run(workload: str, hardware: str, w_over=(), h_over=()):
    spec, src = load_workload(workload, list(w_over))
    return estimate(spec, load_hardware(hardware, list(h_over)), src)


def test_large_gemm_is_compute_bound_at_the_matmul_fraction():
    h100 = load_hardware("h100_sxm").device
    op = gemm("g", 4096, 4096, 4096, "bf16")
    # 16 x 32 tiles of 256x128 on 132 SMs: 4 waves, 512 of 528 slots busy; each tile's K loop of
    # 4096 pays the pipeline fill of 234 more (the profile's gemm_k_overhead).
    expected = 2 * 4096**3 / (989e12 * 0.82 * 512 / 528 * 4096 / (4096 + 234)) + 5e-6
    cost = op_cost(h100, op)
    assert cost.bound == "compute" and cost.seconds == pytest.approx(expected)


def test_wave_and_tile_quantization_by_hand():
    a100 = load_hardware("a100_80gb").device
    # Megatron 175B QKV under TP 8: 2048 x 4608 outputs = 288 tiles of 256x128 (or 576 of 128x128),
    # 3 (or 6) waves of 108 SMs: 8/9 of the SM-time does work, whichever tile.
    assert quantization(a100, gemm("qkv", 2048, 12288, 4608, "fp16")) == pytest.approx(8 / 9)
    # 12288 x 4608 outputs = 1728 tiles of 256x128: exactly 16 waves.
    assert quantization(a100, gemm("w", 12288, 2048, 4608, "fp16")) == pytest.approx(1.0)
    # Fewer tiles than SMs: split-K fills the waves, only the 100-row edge of a 128-row tile is lost.
    assert quantization(a100, gemm("small", 100, 8192, 128, "fp16")) == pytest.approx(100 / 128)
    # The backward's two kernels at equal FLOPs, harmonic mean: dX (2048 x 12288 outputs) is best as
    # 1536 tiles of 128x128 in 15 waves (1620 slots); dW (12288 x 4608) fills 16 waves.
    backward = backward_of(gemm("qkv", 2048, 12288, 4608, "fp16"))
    assert quantization(a100, backward) == pytest.approx(2 / (1620 / 1536 + 1.0))
    # A grouped GEMM tiles all experts in one kernel: 3 experts of 200 tokens x 1024 = 3 x 2 x 8 tiles
    # of 128x128 (48 < 108: one split-K wave), 600 of 768 rows useful.
    grouped = grouped_gemm("experts", [200, 200, 200], [200, 200, 200], 512, 1024, "fp16")
    assert quantization(a100, grouped) == pytest.approx(600 / 768)
    assert quantization(a100, grouped_gemm("idle", [0, 0], [0, 0], 512, 1024, "fp16")) == 1.0  # no tokens, no tiles
    # A batched GEMM counts its copies: 12 heads of 2048 x 2048 scores = 3072 tiles of 128x128, 29 waves.
    scores = Op("scores", "gemm", 1.0, 1.0, "fp16", kernels=(((2048, 128, 2048, 12),),))
    assert quantization(a100, scores) == pytest.approx(3072 / (29 * 108))


def test_a_short_k_loop_and_a_grouped_kernel_run_below_the_best_shape():
    """Hand-derived from the H100 profile (matmul 0.82, grouped 0.74, K overhead 234, expert rows 130): at M = N =
    4096 a GEMM's time per FLOP grows by (K + 234) / K as K shrinks (OpenXLA's sm_90 table: 0.79 of
    peak at K 4096, 0.55 at 512); a grouped GEMM runs at 0.74 M/(M + 130) / 0.82 of a dense one's rate; a
    backward's weight-gradient kernel loops over the tokens, so it pays the fill of its own K."""
    h100 = load_hardware("h100_sxm").device
    per_flop = {k: (op_cost(h100, gemm("g", 4096, k, 4096, "bf16")).seconds - 5e-6) / (2 * 4096 * k * 4096)
                for k in (512, 4096)}
    assert per_flop[512] / per_flop[4096] == pytest.approx((512 + 234) / 512 / ((4096 + 234) / 4096))
    assert 989e12 / (1 / per_flop[512]) == pytest.approx(1 / (0.82 * 512 / 528 * 512 / 746), rel=1e-9)
    dense = gemm("d", 4096, 2048, 768, "bf16")
    grouped = grouped_gemm("e", [4096], [4096], 2048, 768, "bf16")
    # one expert of 4,096 rows: the grouped best shape, and M/(M + 130) for its rows
    assert (op_cost(h100, grouped).seconds - 5e-6) / (op_cost(h100, dense).seconds - 5e-6) == pytest.approx(
        0.82 / (0.74 * 4096 / 4226))
    # 4096 tokens x 2048 -> 768: forward K 2048; backward dX K 768, dW K 4096 (equal FLOPs, harmonic).
    from simcc.costs.compute import inner_loop_share
    assert inner_loop_share(h100, dense) == pytest.approx(2048 / 2282)
    assert inner_loop_share(h100, backward_of(dense)) == pytest.approx(2 / (1002 / 768 + 4330 / 4096))
    assert inner_loop_share(load_hardware("a100_80gb").device, dense) == pytest.approx(2048 / 2168)  # k0 120
    assert inner_loop_share(load_hardware("b200").device, dense) == 1.0  # not modelled there


# alibaba/InferSim bench_data/grouped_gemm/prefill/h800/data.csv (DeepGEMM, FP8 block-scaled, 256
# experts of hidden 7168 and 2048 spread over 1-64 GPUs): (local experts, tokens per expert, up
# projection's fraction of peak, down projection's).
INFERSIM_H800 = [(256, 256, 0.426608, 0.42854), (64, 512, 0.532525, 0.518331), (32, 1024, 0.601819, 0.581707),
                 (16, 2048, 0.640994, 0.606311), (8, 4096, 0.657608, 0.621977), (4, 16384, 0.674390, 0.640541)]


@pytest.mark.parametrize("experts, tokens, up, down", INFERSIM_H800)
def test_few_tokens_per_expert_leave_a_grouped_gemm_below_its_best_shape(experts, tokens, up, down):
    from simcc.costs.compute import expert_rows_share
    from simcc.model.ops import GemmOperands

    h800 = load_hardware("h800_sxm").device
    fp8 = GemmOperands(inputs="fp8", scale_bytes=4 / 128)
    for k, n, measured in ((7168, 4096, up), (2048, 7168, down)):
        op = grouped_gemm("e", [tokens] * experts, [tokens] * experts, k, n, "bf16", operands=fp8)
        assert expert_rows_share(h800, op) == pytest.approx(tokens / (tokens + 130))
        achieved = 2 * tokens * experts * k * n / op_cost(h800, op).seconds / 1979e12
        assert achieved == pytest.approx(measured, rel=0.08)
    assert expert_rows_share(h800, gemm("d", tokens, 7168, 4096, "bf16")) == 1.0  # dense GEMMs: one M for all
    assert expert_rows_share(h800, grouped_gemm("e", [8.0] * experts, [8.0] * experts, 7168, 4096, "bf16")) == 1.0


def test_a_metal_expert_kernel_pads_each_experts_rows_to_its_32_token_tile():
    """llama.cpp's Metal mul_mm_id tiles each expert's rows 32 at a time: with routed (Poisson)
    counts the last tile of an expert is on average (32 - 1) / 2 rows short, which is the M2
    profiles' grouped_gemm_m_overhead. The engine tiles every expert once the step has 32 tokens
    (below, per-pair matrix-vector products), so even 20-row experts pay M / (M + 15.5)."""
    import math

    from simcc.costs.compute import expert_rows_share

    def mean_padding(mean_rows: float, tile: int = 32) -> float:
        weight, total, rows = math.exp(-mean_rows), 0.0, 0
        for rows in range(0, int(mean_rows * 4)):
            if rows:
                weight *= mean_rows / rows
            total += weight * (math.ceil(rows / tile) * tile - rows)
        return total

    for mean_rows in (128, 256, 512):
        assert mean_padding(mean_rows) == pytest.approx(15.5, abs=0.3)
    ultra = load_hardware("apple_m2_ultra").device
    assert ultra.efficiency.grouped_gemm_m_overhead == 15.5
    prefill = grouped_gemm("e", [20.0] * 128, [20.0] * 128, 2048, 768, "fp16", step_tokens=2048.0)
    assert expert_rows_share(ultra, prefill) == pytest.approx(20 / 35.5)
    big = grouped_gemm("e", [128.0] * 128, [128.0] * 128, 2048, 768, "fp16", step_tokens=2048.0)
    assert expert_rows_share(ultra, big) == pytest.approx(128 / 143.5)
    decode = grouped_gemm("e", [1.0] * 8, [1.0] * 8, 2048, 768, "fp16", step_tokens=8.0)
    assert expert_rows_share(ultra, decode) == 1.0  # 8 tokens: the matrix-vector kernel
    # Without the engine's switch the cut is the tiled kernels' 64 rows.
    h800 = load_hardware("h800_sxm").device
    assert expert_rows_share(h800, prefill) == 1.0


def test_quantization_needs_the_sm_count_and_yields_to_a_measured_curve():
    a100 = load_hardware("a100_80gb").device
    op = gemm("qkv", 2048, 12288, 4608, "fp16")
    unknown = a100.model_copy(update={"sm_count": None})
    assert quantization(unknown, op) == 1.0
    assert op_cost(a100, op).seconds > op_cost(unknown, op).seconds
    # a measured curve holds its shapes' quantization and K loop: the same fraction, and no more
    from simcc.costs.compute import inner_loop_share
    fraction = a100.efficiency.matmul * inner_loop_share(a100, op)
    measured = a100.model_copy(update={"efficiency": a100.efficiency.model_copy(
        update={"curves": {"gemm": EfficiencyCurve(size=[1e6, 1e15], fraction=[fraction, fraction])}})})
    assert op_cost(measured, op).seconds == pytest.approx(op_cost(unknown, op).seconds)


def test_gemv_is_memory_bound_at_the_streaming_fraction():
    from simcc.costs.compute import inner_loop_share

    h100 = load_hardware("h100_sxm").device
    op = gemm("g", 1, 4096, 4096, "bf16")
    memory = (4096 + 4096 * 4096 + 4096) * 2 / (3350e9 * 0.90)
    compute = 2 * 4096 * 4096 / (989e12 * 0.82 * quantization(h100, op) * inner_loop_share(h100, op))
    cost = op_cost(h100, op)
    # a matrix-vector kernel (1 row, under a 16-row tensor-core tile) streams with the SM full of
    # warps: waiting on memory, it pays one of its 64 warps' share of its compute
    assert cost.bound == "memory" and cost.seconds == pytest.approx(memory + compute / 64 + 5e-6)
    assert compute / 64 < 0.01 * memory


def test_compute_and_memory_overlap_as_far_as_the_resident_warps_let_them(monkeypatch):
    """Sim et al. 2012 (PPoPP, eqs. 1, 16, 17) with N warps: T = Tc + Tm - min((N-1)/N Tc, Tm)."""
    from simcc.costs.compute import overlapped

    assert overlapped(1.0, 1.0, 8) == pytest.approx(1.125)  # at the ridge: 1/8 slower than max
    assert overlapped(1.0, 3.0, 8) == pytest.approx(3.125)  # memory-bound: Tm + Tc/8
    assert overlapped(2.0, 1.0, 8) == pytest.approx(2.0)  # compute-bound: max, nothing extra
    assert overlapped(1.0, 1.0, 64) == pytest.approx(1 + 1 / 64)  # a streaming kernel hides nearly all
    # An H100 GEMM of 64 tokens waits on memory: with one warp nothing overlaps (Tc + Tm), with
    # endless warps it is Tm, and with the 8 a tiled kernel keeps, an eighth of the way between.
    import simcc.costs.compute as compute_module

    h100 = load_hardware("h100_sxm").device
    timed = {}
    for warps in (1, 8, 10**12):
        monkeypatch.setattr(compute_module, "resident_warps", lambda op, n=warps: n)
        timed[warps] = op_cost(h100, gemm(f"ridge{warps}", 64, 8192, 8192, "bf16")).seconds
    assert timed[8] - timed[10**12] == pytest.approx((timed[1] - timed[10**12]) / 8, rel=1e-6)
    assert timed[1] > timed[8] > timed[10**12]
    # A device without SMs (a CPU) keeps max(Tc, Tm).
    cpu = load_hardware("raspberry_pi_5").device
    big = gemm("cpu", 64, 4096, 4096, "fp32")
    seconds = op_cost(cpu, big).seconds - cpu.efficiency.kernel_launch_us * 1e-6
    memory = (64 * 4096 * 2 + 4096 * 4096) * 4 / (17e9 * 0.67)
    compute = 2 * 64 * 4096 * 4096 / (0.154e12 * cpu.efficiency.matmul)
    assert seconds == pytest.approx(max(memory, compute))


def test_calibrated_curve_replaces_the_default_fraction():
    h100 = load_hardware("h100_sxm").device
    curve = EfficiencyCurve(size=[1e6, 1e12], fraction=[0.1, 0.7])
    calibrated = h100.model_copy(update={"efficiency": h100.efficiency.model_copy(update={"curves": {"gemm": curve}})})
    assert efficiency(calibrated, "gemm", 1e9, 100.0) == pytest.approx(0.4)  # halfway in log10(FLOPs)
    assert efficiency(calibrated, "gemm", 1e3, 100.0) == pytest.approx(0.1)  # clamped
    assert efficiency(calibrated, "grouped_gemm", 1e9, 100.0) == pytest.approx(0.74)  # no curve: the grouped default


def test_mixtral_estimate_is_consistent():
    result = _run("mixtral_8x7b_train_64xh100", "dgx_h100_x8")
    step = result.step
    parts = step.compute_s + step.exposed_comm_s + step.imbalance_s + step.bubble_s + step.optimizer_s
    assert parts == pytest.approx(step.step_s)
    assert step.step_p95_s >= min(step.step_s, step.step_p95_s)
    tokens = 256 * 4096
    assert result.throughput.tokens_per_s == pytest.approx(tokens / step.step_s)
    flops = 3 * result.model.forward_gflop_per_token * 1e9 * tokens
    assert result.throughput.model_tflops_per_device == pytest.approx(flops / step.step_s / 64 / 1e12)
    assert 0 < result.throughput.mfu < 0.8  # cannot beat the best-shape GEMM fraction
    assert result.memory.fits is True
    run = result.run
    assert run.usd == pytest.approx(run.device_hours * 6.88)


def test_more_bandwidth_is_never_slower_end_to_end():
    times = []
    for scale in (0.25, 1.0, 4.0):
        result = _run("mixtral_8x7b_train_64xh100", "dgx_h100_x8",
                      h_over=[f"node.intra_link.bandwidth_gb_s={450 * scale}", f"network.nic_gbit_s={400 * scale}"])
        times.append(result.step.step_s)
    assert times[0] > times[1] > times[2]


def test_more_load_skew_is_never_faster():
    base = ["model.blocks.1.blocks.1.moe_ffn.load.distribution=zipf"]
    times = [_run("mixtral_8x7b_train_64xh100", "dgx_h100_x8", base + [f"model.blocks.1.blocks.1.moe_ffn.load.alpha={a}"])
             .step.imbalance_s for a in (0.2, 1.0, 2.0)]
    assert times[0] < times[1] < times[2]


def test_edge_serving_offloads_experts_and_storage_speed_matters():
    slow = _run("mixtral_8x7b_serve_edge", "jetson_agx_orin")
    fast = _run("mixtral_8x7b_serve_edge", "jetson_agx_orin", h_over=["storage.bandwidth_gb_s=7.0"])
    roomy = _run("mixtral_8x7b_serve_edge", "jetson_agx_orin", h_over=["device.memory_gb=256"])
    assert slow.memory.offloaded_weights_gb > 0
    assert fast.latency.tpot_mean_s < slow.latency.tpot_mean_s
    assert fast.expert_cache.loading_share_of_busy_time < slow.expert_cache.loading_share_of_busy_time
    assert roomy.memory.offloaded_weights_gb == 0 and roomy.expert_cache is None
    assert roomy.latency.tpot_mean_s < fast.latency.tpot_mean_s


def test_every_shipped_workload_estimates_on_its_intended_hardware():
    pairs = [("mixtral_8x7b_train_64xh100", "dgx_h100_x8"), ("switch_base_128_train", "dgx_a100_x4"),
             ("gpt_22b_dense_train_8xa100", "dgx_a100_x1"), ("shazeer_moe_4096h_lstm_train", "k40_x16"),
             ("mixtral_8x7b_serve_edge", "jetson_agx_orin")]
    for workload, hardware in pairs:
        result = _run(workload, hardware)
        assert result.throughput.model_tflops_per_device > 0


def test_estimate_path_never_imports_torch(root):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from simcc.cli import main\n"
        "r = CliRunner().invoke(main, ['estimate', 'mixtral_8x7b_train_64xh100', '-H', 'dgx_h100_x8', '--format', 'json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_one_layer_alone_by_hand():
    """`estimate --layer`: a dense FFN block of the 22B model at TP 8 for one micro-batch of 4
    sequences: forward GEMM FLOPs 2 x tokens x 6144 x 24576/8 for each of the up and down
    projections; the backward twice that (input and weight gradients), plus the replayed forward
    under full recomputation; both passes add up."""
    from simcc.estimate import estimate_layer

    workload, source = load_workload("gpt_22b_dense_train_8xa100")
    system = load_hardware("dgx_a100_x1")
    tokens = 4 * 2048
    gemm = 2 * 2 * tokens * 6144 * 24576 / 8
    forward = estimate_layer(workload, system, source, 2, "forward").layer
    backward = estimate_layer(workload, system, source, 2, "backward").layer
    both = estimate_layer(workload, system, source, 2, "both").layer
    assert forward.kind == "dense_ffn" and forward.tokens == tokens
    assert forward.gflop * 1e9 == pytest.approx(gemm, rel=1e-2)
    assert backward.gflop * 1e9 == pytest.approx(3 * gemm, rel=1e-2)  # 2x backward + 1x recompute
    assert both.seconds == pytest.approx(forward.seconds + backward.seconds)
    assert forward.comm_s > 0  # the row-parallel all-reduce at TP 8
    result = subprocess.run([sys.executable, "-m", "simcc", "estimate", "gpt_22b_dense_train_8xa100", "-H", "dgx_a100_x1",
                             "--layer", "2", "--pass", "both", "--format", "json"], capture_output=True, text=True)
    assert json.loads(result.stdout)["layer"]["seconds"] == pytest.approx(both.seconds)


def test_communication_is_split_by_parallel_dimension_and_adds_up():
    result = _run("mixtral_8x7b_train_64xh100", "dgx_h100_x8")
    comm, step = result.comm, result.step
    exposed = comm.tp_exposed_s + comm.ep_exposed_s + comm.dp_exposed_s + comm.pp_exposed_s
    assert exposed == pytest.approx(step.exposed_comm_s, rel=1e-9)  # every exposed second has its dimension
    assert comm.ep_link_s > 0 and comm.pp_link_s > 0 and comm.dp_link_s > 0
    assert comm.tp_link_s == 0  # TP 1
    assert comm.ep_exposed_s <= comm.ep_link_s * 1.0001


def test_overlapping_expert_communication_hides_it_and_shortens_the_step():
    plain = _run("qwen3_30b_a3b_train_16xh100", "dgx_h100_x4", h_over=["nodes=2"])
    overlapped = _run("qwen3_30b_a3b_train_16xh100", "dgx_h100_x4", ["parallelism.overlap_moe_comm=true"], ["nodes=2"])
    assert overlapped.comm.ep_exposed_s < 0.5 * plain.comm.ep_exposed_s
    assert overlapped.step.step_s < plain.step.step_s
    assert overlapped.comm.ep_link_s == pytest.approx(plain.comm.ep_link_s)  # the same bytes, hidden
    # the dispatcher's SMs slow the overlapped compute: the step lengthens with them
    sms = _run("qwen3_30b_a3b_train_16xh100", "dgx_h100_x4",
               ["parallelism.overlap_moe_comm=true", "parallelism.moe_comm_sms=32"], ["nodes=2"])
    assert sms.step.step_s > overlapped.step.step_s


def test_an_fp8_gemm_reads_fp8_operands_after_a_cast_and_runs_at_the_fp8_fraction():
    """precision.matmul fp8 (Transformer Engine's FP8 GEMMs): the GEMM reads its input and weight
    at 1 byte, writes bf16, runs against the 1979 TFLOP/s FP8 peak at the profile's fp8 fraction;
    a cast pass before it reads the bf16 input and writes fp8 (delayed scaling), after an amax
    pass (current scaling), with + 4/128 bytes of scales (block scaling)."""
    from simcc.model.blocks import Batch
    from simcc.model.graph import units_of
    from simcc.layout import build_layout
    from simcc.plan.training import forward_work

    def ops(sets):
        workload, src = load_workload("mixtral_8x7b_train_64xh100", sets)
        layout = build_layout(workload, load_hardware("dgx_h100_x8"), src)
        work = forward_work(units_of(workload.model)[:1], workload, layout, Batch(1, 4096, 4096))
        return {op.name: op for op in work.items if isinstance(op, Op)}

    bf16, fp8 = ops([]), ops(["precision.matmul=fp8", "precision.fp8_scaling=delayed"])
    current = ops(["precision.matmul=fp8"])  # per-tensor current scaling, the default
    block = ops(["precision.matmul=fp8", "precision.fp8_scaling=block"])
    out = fp8["attn.out"]
    (m, k, n, _), = out.kernels[0]  # tokens x local heads' width -> hidden
    assert (m, n) == (4096, 4096) and bf16["attn.out"].kernels == out.kernels
    assert out.dtype == "fp8" and bf16["attn.out"].dtype == "bf16"
    assert out.bytes == pytest.approx(m * k * 1 + k * n * 1 + m * n * 2)
    assert bf16["attn.out"].bytes == pytest.approx((m * k + k * n + m * n) * 2)
    assert fp8["attn.out.cast"].bytes == pytest.approx(m * k * (2 + 1))
    assert current["attn.out.cast"].bytes == pytest.approx(m * k * (2 + 2 + 1))  # an amax pass, then the cast
    assert block["attn.out.cast"].bytes == pytest.approx(m * k * (2 + 1 + 4 / 128))
    assert "attn.out.cast" not in bf16
    # Kernels each cast launches (Transformer Engine): current scaling zeroes the amax, reduces it,
    # computes the scale and casts, 4 per tensor, and casts a grouped input expert by expert (Mixtral
    # on EP8: 1 local expert); delayed scaling fuses all experts into one launch; block scaling
    # launches one cast per tensor, per expert.
    assert (current["attn.out.cast"].launches, fp8["attn.out.cast"].launches, block["attn.out.cast"].launches) == (4, 1, 1)
    experts = len(current["moe.expert_up"].kernels[0])
    assert experts == 1 and current["moe.expert_up.cast"].launches == 4 * experts
    h100 = load_hardware("h100_sxm").device
    launch = h100.efficiency.kernel_launch_us * 1e-6
    assert (op_cost(h100, current["attn.out.cast"]).seconds - op_cost(h100, replace(current["attn.out.cast"], launches=1)).seconds
            == pytest.approx(3 * launch))
    assert efficiency(h100, "gemm", 1e12, 1e3, "fp8") == 0.72
    assert efficiency(h100, "grouped_gemm", 1e12, 1e3, "fp8") == 0.71
    assert efficiency(h100, "gemm", 1e12, 1e3, "bf16") == 0.82


@pytest.mark.parametrize("expert_gemm, grouped_share", [("per_expert", 0.81), ("grouped", 1.0)])
def test_block_scaled_fp8_gemms_keep_the_profile_s_share_of_the_per_tensor_fraction(expert_gemm, grouped_share):
    """A cuBLAS GEMM whose FP8 operands carry 1 x 128 / 128 x 128 scales (fp8_scaling block) runs at
    the profile's fp8_block_scaled_share (0.81 on Hopper) of the per-tensor FP8 fraction, forward and
    backward. Expert GEMMs run per expert through cuBLAS (Transformer Engine) pay it too; run as one
    grouped kernel (DeepGEMM) they keep the grouped fraction, fitted on block-scaled kernels.
    Per-tensor FP8 and BF16 GEMMs are untouched, and a profile without the share (B200: block
    scaling is emulated through MXFP8) runs both alike."""
    from simcc.plan.training import expert_gemm_runs, gemm_operands

    def operands(scaling):
        workload, _ = load_workload("qwen3_30b_a3b_train_16xh100",
                                    ["precision.matmul=fp8", f"precision.fp8_scaling={scaling}",
                                     f"precision.fp8_expert_gemm={expert_gemm}"])
        return gemm_operands(workload.precision.weights, workload.precision, expert_gemm_runs(workload))

    h100, b200 = load_hardware("h100_sxm").device, load_hardware("b200").device
    launch = h100.efficiency.kernel_launch_us * 1e-6
    dense = lambda o: gemm("qkv", 8192, 8192, 8192, "bf16", operands=o)  # noqa: E731
    grouped = lambda o: grouped_gemm("up", [8192.0] * 4, [8192.0] * 4, 8192, 8192, "bf16", operands=o)  # noqa: E731
    for make, share in ((dense, 0.81), (grouped, grouped_share)):
        block, tensor = make(operands("block")), make(operands("tensor"))
        assert block.block_scaled and not tensor.block_scaled and backward_of(block).block_scaled
        # compute-bound: the time is FLOPs over the fraction, so the ratio is the share exactly
        slower = (op_cost(h100, block).seconds - launch) / (op_cost(h100, tensor).seconds - launch)
        assert slower == pytest.approx(1 / share, rel=1e-3)
        assert op_cost(b200, block).seconds == pytest.approx(op_cost(b200, tensor).seconds, rel=1e-3)
    # Per tensor, an expert GEMM takes the dense FP8 fraction through cuBLAS, the grouped one as one kernel.
    per_tensor = grouped(operands("tensor"))
    assert per_tensor.per_expert_gemms == (expert_gemm == "per_expert")
    # One cuBLAS launch per expert with tokens (4 here), each backward GEMM twice that; one grouped kernel.
    launches = 4 if expert_gemm == "per_expert" else 1
    assert (per_tensor.launches, backward_of(per_tensor).launches) == (launches, 2 * launches)
    assert efficiency(h100, "grouped_gemm", 1e12, 1e3, "fp8", per_expert_gemms=per_tensor.per_expert_gemms) == (
        0.72 if expert_gemm == "per_expert" else 0.71)
    assert efficiency(h100, "gemm", 1e12, 1e3, "fp8", block_scaled=True) == pytest.approx(0.72 * 0.81)
    assert efficiency(h100, "grouped_gemm", 1e12, 1e3, "fp8", block_scaled=True, per_expert_gemms=True) == pytest.approx(0.72 * 0.81)
    assert efficiency(h100, "gemm", 1e12, 1e3, "bf16", block_scaled=True) == 0.82
    # BF16 expert GEMMs are not FP8 ones: the flag stays off and the grouped BF16 fraction holds.
    assert gemm_operands("bf16", load_workload("qwen3_30b_a3b_train_16xh100", [])[0].precision) is None
    # Unset, training runs them as Transformer Engine does and serving engines as one grouped kernel.
    assert expert_gemm_runs(load_workload("qwen3_30b_a3b_train_16xh100", [])[0]) == "per_expert"
    assert expert_gemm_runs(load_workload("qwen3_30b_a3b_serve", [])[0]) == "grouped"


# Transformer Engine's GEMM profiling guide (NVIDIA/TransformerEngine docs/examples/gemm_profiling/
# gemm_profiling.rst, H200 NVL worked example, autocast: each GEMM with its input casts): the 12
# GEMMs of a layer of hidden 4096, 32 heads, MLP 16384, 31 x 512 tokens, ms per layer by recipe.
TE_H200_NVL_LAYER_MS = {"bf16": 32.014, "tensor": 20.285, "delayed": 18.978, "block": 22.882}


def test_fp8_recipes_speed_up_a_layer_s_gemms_as_transformer_engine_measured(tmp_path):
    """The layer's GEMMs and casts on an H200 NVL (the H200's profile at the NVL's datasheet peaks:
    835 bf16, 1671 fp8 TFLOP/s) come within 10% of TE's measured time for every recipe, and each
    FP8 recipe's speed-up over BF16 within 8% of the measured one (block scaling the least). The
    benchmark casts each GEMM's operands afresh, weights and the weight gradient's inputs included,
    where training reuses them: simcc's training casts come out below its autocast times."""
    from simcc.layout import build_layout
    from simcc.plan.training import layer_costs, micro_batch

    spec = tmp_path / "te_5b.yaml"
    spec.write_text("""name: te-gemm-profiling-5b
mode: train
model:
  name: TE GEMM profiling 5B
  hidden: 4096
  blocks:
    - attention: {heads: 32}
    - dense_ffn: {hidden: 16384, activation: gelu}
parallelism: {tp: 1, pp: 1, micro_batch: 31, zero_stage: 0, recompute: none}
precision: {weights: bf16, compute: bf16, gradients: fp32, communication: bf16}
optimizer: {type: adam, master_weights: true}
train: {seq_len: 512, global_batch: 496}  # data parallel over the 16 GPUs; costs are per device
""")
    h200 = load_hardware("hgx_h200_x2")
    nvl_peaks = h200.device.peak_tflops.model_copy(update={"bf16": 835.0, "fp8": 1671.0})
    system = replace(h200, device=h200.device.model_copy(update={"peak_tflops": nvl_peaks}))
    gemms = ("attn.qkv", "attn.out", "ffn.up", "ffn.down")

    def layer_ms(recipe):
        sets = [] if recipe == "bf16" else ["precision.matmul=fp8", f"precision.fp8_scaling={recipe}"]
        workload, src = load_workload(str(spec), sets)
        layout = build_layout(workload, system, src)
        costs = [c for index in (0, 1) for side in layer_costs(workload, system, layout, index, micro_batch(workload))
                 for c in side]
        return 1e3 * sum(c.seconds for c in costs if c.name.split(".bwd")[0].removesuffix(".cast") in gemms)

    predicted = {recipe: layer_ms(recipe) for recipe in TE_H200_NVL_LAYER_MS}
    for recipe, measured in TE_H200_NVL_LAYER_MS.items():
        assert predicted[recipe] == pytest.approx(measured, rel=0.10), recipe
        speedup, measured_speedup = predicted["bf16"] / predicted[recipe], TE_H200_NVL_LAYER_MS["bf16"] / measured
        assert speedup == pytest.approx(measured_speedup, rel=0.08), recipe
    assert predicted["block"] > predicted["tensor"] > predicted["delayed"]


def test_current_scaling_casts_a_grouped_input_expert_by_expert_in_four_kernels_each():
    """Qwen3-30B on EP16 has 8 local experts: current scaling casts each expert's rows in 4
    kernels (32 launches, in the forward and again for the gradient in the backward), block
    scaling in one each (8), delayed scaling all experts in one fused launch; an expert with no
    rows is not cast. Each launch costs the profile's launch time."""
    from simcc.model.graph import cast_launches
    from simcc.plan.training import gemm_operands

    def operands(scaling):
        workload, _ = load_workload("qwen3_30b_a3b_train_16xh100", ["precision.matmul=fp8", f"precision.fp8_scaling={scaling}"])
        return gemm_operands(workload.precision.weights, workload.precision)

    experts = grouped_gemm("up", [512.0] * 7 + [0.0], [512.0] * 7 + [0.0], 2048, 1536, "fp8")
    dense = gemm("qkv", 4096, 2048, 5120, "fp8")
    assert [cast_launches(experts, operands(s)) for s in ("tensor", "block", "delayed")] == [28, 7, 1]
    assert [cast_launches(dense, operands(s)) for s in ("tensor", "block", "delayed")] == [4, 1, 1]
    fp8 = _run("qwen3_30b_a3b_train_16xh100", "dgx_h100_x4", ["precision.matmul=fp8"], ["nodes=2"])
    delayed = _run("qwen3_30b_a3b_train_16xh100", "dgx_h100_x4", ["precision.matmul=fp8", "precision.fp8_scaling=delayed"],
                   ["nodes=2"])
    # per MoE layer and micro-batch: (32 - 1) x 2 expert casts forward and backward, (4 - 1) x 2 x 2
    # dense ones, each launch 5 us, besides the amax pass's extra read
    launches = (31 * 2 * 2 + 3 * 2 * 2) * 48 * 64
    extra = fp8.step.step_s - delayed.step.step_s
    assert launches * 5e-6 < extra < launches * 5e-6 * 1.5


def test_fp8_training_is_faster_than_bf16_by_less_than_the_peak_ratio_and_holds_fp8_weight_copies():
    """Mixtral on 64 H100: FP8 GEMMs halve GEMM time at best (1979 vs 989 TFLOP/s), but their
    fraction (0.72 vs 0.82), the casts and everything outside GEMMs stay, so the step speeds up by
    well under 2x; the FP8 weight copies add a byte per local parameter."""
    bf16 = _run("mixtral_8x7b_train_64xh100", "dgx_h100_x8")
    fp8 = _run("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ["precision.matmul=fp8"])
    assert 1.2 < bf16.step.step_s / fp8.step.step_s < 1.7
    assert fp8.memory.weights_gb == pytest.approx(bf16.memory.weights_gb * 1.5, rel=1e-6)  # bf16 (2 B) + fp8 copy (1 B)


def test_the_k_loop_fill_applies_to_tensor_core_gemms_only():
    """An fp32 router GEMM runs on the vector units: its tiny-K backward (K = experts) is not
    charged the tensor-core pipeline fill."""
    from simcc.costs.compute import inner_loop_share

    h100 = load_hardware("h100_sxm").device
    router = gemm("router", 4096, 4096, 8, "fp32")
    assert inner_loop_share(h100, backward_of(router)) == 1.0
    assert inner_loop_share(h100, backward_of(gemm("router", 4096, 4096, 8, "bf16"))) < 0.1
