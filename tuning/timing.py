"""Timers. A timer is a callable ``timer(candidate) -> milliseconds`` and is injectable everywhere.

``EventTimer`` (GPU): CUDA events around each call, a warm-up, the median of many repeats, and inputs that
rotate between several equal-shaped sets so that no call runs on data another call just left in L2. Each timed
call is queued behind a GPU sleep longer than the host needs to enqueue it, so the events see GPU time even
when launching costs more than running (a decode step: several small launches whose host work exceeds their
GPU time; timed back to back, the events measured the host and picked configs that are slower on the GPU).
``FakeTimer`` (tests / CI): a deterministic function of the config.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Candidate", "Timer", "EventTimer", "WallTimer", "FakeTimer", "default_timer"]


@dataclass
class Candidate:
    """A compiled, gate-checked candidate: ``run(i)`` launches it on input set ``i`` (0 <= i < n_inputs)."""

    config: dict[str, Any]
    run: Callable[[int], Any]
    n_inputs: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


class Timer(Protocol):
    def __call__(self, cand: Candidate) -> float: ...


@dataclass
class EventTimer:
    """Median time (ms) of one call, measured with ``torch.cuda.Event`` pairs.

    ``warmup_ms`` of warm-up calls, then ``rep_ms`` worth of timed calls (clamped to ``min_reps..max_reps``),
    rotating over the candidate's input sets.
    """

    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    min_reps: int = 10
    max_reps: int = 200

    def __call__(self, cand: Candidate) -> float:
        import time

        import torch

        n = max(1, cand.n_inputs)
        cand.run(0)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        for i in range(5):
            cand.run(i % n)
        e.record()
        host_ms = (time.perf_counter() - t0) * 1e3 / 5  # enqueue time of one call
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 5, 1e-3)
        for i in range(max(1, int(self.warmup_ms / est))):
            cand.run(i % n)
        reps = int(min(self.max_reps, max(self.min_reps, self.rep_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        # the GPU sleeps while the host enqueues the next call, so a call's launches are all queued before
        # its start event runs: the events measure GPU time, not the host's launch rate
        sleep = int(_cycles_per_ms() * (1.5 * host_ms + 0.02))
        torch.cuda.synchronize()
        for i in range(reps):
            torch.cuda._sleep(sleep)
            starts[i].record()
            cand.run(i % n)
            ends[i].record()
        torch.cuda.synchronize()
        return float(statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)))


_CYCLES_PER_MS: dict[int, float] = {}


def _cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` on the current device (measured once)."""
    import torch

    dev = torch.cuda.current_device()
    if dev not in _CYCLES_PER_MS:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm-up
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS[dev] = cycles / max(s.elapsed_time(e), 1e-3)
    return _CYCLES_PER_MS[dev]


@dataclass
class FakeTimer:
    """Deterministic timer for tests: ``fn(config) -> ms``; counts its calls. ``fn`` should be a module-level
    function so that the timer can be sent to worker processes."""

    fn: Callable[[dict[str, Any]], float]
    calls: int = 0

    def __call__(self, cand: Candidate) -> float:
        self.calls += 1
        cand.run(0)
        return float(self.fn(cand.config))


@dataclass
class WallTimer:
    """Median wall-clock time (ms) of ``reps`` calls after ``warmup`` calls (CPU / interpreter fallback)."""

    warmup: int = 1
    reps: int = 3

    def __call__(self, cand: Candidate) -> float:
        import time

        n = max(1, cand.n_inputs)
        for i in range(self.warmup):
            cand.run(i % n)
        ts = []
        for i in range(self.reps):
            t0 = time.perf_counter()
            cand.run(i % n)
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(ts))


def default_timer() -> Timer:
    """``EventTimer`` on a CUDA device, else ``WallTimer``."""
    import os

    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return EventTimer()
    return WallTimer()
