"""Reading a measurements table, and predicting each measured row with the cost model's own ops."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from simcc.costs.compute import op_cost
from simcc.errors import InputError
from simcc.model.blocks import Batch, Shard, moe_ffn_work
from simcc.model.ops import Op, backward_of, elementwise, gemm
from simcc.profile.comm import COMM_COLLECTIVES, COMM_COLUMNS
from simcc.profile.kernels import FAMILIES, MEASUREMENT_COLUMNS
from simcc.specs.hardware import Device
from simcc.specs.workload import MoEFFNBlock

PROCESSOR_OF_DEVICE_TYPE = {"cpu": "cpu", "cuda": "gpu"}


def _read(path: str) -> pd.DataFrame:
    if not Path(path).is_file():
        raise InputError(path, "", "file not found")
    try:
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, "", f"not a readable CSV ({exc})") from None


def measurement_kind(path: str) -> str:
    """"collectives" for `simcc profile comm` tables, "kernels" otherwise."""
    return "collectives" if "collective" in _read(path).columns else "kernels"


def read_collectives(path: str) -> pd.DataFrame:
    frame = _read(path)
    missing = [c for c in COMM_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, ", ".join(missing), "missing column(s) (write them with `simcc profile comm`)")
    unknown = sorted(set(frame["collective"]) - set(COMM_COLLECTIVES))
    if unknown:
        raise InputError(path, "collective", f"unknown op name(s) {', '.join(map(str, unknown))}; "
                         f"expected {', '.join(COMM_COLLECTIVES)}")
    for column, floor in (("median_s", 0.0), ("bytes", 0.0), ("ranks", 1.0)):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values <= floor).any():
            row = int((values.isna() | (values <= floor)).idxmax()) + 2
            raise InputError(path, f"line {row}: {column}", f"expected a number > {floor:g}")
    return frame


def read_measurements(path: str) -> pd.DataFrame:
    frame = _read(path)
    missing = [c for c in MEASUREMENT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, ", ".join(missing), "missing column(s) (write measurements with `simcc profile`)")
    unknown = sorted(set(frame["family"]) - set(FAMILIES))
    if unknown:
        raise InputError(path, "family", f"unknown op name(s) {', '.join(map(str, unknown))}; expected {', '.join(FAMILIES)}")
    bad = pd.to_numeric(frame["median_s"], errors="coerce")
    if bad.isna().any() or (bad <= 0).any():
        row = int((bad.isna() | (bad <= 0)).idxmax()) + 2
        raise InputError(path, f"line {row}: median_s", "expected a positive number of seconds")
    if frame["device_type"].nunique() != 1:
        raise InputError(path, "device_type", "measurements from more than one device type")
    return frame


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
    if family == "attention":
        return [Op(row["case"], "attention", row["flops"], row["bytes"], dtype)]
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
