"""Hardware profile schema: devices, nodes, clusters and edge devices.

Devices are defined once (hardware_profiles/devices/) and referenced by name from node, cluster
and edge files; the loader resolves those names before validation. Units are spelled in field
names: GB = 1e9 bytes, GB/s = 1e9 bytes/s, Gbit/s for NICs (as they are sold), TFLOP/s = 1e12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from simcc.specs.base import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, StrictModel, int_up_to
from simcc.specs.vocab import OTHER_FORMATS, WEIGHT_FORMATS, Collective, Dtype  # noqa: F401 (Dtype re-exported)


class PeakTflops(StrictModel):
    """Dense peak (no 2:4 sparsity) per dtype; a missing dtype means the device cannot run it.
    One field per name of the Dtype vocabulary (a test keeps them equal)."""

    fp32: PositiveFloat | None = None
    tf32: PositiveFloat | None = None
    bf16: PositiveFloat | None = None
    fp16: PositiveFloat | None = None
    fp8: PositiveFloat | None = None
    int8: PositiveFloat | None = None


class EfficiencyCurve(StrictModel):
    """Achieved fraction of peak against an op's size, filled by `simcc calibrate`. Compute curves
    are indexed by one kernel's FLOPs or by arithmetic intensity (FLOPs per byte moved: a skinny
    GEMM streams its weights whatever its FLOPs), memory curves by bytes moved."""

    axis: Literal["kernel_flops", "intensity", "bytes"] = "kernel_flops"
    size: list[PositiveFloat] = Field(min_length=1)
    fraction: list[Fraction] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length_and_sorted(self) -> "EfficiencyCurve":
        if len(self.size) != len(self.fraction):
            raise ValueError("size and fraction must have the same length")
        if any(b <= a for a, b in zip(self.size, self.size[1:])):
            raise ValueError("size must be strictly increasing")
        return self


class Efficiency(StrictModel):
    """Why spec peaks over-predict: achieved fractions until calibration replaces them."""

    matmul: Fraction = 0.70
    attention: Fraction = 0.50
    memory: Fraction = 0.80
    # Time one kernel launch adds to its op (eager frameworks issue tiny kernels no faster than
    # this). Default 5 us: between a bare back-to-back launch (NVIDIA, "Getting Started with CUDA
    # Graphs", 2019: 3.8 us per 2.9 us kernel launched without a sync; Horace He, "Making Deep
    # Learning Go Brrrr From First Principles": ~280,000 PyTorch ops/s) and an eager PyTorch op on
    # an A100 or H100 (flagos-ai/Torch-FL PR #27: 8 us per op submitted; meta-pytorch/autoparallel
    # PR #146 floors every operator at 7 us).
    kernel_launch_us: NonNegativeFloat = 5.0
    # Best-shape fraction of a grouped GEMM (one kernel over many experts' ragged row blocks);
    # unset: `matmul`. Its per-expert scheduling keeps it below a dense GEMM's best shape.
    grouped_matmul: Fraction | None = None
    # Best-shape fractions of the FP8 peak for FP8 GEMMs (dense, grouped); unset: as bf16's.
    fp8_matmul: Fraction | None = None
    fp8_grouped_matmul: Fraction | None = None
    # Share of the dense fraction a block-scaled FP8 GEMM keeps (DeepSeek-V3's 1 x 128 activation and
    # 128 x 128 weight scales: the kernel rescales its partial sums every 128 of K, arXiv 2412.19437
    # sec. 3.3.2); unset: as fast as per-tensor scaling. Grouped FP8 fractions are fitted on
    # block-scaled kernels (DeepGEMM) and are not scaled again.
    fp8_block_scaled_share: Fraction | None = None
    # Engines that multiply quantized weights by activations quantized to 8 bits with integer dot
    # products (llama.cpp's CPU backend: the activations go to Q8_0/Q8_K, the products to SDOT on
    # Arm, VNNI on x86) run at a fraction of the int8 peak that depends on the weights' format: a
    # format with a repacked, tiled kernel for the ISA runs several times faster than one the engine
    # multiplies row by row. Keyed by format (simcc list: weight formats), `other` for the rest and
    # for bits-per-weight figures; empty: quantized weights are dequantized to the compute dtype.
    quantized_matmul: dict[str, Fraction] = {}
    # A GEMM over weights stored narrower than the activations it multiplies (weight-only
    # quantization: int8, int4, a GGUF format, a bits-per-weight figure) runs in a mixed-input
    # kernel that converts each weight tile back to the compute dtype inside its main loop, on the
    # tensor cores' dtype, at this fraction of the dense kernel's rate for the same shape. Unset:
    # at the dense rate (the conversion's FLOPs alone are counted).
    weight_only_matmul: Fraction | None = None
    # Each output tile's K loop fills and drains a software pipeline: a GEMM with inner dimension K
    # runs at K / (K + gemm_k_overhead) of its best shape (0: not modelled for this device).
    gemm_k_overhead: NonNegativeFloat = 0.0
    # A grouped GEMM's expert with M rows (its tokens) runs at M / (M + grouped_gemm_m_overhead) of
    # the best shape: its weights serve only the output tiles its few rows fill, so few tokens per
    # expert leave each tile's weight loads and the expert's scheduling unamortised (tiled
    # kernels: from 64 rows; below, a matrix-vector kernel streams the weights; 0: not modelled).
    grouped_gemm_m_overhead: NonNegativeFloat = 0.0
    # Host work an inference engine does once per serving step (building and encoding the step's
    # graph, sampling), beyond each kernel's launch; measured for an engine, 0 where unknown.
    serving_step_us: NonNegativeFloat = 0.0
    # Below this many tokens in a step, the engine's expert kernel runs one matrix-vector product
    # per (token, expert) pair, each reading its expert's weights, instead of one GEMM per expert
    # (0: always per expert). Measured for an engine, as serving_step_us.
    expert_matvec_below_tokens: NonNegativeInt = 0
    curves: dict[Literal["gemm", "grouped_gemm", "attention", "conv", "lstm", "moefication", "gemm_backward",
                         "grouped_gemm_backward"], EfficiencyCurve] = {}
    # Fraction of memory bandwidth against bytes moved, per memory-bound family.
    memory_curves: dict[Literal["memcpy", "permute", "combine", "gate", "elementwise", "embedding", "optimizer",
                                "optimizer_unfused"], EfficiencyCurve] = {}
    source: str = "simcc defaults"

    @model_validator(mode="after")
    def _axes_match_the_bound(self) -> "Efficiency":
        for key in self.quantized_matmul:
            if key != OTHER_FORMATS and key not in WEIGHT_FORMATS:
                raise ValueError(f"quantized_matmul.{key}: expected a weight format "
                                 f"({', '.join(WEIGHT_FORMATS)}) or '{OTHER_FORMATS}'")
        for family, curve in self.curves.items():
            if curve.axis == "bytes":
                raise ValueError(f"curves.{family}: a compute curve's axis is kernel_flops or intensity, not bytes")
        for family, curve in self.memory_curves.items():
            if curve.axis != "bytes":
                raise ValueError(f"memory_curves.{family}: a memory curve's axis is bytes")
        return self


class Power(StrictModel):
    tdp_w: PositiveFloat
    idle_w: NonNegativeFloat

    @model_validator(mode="after")
    def _idle_below_tdp(self) -> "Power":
        if self.idle_w > self.tdp_w:
            raise ValueError("idle_w must not exceed tdp_w")
        return self


class Price(StrictModel):
    usd_per_device_hour: PositiveFloat
    date: str = Field(pattern=r"^\d{4}-\d{2}(-\d{2})?$")
    source: str


MAX_CPU_THREADS = 1 << 20  # threads or cores of one CPU host: bounds a process's share of it


class Device(StrictModel):
    kind: Literal["device"] = "device"
    name: str
    source: str
    processor: Literal["gpu", "cpu", "tpu"] = "gpu"  # which measurements may calibrate it
    peak_tflops: PeakTflops
    memory_gb: PositiveFloat
    memory_bandwidth_gb_s: PositiveFloat
    power: Power
    price: Price | None = None
    efficiency: Efficiency = Efficiency()
    # Streaming multiprocessors (compute units) that run GEMM tiles side by side: GEMMs whose
    # tiles do not fill whole waves of them lose the rest (costs/compute.py). None: not modelled.
    sm_count: PositiveInt | None = None
    # CUDA context, allocator fragmentation and framework workspaces; not usable for tensors.
    reserve_gb: NonNegativeFloat = 2.0
    # CPU: the threads one process used when the efficiency figures were measured (`simcc calibrate`
    # records the profile's) and the host's cores. With both, a run of several processes on the
    # host gets each process's share (specs.hardware.threads_share). None: the figures describe the
    # whole processor.
    threads: int_up_to(MAX_CPU_THREADS) | None = None
    cores: int_up_to(MAX_CPU_THREADS) | None = None

    @model_validator(mode="after")
    def _integer_peak_for_quantized_products(self) -> "Device":
        if self.efficiency.quantized_matmul and not self.peak_tflops.int8:
            raise ValueError("efficiency.quantized_matmul needs peak_tflops.int8: its fractions are of the int8 peak")
        return self


def _require_when_several(count: int, value: object, field: str, count_field: str) -> None:
    """A link level only exists when there is more than one of the things it connects."""
    if count > 1 and value is None:
        raise ValueError(f"{field} is required when {count_field} > 1")


class CollectiveFit(StrictModel):
    """Measured time of one collective over `ranks` ranks of this link, for messages up to
    `max_bytes`: t = latency + bytes / bandwidth (nccl-tests size; algorithm bandwidth)."""

    collective: Collective
    ranks: int = Field(ge=2, le=1 << 20)
    max_bytes: PositiveFloat
    latency_us: NonNegativeFloat
    bandwidth_gb_s: PositiveFloat


class Link(StrictModel):
    """One device's port on a link level; bandwidth is per direction."""

    bandwidth_gb_s: PositiveFloat
    latency_us: NonNegativeFloat
    topology: Literal["switch", "ring", "mesh", "pcie"] = "switch"
    # Protocol efficiency: NCCL's all-reduce reaches ~370 GB/s bus bandwidth on 8x H100 (nccl-tests,
    # large messages) of NVLink4's 450 GB/s per direction (NVIDIA H100 datasheet): ~20% lost.
    efficiency: Fraction = 0.80
    # All-to-all exchanges distinct data with every peer at once instead of streaming a pipelined
    # ring, and reaches less of the link (nccl-tests all-to-all bus bandwidth: ~320 of 450 GB/s on
    # 8x H100). None: `efficiency`.
    all_to_all_efficiency: Fraction | None = None
    # Piecewise fits from `simcc calibrate`; they replace the model for groups they cover.
    fits: list[CollectiveFit] = []


class Node(StrictModel):
    kind: Literal["node"] = "node"
    name: str
    source: str
    device: Device
    devices_per_node: PositiveInt
    intra_link: Link | None = None
    host_link: Link
    # CPU hosts: threads each process (device) runs with; default the host's cores shared evenly.
    threads_per_device: int_up_to(MAX_CPU_THREADS) | None = None

    @model_validator(mode="after")
    def _intra_link_when_several(self) -> "Node":
        _require_when_several(self.devices_per_node, self.intra_link, "intra_link", "devices_per_node")
        return self


class Network(StrictModel):
    nic_gbit_s: PositiveFloat
    nics_per_node: PositiveInt
    latency_us: NonNegativeFloat
    oversubscription: float = Field(default=1.0, ge=1.0)
    efficiency: Fraction = 0.80


class Cluster(StrictModel):
    kind: Literal["cluster"] = "cluster"
    name: str
    source: str
    node: Node
    nodes: PositiveInt
    network: Network | None = None
    price: Price | None = None

    @model_validator(mode="after")
    def _network_when_several(self) -> "Cluster":
        _require_when_several(self.nodes, self.network, "network", "nodes")
        return self


class Storage(StrictModel):
    """Where weights that do not fit in memory live on an edge device."""

    tier: Literal["flash", "nvme", "host_ram", "sd_card", "ufs"]
    bandwidth_gb_s: PositiveFloat
    capacity_gb: PositiveFloat | None = None


class Edge(StrictModel):
    kind: Literal["edge"] = "edge"
    name: str
    source: str
    device: Device
    unified_memory: bool = True
    storage: Storage
    price: Price | None = None


@dataclass(frozen=True)
class System:
    """The resolved machine the cost model sees, whatever kind of profile described it."""

    name: str
    kind: str
    device: Device
    devices_per_node: int
    nodes: int
    intra_link: Link | None
    network: Network | None
    storage: Storage | None
    price: Price | None
    source_file: str
    host_link: Link | None = None  # a device's link to its host's memory (PCIe); None: not described

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def inter_node_gb_s_per_device(self) -> float:
        """NIC bandwidth one device can use, after oversubscription and protocol efficiency."""
        if self.network is None:
            return 0.0
        net = self.network
        node_total = net.nic_gbit_s / 8.0 * net.nics_per_node
        return node_total / self.devices_per_node / net.oversubscription * net.efficiency


def threads_share(device: Device, processes: int, threads_per_process: int | None = None) -> float:
    """How much of its measured speed each of `processes` busy processes on one CPU host keeps: the
    threads it gets over the threads it was measured with. Compute scales with threads (each core
    its own vector units); so does the memory bandwidth a process gets, because the ranks of one
    run are busy at the same time and share the host's channels in proportion to their threads.
    1 for a GPU, or a CPU profile that does not say what it was measured with."""
    if device.processor != "cpu" or device.threads is None:
        return 1.0
    cores = device.cores or device.threads
    have = threads_per_process or max(1, cores // processes)
    return min(have, cores) / device.threads


def _per_process(device: Device, processes: int, threads_per_process: int | None) -> Device:
    """The device as one of `processes` processes on its host sees it (threads_share)."""
    share = threads_share(device, processes, threads_per_process)
    if share == 1.0:
        return device
    return device.model_copy(update={
        "peak_tflops": device.peak_tflops.model_copy(update={
            dtype: value * share for dtype, value in device.peak_tflops.model_dump(exclude_none=True).items()}),
        "memory_bandwidth_gb_s": device.memory_bandwidth_gb_s * share,
        "threads": max(1, round(device.threads * share)) if device.threads else None})


def system_from(profile: Device | Node | Cluster | Edge, source_file: str) -> System:
    if isinstance(profile, Device):
        return System(profile.name, "device", _per_process(profile, 1, None), 1, 1, None, None, None, profile.price,
                      source_file)
    if isinstance(profile, Node):
        device = _per_process(profile.device, profile.devices_per_node, profile.threads_per_device)
        return System(profile.name, "node", device, profile.devices_per_node, 1,
                      profile.intra_link, None, None, profile.device.price, source_file, profile.host_link)
    if isinstance(profile, Cluster):
        node = profile.node
        device = _per_process(node.device, node.devices_per_node, node.threads_per_device)
        return System(profile.name, "cluster", device, node.devices_per_node, profile.nodes,
                      node.intra_link, profile.network, None, profile.price or node.device.price, source_file,
                      node.host_link)
    return System(profile.name, "edge", _per_process(profile.device, 1, None), 1, 1, None, None, profile.storage,
                  profile.price or profile.device.price, source_file)


def device_of(profile: Device | Node | Cluster | Edge) -> Device:
    """The profile's device as written (as measured), before any per-process share: what
    calibration starts from and what kernel measurements are compared with."""
    if isinstance(profile, Device):
        return profile
    if isinstance(profile, Cluster):
        return profile.node.device
    return profile.device


PROFILE_KINDS: dict[str, type[StrictModel]] = {"device": Device, "node": Node, "cluster": Cluster, "edge": Edge}
