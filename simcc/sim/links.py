"""A link shared by concurrent flows: bandwidth is split evenly between the flows in progress
(processor sharing), not granted to whole messages first-come-first-served.

A flow's work is its contention-free duration from the cost model; with n flows in progress each
advances at 1/n of full speed. Driven by callbacks rather than a process per flow, so a busy link
costs one pending timeout, whatever its flow count.
"""

from __future__ import annotations

import simpy

EPSILON = 1e-12


class FairShareLink:
    def __init__(self, env: simpy.Environment, name: str) -> None:
        self.env = env
        self.name = name
        self._flows: dict[simpy.Event, float] = {}  # completion event -> remaining work (s)
        self._last = env.now
        self._generation = 0
        self.busy_seconds = 0.0

    @property
    def active(self) -> int:
        return len(self._flows)

    def transfer(self, work_seconds: float) -> simpy.Event:
        """An event that fires when `work_seconds` of full-speed transfer have been served."""
        done = self.env.event()
        if work_seconds <= 0:
            done.succeed()
            return done
        self._advance()
        self._flows[done] = work_seconds
        self._schedule_next()
        return done

    def _advance(self) -> None:
        elapsed = self.env.now - self._last
        self._last = self.env.now
        if elapsed <= 0 or not self._flows:
            return
        self.busy_seconds += elapsed
        share = elapsed / len(self._flows)
        for flow in self._flows:
            self._flows[flow] -= share

    def _schedule_next(self) -> None:
        self._generation += 1
        if not self._flows:
            return
        soonest = min(self._flows.values()) * len(self._flows)
        generation = self._generation
        timer = self.env.timeout(max(soonest, 0.0))
        timer.callbacks.append(lambda _event: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:
            return  # a newer flow arrived and rescheduled
        self._advance()
        finished = [flow for flow, left in self._flows.items() if left <= EPSILON * max(1.0, self.env.now)]
        for flow in finished:
            del self._flows[flow]
            flow.succeed()
        self._schedule_next()
