"""User-supplied CSV tables (request traces, expert histograms, placements), validated the same
way as YAML: one error line naming the file, the column (and line) and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simcc.errors import InputError

if TYPE_CHECKING:  # pandas loads only when a table is read
    import pandas


def open_csv(path: str, named_by: str = "") -> "pandas.DataFrame":
    import pandas as pd

    where = f" (named by {named_by})" if named_by else ""
    if not Path(path).is_file():
        raise InputError(path, "", f"file not found{where}")
    try:
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, "", f"not a readable CSV ({exc})") from None


def read_numeric_csv(path: str, minimums: dict[str, float], optional: dict[str, float] | None = None,
                     named_by: str = "") -> "pandas.DataFrame":
    """Columns in `minimums` are required, those in `optional` filled with their default; every
    value must be a number at least its column's minimum."""
    import pandas as pd

    frame = open_csv(path, named_by)
    missing = [c for c in minimums if c not in frame.columns]
    if missing:
        raise InputError(path, ", ".join(missing), f"missing column(s); expected {', '.join(minimums)}")
    if frame.empty:
        raise InputError(path, "", "no rows")
    for column, default in (optional or {}).items():
        if column not in frame.columns:
            frame[column] = default
    floors = {**minimums, **{c: 0.0 for c in (optional or {}) if c not in minimums}}
    for column, floor in floors.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | (values < floor)
        if bad.any():
            row = int(bad.idxmax())
            raise InputError(path, f"line {row + 2}: {column}",  # line 1 is the header
                             f"expected a number >= {floor:g}, got {frame[column][row]!r}")
        frame[column] = values
    return frame
