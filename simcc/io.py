"""Reading the files a user gives simcc, and writing what simcc produces (results, timelines,
profiles, plots) without ever harming what the user owns: no half-written file, no output on top
of a file the command reads, the permissions a replaced file had (or the user's umask for a new
one), and a bad path refused before any work."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from simcc.errors import InputError

# Every file this process has read as input (workloads, profiles, the files they name, traces,
# measurements). An output may never land on one of them.
_INPUTS: set[Path] = set()


def note_input(path: Path | str) -> None:
    """Record a file the command reads, so that no output of the same run can replace it."""
    try:
        _INPUTS.add(Path(path).resolve())
    except OSError:
        pass  # unresolvable paths cannot be written to either


def read_user_text(path: Path | str, max_bytes: int, kind: str, named_by: str = "") -> str:
    """A user's text file: a file (not a folder), present, at most `max_bytes`, UTF-8 (a leading
    byte-order mark is dropped); recorded as an input of this run. `kind` names what the file is
    in the size message ("a spec file"), `named_by` the option or field that named it."""
    where = f" (named by {named_by})" if named_by else ""
    file, source = Path(path), str(path)
    if file.is_dir():
        raise InputError(source, "", f"is a folder, not a file{where}")
    if not file.is_file():
        raise InputError(source, "", f"file not found{where}")
    note_input(file)  # an output of this run may never replace it
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise InputError(source, "", f"{size:,} bytes; {kind} is at most {max_bytes:,}")
        data = file.read_bytes()
    except OSError as exc:
        raise InputError(source, "", f"cannot be read ({exc.strerror}){where}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(source, f"byte {exc.start}", "expected UTF-8 text") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: Path | str, option: str) -> Path:
    """Refuse, before any work is done, an output path that would replace an input of this run,
    that names a folder, that lies under a regular file, or whose folder cannot be written."""
    target = Path(path)
    resolved = target.resolve()
    if any(_same_file(resolved, read) for read in _INPUTS):
        raise InputError(option, str(path), "is a file this command reads (it would overwrite an input); "
                                            "write the output elsewhere")
    if target.is_dir():
        raise InputError(option, str(path), "is a folder; expected a file name")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(option, str(path), f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(option, str(path), f"the folder {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(option, str(path), "is not writable")
    return target


def _new_file_mode() -> int:
    """What open() would give a new file: 0666 less the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path | str, content: str | bytes, option: str = "output") -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file. The
    file keeps the mode of the one it replaces; a new one gets the user's umask."""
    path = check_output(path, option)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _new_file_mode()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(option, str(path), f"cannot be written ({exc.strerror})") from None
    try:
        if isinstance(content, bytes):
            with os.fdopen(handle, "wb") as raw:
                raw.write(content)
        else:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise InputError(option, str(path), f"cannot be written ({exc.strerror})") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
