"""Record what ran where and when; write it as Chrome/Perfetto trace-event JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from simcc.io import write_atomically


# About 100 MB of trace JSON, more than a trace viewer opens comfortably; a 1T-parameter step on
# 512 GPUs records ~4 million events. The timeline keeps the first ones and says it stopped.
MAX_EVENTS = 1_000_000


@dataclass
class Timeline:
    enabled: bool = False
    events: list[tuple[str, str, str, float, float]] = field(default_factory=list)  # track, lane, name, start, dur
    truncated: bool = False  # more events happened than MAX_EVENTS; the first ones are kept

    def add(self, track: str, lane: str, name: str, start: float, duration: float) -> None:
        if self.enabled and duration > 0:
            if len(self.events) >= MAX_EVENTS:
                self.truncated = True
                return
            self.events.append((track, lane, name, start, duration))

    def to_chrome(self) -> dict:
        """Timeline-event format: one process per simulated device or link, one thread per stream."""
        tracks = sorted({t for t, *_ in self.events})
        lanes = sorted({(t, lane) for t, lane, *_ in self.events})
        pid = {t: i + 1 for i, t in enumerate(tracks)}
        tid = {key: i + 1 for i, key in enumerate(lanes)}
        out = [{"ph": "M", "name": "process_name", "pid": pid[t], "args": {"name": t}} for t in tracks]
        out += [{"ph": "M", "name": "thread_name", "pid": pid[t], "tid": tid[(t, lane)], "args": {"name": lane}}
                for t, lane in lanes]
        out += [{"ph": "X", "name": name, "pid": pid[t], "tid": tid[(t, lane)], "ts": start * 1e6, "dur": dur * 1e6}
                for t, lane, name, start, dur in self.events]
        return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_timeline(trace: Timeline, path: Path, option: str = "--trace") -> None:
    write_atomically(path, json.dumps(trace.to_chrome()), option)
