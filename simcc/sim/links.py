"""A link shared by concurrent flows: bandwidth is split evenly between the flows in progress
(processor sharing), not granted to whole messages first-come-first-served.

A flow's work is its contention-free duration from the cost model; with n flows in progress each
advances at 1/n of full speed. Driven by callbacks rather than a process per flow, so a busy link
costs one pending timeout, whatever its flow count.

Only simpy's public API is used (events, `succeed()`, timeouts, callback lists), so any simpy >= 4
runs it. The price: `succeed()` queues a finished flow at the current instant, one more trip
through the event heap per transfer than firing it inside the timer step (which needs simpy's
private fields): about a third more heap steps in a training run, 2-7% more simulation time, lost
in the noise of a whole estimate. The timeline is the same: the waiters run at the same instant,
and the link reschedules once, after them, as it did inside the timer step.
"""

from __future__ import annotations

import simpy

EPSILON = 1e-12


class Flow(simpy.Event):
    """A transfer in progress; fires when its work has been served."""

    def __init__(self, env: simpy.Environment, work_seconds: float) -> None:
        super().__init__(env)
        self.left = work_seconds


class FairShareLink:
    """One link's flows and the single timer for the soonest of them to finish."""

    def __init__(self, env: simpy.Environment, name: str) -> None:
        self.env = env
        self.name = name
        self._flows: list[Flow] = []
        self._last = env.now
        self._generation = 0
        self._finishing = False  # finished flows queued: new flows wait for the one reschedule after them

    @property
    def active(self) -> int:
        return len(self._flows)

    def transfer(self, work_seconds: float) -> simpy.Event:
        """An event that fires when `work_seconds` of full-speed transfer have been served."""
        if work_seconds <= 0:
            return self.env.event().succeed()
        self._advance()
        flow = Flow(self.env, work_seconds)
        self._flows.append(flow)
        if not self._finishing:
            self._schedule_next()
        return flow

    def _advance(self) -> None:
        now = self.env.now
        elapsed = now - self._last
        self._last = now
        flows = self._flows
        if elapsed <= 0 or not flows:
            return
        share = elapsed / len(flows)
        for flow in flows:
            flow.left -= share

    def _schedule_next(self, _: simpy.Event | None = None) -> None:
        """Time the next finish; also the callback that ends a batch of finishes."""
        self._finishing = False
        self._generation += 1
        flows = self._flows
        if not flows:
            return
        soonest = flows[0].left if len(flows) == 1 else min(flow.left for flow in flows) * len(flows)
        timer = self.env.timeout(max(soonest, 0.0), self._generation)
        timer.callbacks.append(self._on_timer)

    def _on_timer(self, timer: simpy.Event) -> None:
        if timer.value != self._generation:
            return  # a newer flow arrived and rescheduled
        self._advance()
        tolerance = EPSILON * max(1.0, self.env.now)
        if len(self._flows) == 1 and self._flows[0].left <= tolerance:  # the common case: a lone flow
            finished, self._flows = self._flows, []
        else:
            finished = [flow for flow in self._flows if flow.left <= tolerance]
            self._flows = [flow for flow in self._flows if flow.left > tolerance]
        if not finished:
            self._schedule_next()
            return
        for flow in finished:
            flow.succeed()
        # Reschedule once, after the waiters of the last finished flow have run (they often start
        # the next flow at this same instant), rather than once per flow they start.
        self._finishing = True
        finished[-1].callbacks.append(self._schedule_next)
