"""Bounded memo tables: a figure worked out once per distinct input, kept while the table has room
(when full it starts again empty, so a long sweep's memory stays bounded).

A key may name an object by its id, where the object does not hash (a spec holding lists) or
hashes slowly (a model, a system). Such objects are passed as `pinned`: the entry keeps them
alive, so no other object can take their id while the entry lives, and the key stays exact.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

Value = TypeVar("Value")


class Memo(Generic[Value]):
    def __init__(self, limit: int) -> None:
        self._entries: dict[Hashable, tuple[tuple[object, ...], Value]] = {}
        self._limit = limit

    def get(self, key: Hashable, make: Callable[[], Value], *pinned: object) -> Value:
        """The value for `key`, made by `make()` the first time; `pinned`: the objects whose ids
        the key holds."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._limit:
                self._entries.clear()
            entry = self._entries[key] = (pinned, make())
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()
