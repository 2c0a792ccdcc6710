"""The one error type users see: it always names a file, a field and what was expected."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input. The CLI prints `str(err)` on one line and exits with code 2."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        # args are the constructor's own, so that a copy can be rebuilt as type(err)(*err.args), as
        # pickling does when a sweep worker process sends the error back.
        super().__init__(source, field, message)

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.message}".replace("\n", " ")
