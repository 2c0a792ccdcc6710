"""The sweep file: a workload, hardware profiles, fixed overrides and axes of `--set` paths."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from simcc.specs.base import StrictModel
from simcc.specs.loader import read_yaml, validate


MAX_CONFIGURATIONS = 100_000  # about ten minutes at a sweep's speed on two cores


class SweepSpec(StrictModel):
    workload: str  # a shipped name or a path (relative to the sweep file)
    hardware: list[str] = Field(min_length=1)  # profiles: the first axis
    set: list[str] = []  # overrides applied to every configuration (`hardware.` prefix for the profile)
    # Each axis: a `--set` path and the values it takes; the sweep is their cartesian product.
    axes: dict[str, list[Any]] = {}
    steps: int = Field(default=1, ge=1, le=100)  # simulated training steps per configuration
    seed: int | None = Field(default=None, ge=0)

    @field_validator("axes")
    @classmethod
    def _axes_have_values(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in axes.items():
            if not values:
                raise ValueError(f"axis {path} has no values")
            for value in values:
                if not _plain_value(value):
                    raise ValueError(f"axis {path}: each value must be a number, a string, true/false or null "
                                     "(finite numbers only)")
            if "=" in path:
                raise ValueError(f"axis {path}: give the path alone; its values go in the list")
        return axes

    @model_validator(mode="after")
    def _bounded(self) -> "SweepSpec":
        if self.size > MAX_CONFIGURATIONS:
            shape = " x ".join(str(n) for n in [len(self.hardware), *(len(v) for v in self.axes.values())])
            raise ValueError(f"{shape} = {self.size:,} configurations; a sweep runs at most {MAX_CONFIGURATIONS:,} "
                             "(split it, or use fewer values per axis)")
        return self

    @property
    def size(self) -> int:
        count = len(self.hardware)
        for values in self.axes.values():
            count *= len(values)
        return count


def _plain_value(value: Any) -> bool:
    """What one `--set` can carry: a scalar; a float must be finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def _near(base: Path, name: str) -> str:
    """A path relative to the sweep file when one exists there; otherwise the name as given."""
    candidate = base / name
    return str(candidate) if candidate.exists() else name


def load_sweep(path: str) -> SweepSpec:
    data = read_yaml(Path(path))
    spec = validate(SweepSpec, data, path)
    base = Path(path).parent
    return spec.model_copy(update={"workload": _near(base, spec.workload),
                                   "hardware": [_near(base, h) for h in spec.hardware]})
