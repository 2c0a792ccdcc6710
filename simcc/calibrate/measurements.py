"""Reading a measurements table, and predicting each measured row with the cost model's own ops."""

from __future__ import annotations

import pandas as pd

from simcc.costs.compute import op_cost
from simcc.errors import InputError
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds.moe_ffn import work as moe_ffn_work
from simcc.model.ops import Op, backward_of, elementwise, gemm
from simcc.profile.comm import COMM_COLLECTIVES, COMM_COLUMNS
from simcc.profile.kernels import FAMILIES, MEASUREMENT_COLUMNS
from simcc.specs.hardware import Device
from simcc.specs.tables import open_csv
from simcc.specs.workload import MoEFFNBlock

PROCESSOR_OF_DEVICE_TYPE = {"cpu": "cpu", "cuda": "gpu"}


def measurement_kind(path: str) -> str:
    """"collectives" for `simcc profile comm` tables, "kernels" otherwise."""
    return "collectives" if "collective" in open_csv(path).columns else "kernels"


def _read_table(path: str, columns: tuple[str, ...], name_column: str, names: tuple[str, ...],
                positive: dict[str, float], written_by: str) -> pd.DataFrame:
    frame = open_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(path, ", ".join(missing), f"missing column(s) (write the table with {written_by})")
    unknown = sorted(set(frame[name_column]) - set(names))
    if unknown:
        raise InputError(path, name_column, f"unknown op name(s) {', '.join(map(str, unknown))}; expected {', '.join(names)}")
    for column, floor in positive.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values <= floor).any():
            row = int((values.isna() | (values <= floor)).idxmax()) + 2  # line 1 is the header
            raise InputError(path, f"line {row}: {column}", f"expected a number > {floor:g}")
    if frame["device_type"].nunique() != 1:
        raise InputError(path, "device_type", "measurements from more than one device type")
    return frame


def read_measurements(path: str) -> pd.DataFrame:
    return _read_table(path, MEASUREMENT_COLUMNS, "family", FAMILIES, {"median_s": 0.0}, "`simcc profile`")


def read_collectives(path: str) -> pd.DataFrame:
    return _read_table(path, COMM_COLUMNS, "collective", COMM_COLLECTIVES, {"median_s": 0.0, "bytes": 0.0, "ranks": 1.0},
                       "`simcc profile comm`")


def check_device(frame: pd.DataFrame, device: Device, measurements: str, profile: str) -> None:
    measured = PROCESSOR_OF_DEVICE_TYPE.get(str(frame["device_type"].iloc[0]), "?")
    if measured != device.processor:
        raise InputError(measurements, "device_type",
                         f"measured on a {measured} ({frame['device_name'].iloc[0]}) but {profile} describes a "
                         f"{device.processor} ({device.name})")


def row_ops(row: pd.Series) -> list[Op]:
    """The cost model's ops for one measured kernel (same constructors as simcc/model/blocks.py)."""
    family, dtype = row["family"], row["dtype"]
    tokens, hidden, ffn, k = int(row["tokens"]), int(row["hidden"]), int(row["ffn"]), int(row["k"])
    if family == "gemm":
        return [gemm(row["case"], tokens, hidden, ffn, dtype)]
    if family == "grouped_gemm":
        experts = int(row["experts"])
        return [Op(row["case"], "grouped_gemm", row["flops"], row["bytes"], dtype,
                   kernel_flops=row["kernel_flops"], launches=experts)]
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
    if family == "lstm":
        step = gemm("lstm", tokens, 2 * hidden, 4 * hidden, dtype)
        return [Op("lstm", "lstm", step.flops, step.bytes, dtype),
                elementwise("lstm.cell", tokens * 4 * hidden, 2, 1, dtype, flops_per_element=10)]
    raise ValueError(family)


def _bytes(dtype: str) -> int:
    from simcc.model.ops import DTYPE_BYTES

    return DTYPE_BYTES[dtype]


def moe_layer_ops(row: pd.Series) -> list[Op]:
    """simcc's own ops for the measured MoE layer: a dropless top-k moe_ffn block on one device."""
    spec = MoEFFNBlock(experts=int(row["experts"]), k=int(row["k"]), expert_hidden=int(row["ffn"]), activation="relu",
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1})
    work = moe_ffn_work(spec, int(row["hidden"]), Batch(int(row["tokens"]), 1, 1), Shard(dtype=row["dtype"], router_dtype=row["dtype"]))
    forward = [i for i in work.forward if isinstance(i, Op)]
    if bool(row["backward"]):
        return forward + [backward_of(i) for i in reversed(forward)]  # type: ignore[misc]
    return forward


def predict(row: pd.Series, device: Device) -> float:
    ops = moe_layer_ops(row) if row["family"] == "moe_layer" else row_ops(row)
    return sum(op_cost(device, op).seconds for op in ops)
