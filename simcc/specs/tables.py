"""User-supplied CSV tables (request traces, expert histograms, placements, measurements),
validated the same way as YAML: one error line naming the file, the line and column, and what was
expected. Every reader describes its columns with `Column` and calls `read_table`, so a number is
always checked for being a number, finite, whole where a count is meant, and inside its bounds
before any model code sees it."""

from __future__ import annotations

import collections
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, NoReturn, Sequence

from simcc.errors import InputError
from simcc.io import read_user_text

if TYPE_CHECKING:  # pandas loads only when a table is read
    import numpy
    import pandas

MAX_TABLE_BYTES = 1 << 30  # a 10-million-request trace is a few hundred MB; this bounds memory
MAX_TOKENS = 10_000_000  # tokens of one request or one measured kernel (the --requests bound too)
MAX_ROWS = 10_000_000  # rows of a request trace: as many requests as --requests allows
MAX_COLUMNS = 1_000  # a table of ours has about twenty; more is not a table simcc wrote
MAX_ARRIVAL_S = 1e9  # about 31 years: a trace's arrival times, in seconds from its start
MAX_COMPUTE_SCALE = 1e6  # a request's compute relative to the nominal one
MIN_MEASURED_S = 1e-9  # one timed kernel or collective: no timer resolves less than a nanosecond
MAX_MEASURED_S = 86_400.0  # ... and a day is far beyond any real one
MAX_SIZE = 1e18  # FLOPs or bytes of one measured kernel or message (an exa-unit)

ColumnKind = Literal["number", "integer", "flag", "name", "text", "any"]  # any: only required to be there
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def _number(value: float) -> str:
    """A bound as a reader would write it: 10,000,000 rather than 1e+07."""
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


@dataclass(frozen=True)
class Column:
    """What one column must hold. Numbers lie in [low, high] (low excluded when `above`); names
    are one of `names` (`label` says what they name); a column with a `default` may be left out of
    the file and is then filled with it, one with `required=False` and no default is simply absent."""

    name: str
    kind: ColumnKind = "number"
    low: float = 0.0
    high: float = math.inf
    above: bool = False
    names: tuple[str, ...] = ()
    label: str = "name"
    default: Any = None
    required: bool = True

    def expected(self) -> str:
        if self.kind == "flag":
            return "True or False"
        if self.kind == "name":
            return f"one of {', '.join(self.names)}"
        if self.kind == "text":
            return "a non-empty value"
        what = "an integer" if self.kind == "integer" else "a finite number"
        floor = f"{'>' if self.above else '>='} {_number(self.low)}"
        if math.isinf(self.high):
            return f"{what} {floor}"
        if self.kind == "integer" and not self.above:
            return f"{what} from {_number(self.low)} to {_number(self.high)}"
        return f"{what} {floor} and at most {_number(self.high)}"

    @property
    def optional(self) -> bool:
        return self.default is not None or not self.required


@dataclass(frozen=True)
class Table:
    """A checked table and the file line of each row, for the reader's own cross-row checks."""

    path: str
    frame: "pandas.DataFrame"
    lines: "numpy.ndarray"
    text: str

    def fail(self, position: int, column: str, message: str) -> NoReturn:
        raise InputError(self.path, f"line {int(self.lines[position])}: {column}", message)

    def refuse(self, bad: Any, column: str, expected: str) -> None:
        """Fail at the first row where `bad` (a boolean per row) holds, showing the cell as written."""
        import numpy as np

        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            position = int(bad.argmax())
            self.fail(position, column, f"expected {expected}, got {self.cell(position, column)}")

    def cell(self, position: int, column: str) -> str:
        """The cell as the file spells it (the file is re-read on this error path only)."""
        _, header, records = _records(self.text)
        for start, record in records:
            if start == int(self.lines[position]) and header and column in header and len(record) == len(header):
                text = record[header.index(column)]
                return repr(text) if text.strip() else "an empty cell"
        return repr(self.frame[column].iloc[position])


def _blank(record: list[str]) -> bool:
    """Lines pandas skips: empty or whitespace only."""
    return not record or (len(record) == 1 and not record[0].strip())


def _records(text: str) -> tuple[int, list[str] | None, Iterator[tuple[int, list[str]]]]:
    """The header's line and names, and (first line, fields) for each data row."""
    reader = csv.reader(io.StringIO(text))

    def numbered() -> Iterator[tuple[int, list[str]]]:
        start = 1
        for record in reader:
            if not _blank(record):
                yield start, record
            start = reader.line_num + 1

    rows = numbered()
    first = next(rows, None)
    if first is None:
        return 1, None, rows
    return first[0], first[1], rows


def _record_lines(path: str, text: str, expected: Sequence[str]) -> tuple[list[str], list[int]]:
    """The header and the first line of each data row; every row must have the header's number
    of fields (pandas would silently pad a short row, or shift a long one into an index)."""
    lines: list[int] = []
    try:
        header_line, header, rows = _records(text)
        if header is None:
            columns = f" with columns {', '.join(expected)}" if expected else ""
            raise InputError(path, "", f"empty file; expected a header line{columns} and rows")
        if len(header) > MAX_COLUMNS:
            raise InputError(path, f"line {header_line}", f"{len(header):,} columns; at most {MAX_COLUMNS:,}")
        counts = collections.Counter(header)
        twice = sorted(name for name, count in counts.items() if name and count > 1)
        if twice:
            raise InputError(path, f"line {header_line}: {twice[0]}", "column appears twice in the header")
        for start, record in rows:
            if len(record) != len(header):
                raise InputError(path, f"line {start}", f"{len(record)} fields; the header has {len(header)} "
                                 f"({', '.join(header)})")
            lines.append(start)
    except csv.Error as exc:
        raise InputError(path, "", f"not a readable CSV ({exc})") from None
    return header, lines


def _as_float(cell: object) -> float:
    try:
        return float(str(cell))
    except ValueError:
        return math.nan


def _check_column(table: Table, column: Column) -> None:
    """Type, finiteness, wholeness and range of one column, in place."""
    import numpy as np
    import pandas as pd

    frame, name = table.frame, column.name
    raw = frame[name]
    if column.kind == "any":
        return
    if column.kind in ("number", "integer"):
        try:
            values = pd.to_numeric(raw, errors="coerce")
        except OverflowError:  # digits past any float: read each cell as a float (inf), refused below
            values = raw.map(_as_float)
        if values.dtype == object:  # integers past 64 bits stay Python ints: too large for any column
            values = values.map(lambda v: v if isinstance(v, float) or abs(v) < 2**63 else float("inf")).astype(float)
        as_float = values.astype(float).to_numpy()
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(as_float) | (as_float > column.high)
            bad |= (as_float <= column.low) if column.above else (as_float < column.low)
            if column.kind == "integer":
                bad |= np.isfinite(as_float) & (np.floor(as_float) != as_float)
        table.refuse(bad, name, column.expected())
        frame[name] = values.astype(np.int64) if column.kind == "integer" and values.dtype != np.int64 else values
        return
    present = raw.notna().to_numpy()
    text = raw.astype(object).where(raw.notna(), "").map(str).str.strip()
    if column.kind == "flag":
        lowered = text.str.lower()
        table.refuse(~lowered.isin(_TRUE | _FALSE).to_numpy(), name, column.expected())
        frame[name] = lowered.isin(_TRUE).to_numpy()
    elif column.kind == "name":
        unknown = ~present | ~raw.isin(column.names).to_numpy()
        if unknown.any():
            position = int(unknown.argmax())
            table.fail(position, name, f"unknown {column.label} {table.cell(position, name)}; expected {column.expected()}")
    elif column.kind == "text":
        table.refuse(~present | (text == "").to_numpy(), name, column.expected())


def read_table(path: str, columns: Sequence[Column], named_by: str = "", hint: str = "",
               max_rows: int = MAX_ROWS) -> Table:
    """Read and check a user's CSV. `named_by` says which option or field named the file, `hint`
    how to write a good one; both go into the error line."""
    import numpy as np
    import pandas as pd

    text = read_user_text(path, MAX_TABLE_BYTES, "a table", named_by)
    required = [c.name for c in columns if not c.optional]
    extra = [c.name for c in columns if c.optional]
    header, lines = _record_lines(path, text, required + ([f"(optional: {', '.join(extra)})"] if extra else []))
    missing = [name for name in required if name not in header]
    if missing:
        advice = f" ({hint})" if hint else ""
        raise InputError(path, ", ".join(missing), f"missing column(s); expected {', '.join(required)}{advice}")
    if not lines:
        raise InputError(path, "", "no rows under the header")
    if len(lines) > max_rows:
        raise InputError(path, "", f"{len(lines):,} rows; at most {max_rows:,}")
    as_text = {c.name: str for c in columns if c.kind in ("flag", "name", "text") and c.name in header}
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=as_text)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, "", f"not a readable CSV ({str(exc).strip()})") from None
    if len(frame) != len(lines):  # a layout the line count cannot follow: count rows instead
        lines = list(range(2, len(frame) + 2))
    table = Table(path, frame, np.asarray(lines), text)
    for column in columns:
        if column.name not in frame.columns:
            if column.default is not None:
                frame[column.name] = column.default
            continue
        _check_column(table, column)
    return table


def open_csv(path: str, named_by: str = "") -> "pandas.DataFrame":
    """The raw table, only found and parsed (for telling kinds of table apart by their columns)."""
    return read_table(path, [], named_by).frame


def read_numeric_csv(path: str, minimums: dict[str, float], optional: dict[str, float] | None = None,
                     named_by: str = "", maximum: float = 1e15) -> "pandas.DataFrame":
    """Columns in `minimums` are required, those in `optional` filled with their default; every
    value must be a finite number from its column's minimum (0 for optional ones) to `maximum`."""
    columns = [Column(name, low=floor, high=maximum) for name, floor in minimums.items()]
    columns += [Column(name, low=0.0, high=maximum, default=default)
                for name, default in (optional or {}).items() if name not in minimums]
    return read_table(path, columns, named_by).frame
