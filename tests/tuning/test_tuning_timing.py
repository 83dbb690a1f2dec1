"""The GPU timer measures GPU time, also for candidates whose launches cost the host more than they run."""

from __future__ import annotations

import time

import pytest
import torch
from nsa_dsl.tuning.timing import Candidate, EventTimer


@pytest.mark.gpu
def test_event_timer_ignores_host_launch_cost():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(1 << 20, device="cuda")

    def gpu_only(i: int) -> None:
        x.mul_(1.0)

    def host_heavy(i: int) -> None:  # the same kernel behind 2 ms of host work (like a multi-launch step)
        time.sleep(0.002)
        x.mul_(1.0)

    timer = EventTimer(warmup_ms=2.0, rep_ms=10.0, min_reps=5, max_reps=20)
    fast = timer(Candidate(config={}, run=gpu_only))
    slow_host = timer(Candidate(config={}, run=host_heavy))
    # back-to-back events would report >= 2 ms for host_heavy; the GPU work is the same few microseconds
    assert slow_host < 0.5, (fast, slow_host)
    assert slow_host < 5 * fast + 0.05, (fast, slow_host)
