"""Reading a measurements table, and predicting each measured row with the cost model's own ops."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import ValidationError

from simcc.costs.compute import op_cost
from simcc.errors import InputError
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds.moe_ffn import work as moe_ffn_work
from simcc.model.ops import Op, backward_of, elementwise, gemm
from simcc.model.optimizer import optimizer_step
from simcc.profile.comm import COMM_COLLECTIVES, COMM_COLUMNS
from simcc.profile.kernels import FAMILIES, HOST_CORES_COLUMN, HOST_LOAD_COLUMN, MEASUREMENT_COLUMNS
from simcc.specs.hardware import Device
from simcc.specs.tables import MIN_MEASURED_S, MAX_MEASURED_S, MAX_SIZE, MAX_TOKENS, Column, Table, open_csv, read_table
from simcc.specs.vocab import DTYPES
from simcc.specs.workload import MoEFFNBlock, Optimizer, Precision

_FP32 = Precision(weights="fp32", compute="fp32", gradients="fp32", communication="fp32")  # the profiler's optimizer steps

PROCESSOR_OF_DEVICE_TYPE = {"cpu": "cpu", "cuda": "gpu"}


def measurement_kind(path: str) -> str:
    """"collectives" for `simcc profile comm` tables, "kernels" otherwise."""
    return "collectives" if "collective" in open_csv(path).columns else "kernels"


# What each kernel family's prediction and fit read (row_ops, moe_layer_ops, fit.fit_curve,
# fit.fit_memory): those counts and sizes must be at least 1 (no division by zero, no FLOPs per
# byte that overflow); the columns a family does not read may be 0.
FAMILY_NEEDS: dict[str, tuple[str, ...]] = {
    "gemm": ("tokens", "hidden", "ffn", "flops", "bytes", "kernel_flops"),
    "grouped_gemm": ("experts", "flops", "bytes", "kernel_flops"),
    "gemm_backward": ("tokens", "hidden", "ffn", "flops", "bytes", "kernel_flops"),
    "grouped_gemm_backward": ("experts", "flops", "bytes", "kernel_flops"),
    "gate": ("tokens", "hidden", "experts"),
    "permute": ("tokens", "hidden", "k"),
    "combine": ("tokens", "hidden", "k"),
    "attention": ("flops", "bytes", "kernel_flops"),
    "moefication": ("flops", "bytes", "kernel_flops"),
    "memcpy": ("bytes",),
    "optimizer": ("tokens", "experts", "bytes"),  # parameters, tensors
    "optimizer_unfused": ("tokens", "experts", "bytes"),
    "lstm": ("tokens", "hidden", "flops", "bytes", "kernel_flops"),
    "moe_layer": ("tokens", "hidden", "ffn", "experts", "k"),
}
ELEMENTWISE_FAMILIES = ("memcpy", "permute", "combine", "optimizer", "optimizer_unfused")  # costed at the vector dtype, whatever they moved
MAX_RANKS = 1_000_000  # ranks in one measured collective
MAX_THREADS = 1_000_000  # threads of one measuring process, cores of its host
_DEVICE = [Column("device_type", "name", names=tuple(PROCESSOR_OF_DEVICE_TYPE), label="device type"),
           Column("device_name", "text"), Column("torch_version", "text")]
_TIME = Column("median_s", low=MIN_MEASURED_S, high=MAX_MEASURED_S)
KERNEL_COLUMNS = [
    Column("family", "name", names=FAMILIES, label="op name"), Column("case", "text"),
    Column("dtype", "name", names=tuple(DTYPES), label="dtype"),
    *(Column(size, high=MAX_SIZE) for size in ("flops", "bytes", "kernel_flops")),
    *(Column(count, "integer", high=MAX_TOKENS) for count in ("tokens", "hidden", "ffn", "experts", "k")),
    Column("backward", "flag"), _TIME, *_DEVICE,
    # spread and host load: calibrate leaves contended timings out (older tables lack host_load)
    Column("p10_s", low=MIN_MEASURED_S, high=MAX_MEASURED_S), Column("p90_s", low=MIN_MEASURED_S, high=MAX_MEASURED_S),
    Column(HOST_LOAD_COLUMN, low=0.0, high=1e6, default=0.0),
    Column("threads", "integer", 1, MAX_THREADS),
    Column(HOST_CORES_COLUMN, "integer", 0, MAX_THREADS, default=0),  # 0: not recorded (older tables)
]
COLLECTIVE_COLUMNS = [
    Column("collective", "name", names=COMM_COLLECTIVES, label="op name"),
    Column("bytes", low=0.0, above=True, high=MAX_SIZE), Column("ranks", "integer", 2, MAX_RANKS),
    Column("ranks_per_node", "integer", 1, MAX_RANKS), _TIME, *_DEVICE,
]


def _read_table(path: str, columns: list[Column], written: tuple[str, ...], written_by: str) -> Table:
    """Every column the readers use checked, the rest of `written` only required to be there."""
    checked = {c.name for c in columns}
    columns = columns + [Column(name, "any") for name in written if name not in checked]
    table = read_table(path, columns, hint=f"write the table with {written_by}")
    if table.frame["device_type"].nunique() != 1:
        raise InputError(path, "device_type", "measurements from more than one device type")
    return table


def read_measurements(path: str) -> pd.DataFrame:
    """A `simcc profile` table, with each family's sizes checked where its prediction uses them."""
    table = _read_table(path, KERNEL_COLUMNS, MEASUREMENT_COLUMNS, "`simcc profile`")
    frame = table.frame
    for family, needed in FAMILY_NEEDS.items():
        mine = (frame["family"] == family).to_numpy()
        for column in needed:
            table.refuse(mine & (frame[column] < 1).to_numpy(), column, f"at least 1 for a {family} row")
    layer = (frame["family"] == "moe_layer").to_numpy()
    table.refuse(layer & (frame["k"] > frame["experts"]).to_numpy(), "k", "at most the row's experts for a moe_layer row")
    for position in np.flatnonzero(layer):
        try:  # the layer spec's own rules (k <= experts, size limits) apply to a measured layer too
            moe_layer_spec(frame.iloc[position])
        except ValidationError as exc:
            first = exc.errors()[0]
            field = SPEC_COLUMNS.get(str(first["loc"][0]) if first["loc"] else "", "experts")
            reason = str(first["msg"]).removeprefix("Value error, ")
            table.fail(int(position), field, f"a moe_layer row simcc cannot model: {reason}")
    return frame


def read_collectives(path: str) -> pd.DataFrame:
    """A `simcc profile comm` table; a node cannot hold more ranks than the collective has."""
    table = _read_table(path, COLLECTIVE_COLUMNS, COMM_COLUMNS, "`simcc profile comm`")
    frame = table.frame
    table.refuse((frame["ranks_per_node"] > frame["ranks"]).to_numpy(), "ranks_per_node", "at most the row's ranks")
    return frame


def check_device(frame: pd.DataFrame, device: Device, measurements: str, profile: str) -> None:
    """The measurements come from the kind of processor the profile describes, and every dtype a
    matrix product was measured in has a peak there."""
    from simcc.costs.compute import peak_flops

    measured = PROCESSOR_OF_DEVICE_TYPE.get(str(frame["device_type"].iloc[0]), "?")
    if measured != device.processor:
        raise InputError(measurements, "device_type",
                         f"measured on a {measured} ({frame['device_name'].iloc[0]}) but {profile} describes a "
                         f"{device.processor} ({device.name})")
    if "dtype" not in frame.columns:  # collectives
        return
    for dtype in sorted(set(frame.loc[~frame["family"].isin(ELEMENTWISE_FAMILIES), "dtype"])):
        try:
            peak_flops(device, dtype)
        except InputError as err:
            raise InputError(measurements, "dtype", f"{dtype} measurements, but {profile}: {err.message}") from None


def row_ops(row: pd.Series) -> list[Op]:
    """The cost model's ops for one measured kernel (same constructors as simcc/model/blocks.py)."""
    family, dtype = row["family"], row["dtype"]
    tokens, hidden, ffn, k = int(row["tokens"]), int(row["hidden"]), int(row["ffn"]), int(row["k"])
    if family == "gemm":
        return [gemm(row["case"], tokens, hidden, ffn, dtype)]
    if family == "gemm_backward":
        return [backward_of(gemm(row["case"], tokens, hidden, ffn, dtype))]  # type: ignore[list-item]
    if family in ("grouped_gemm", "grouped_gemm_backward"):
        experts = int(row["experts"]) * (2 if family == "grouped_gemm_backward" else 1)  # kernels launched
        return [Op(row["case"], family, row["flops"], row["bytes"], dtype, kernel_flops=row["kernel_flops"],
                   launches=experts)]
    if family == "gate":
        experts = int(row["experts"])
        return [gemm("router", tokens, hidden, experts, dtype),
                elementwise("topk", tokens * experts, 1, 1, dtype, flops_per_element=6, family="gate")]
    if family == "permute":  # dispatch: gather k copies of each token
        return [elementwise(row["case"], tokens * k * hidden, 1, 1, dtype, family="permute")]
    if family == "combine":  # weighted scatter-add of the k expert outputs back to each token
        return [elementwise(row["case"], tokens * k * hidden, 1, 1.0 / k, dtype, family="combine")]
    if family in ("attention", "moefication"):  # the profiler recorded the cost model's own FLOPs and bytes
        return [Op(row["case"], family, row["flops"], row["bytes"], dtype)]
    if family == "memcpy":
        return [elementwise(row["case"], row["bytes"] / 2 / _bytes(dtype), 1, 1, dtype, family="memcpy")]
    if family in ("optimizer", "optimizer_unfused"):  # the profiler recorded the update's bytes
        optimizer = Optimizer(type="adam", implementation="fused" if family == "optimizer" else "unfused")
        return [optimizer_step(float(row["tokens"]), float(row["experts"]), optimizer, _FP32,
                               float(row["bytes"]) / float(row["tokens"]))]
    if family == "lstm":
        step = gemm("lstm", tokens, 2 * hidden, 4 * hidden, dtype)
        return [Op("lstm", "lstm", step.flops, step.bytes, dtype),
                elementwise("lstm.cell", tokens * 4 * hidden, 2, 1, dtype, flops_per_element=10)]
    raise ValueError(family)


def _bytes(dtype: str) -> int:
    from simcc.model.ops import DTYPE_BYTES

    return DTYPE_BYTES[dtype]


# A measured MoE layer's spec fields, by the measurement column that gives them.
SPEC_COLUMNS = {"experts": "experts", "k": "k", "expert_hidden": "ffn"}


def moe_layer_spec(row: pd.Series) -> MoEFFNBlock:
    """The measured MoE layer as simcc's block: a dropless top-k moe_ffn on one device."""
    return MoEFFNBlock(experts=int(row["experts"]), k=int(row["k"]), expert_hidden=int(row["ffn"]), activation="relu",
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1})


def moe_layer_ops(row: pd.Series) -> list[Op]:
    """simcc's own ops for the measured MoE layer."""
    spec = moe_layer_spec(row)
    work = moe_ffn_work(spec, int(row["hidden"]), Batch(int(row["tokens"]), 1, 1), Shard(dtype=row["dtype"], router_dtype=row["dtype"]))
    forward = [i for i in work.forward if isinstance(i, Op)]
    if bool(row["backward"]):
        return forward + [backward_of(i) for i in reversed(forward)]  # type: ignore[misc]
    return forward


def predict(row: pd.Series, device: Device) -> float:
    ops = moe_layer_ops(row) if row["family"] == "moe_layer" else row_ops(row)
    return sum(op_cost(device, op).seconds for op in ops)
