"""Fakes for tests and demos of the tuner without a GPU: a kernel definition, a target and a time landscape.

All are module-level and picklable, so they also travel to worker processes (``--workers`` tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .timing import Candidate

__all__ = [
    "FakeKernelDef",
    "FakeTarget",
    "fake_time",
    "flat_time",
    "fake_registry",
    "fake_target_factory",
    "slow_fake_target_factory",
    "write_records_worker",
]


@dataclass(frozen=True)
class FakeKernelDef:
    """A kernel-definition look-alike with tiles, warps, stages and a schedule variant."""

    name: str = "fake_fwd"
    pass_: str = "fwd"
    template: str = "fake.py.j2"

    def space(self, spec: Any, limits: Any) -> dict[str, list[Any]]:
        return {
            "BLOCK_M": [16, 32, 64, 128],
            "BLOCK_N": [16, 32, 64],
            "num_warps": [2, 4, 8],
            "num_stages": [1, 2, 3],
            "schedule": ["group", "kv_outer"],
        }

    def check(self, spec: Any, config: dict[str, Any], limits: Any) -> str | None:
        if config["BLOCK_M"] * config["BLOCK_N"] > 4096:
            return f"BLOCK_M*BLOCK_N: must be <= 4096, got {config['BLOCK_M'] * config['BLOCK_N']}"
        return None

    def default(self, spec: Any, limits: Any) -> dict[str, Any]:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "schedule": "group"}


def fake_registry() -> dict[str, Any]:
    return {"fake_fwd": FakeKernelDef()}


def fake_time(cfg: dict[str, Any]) -> float:
    """A deterministic, structured landscape (ms): best near BLOCK_M=64, BLOCK_N=32, 4 warps, 3 stages,
    kv_outer schedule."""
    t = 1.0
    t += 0.15 * abs(math.log2(cfg["BLOCK_M"]) - 6) + 0.1 * abs(math.log2(cfg["BLOCK_N"]) - 5)
    t += 0.2 * abs(math.log2(cfg["num_warps"]) - 2) + 0.05 * abs(cfg["num_stages"] - 3)
    t += 0.0 if cfg["schedule"] == "kv_outer" else 0.12
    return t


def flat_time(cfg: dict[str, Any]) -> float:
    """Every config equally fast (for tie-breaking tests)."""
    return 1.0


class FakeTarget:
    """Builds nothing; ``fail`` configs raise at build (compile failure), ``wrong`` configs fail the gate."""

    def __init__(self, fail: Any = None, wrong: Any = None, delay: float = 0.0):
        self.fail = fail or _default_fail
        self.wrong = wrong or _never
        self.delay = delay
        self.built = 0

    def build(self, config: dict[str, Any]) -> Any:
        if self.delay:
            import time

            time.sleep(self.delay)
        if self.fail(config):
            raise RuntimeError("out of resources: shared memory, Required: 300000, Hardware limit: 232448")
        self.built += 1
        return dict(config)

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        return "o: output differs from the reference" if self.wrong(config) else None

    def candidate(self, built: Any, config: dict[str, Any]) -> Candidate:
        return Candidate(config=config, run=lambda i: None, n_inputs=1)


def fake_target_factory(
    spec: Any,
    kernel: str,
    *,
    T: int,
    B: int = 1,
    limits: Any = None,  # noqa: N803
    device: Any = None,
) -> FakeTarget:
    return FakeTarget()


def _default_fail(c: dict[str, Any]) -> bool:
    return c["BLOCK_M"] == 16 and c["num_warps"] == 8


def _never(c: dict[str, Any]) -> bool:
    return False


def slow_fake_target_factory(
    spec: Any,
    kernel: str,
    *,
    T: int,
    B: int = 1,
    limits: Any = None,  # noqa: N803
    device: Any = None,
) -> FakeTarget:
    """Like ``fake_target_factory`` but every build takes 50 ms (so that parallel workers overlap)."""
    return FakeTarget(delay=0.05)


def write_records_worker(path: str, rank: int, n: int) -> None:
    """Write ``n`` records (one at a time) into the record file ``path`` (concurrent-writer tests)."""
    from .store import RecordStore

    st = RecordStore(path)
    for i in range(n):
        fields = {
            "gpu": "fake",
            "capability": "9.0",
            "sm_count": 1,
            "triton": "x",
            "torch": "y",
            "generator": "z",
            "spec_hash": f"w{rank}",
            "kernel": "fake_fwd",
            "T_bucket": 1 << i,
            "B_bucket": 1,
        }
        st.put({"fields": fields, "config": {"rank": rank, "i": i}, "time_ms": float(i)})


def tune_in_process(journal: str, cache_dir: str, out: str, seed: int) -> None:
    """Tune the fake kernel against ``journal`` with a near-flat landscape and write the chosen config's
    canonical JSON to ``out`` (cross-process determinism tests)."""
    import os

    os.environ["NSA_DSL_CACHE_DIR"] = cache_dir
    from nsa_dsl import load_spec

    from . import tune_kernel
    from .keys import canonical
    from .timing import FakeTimer

    class _Lim:
        name, capability, sm_count, smem_per_block, interpreter = "fake-gpu", (9, 0), 132, 1 << 30, False

    res = tune_kernel(
        load_spec("tiny"),
        "fake_fwd",
        T=1000,
        limits=_Lim(),
        trials=30,
        seed=seed,
        timer=FakeTimer(near_flat_time),
        target=FakeTarget(),
        registry=fake_registry(),
        storage_path=journal,
        save=False,
        confirm=0,
    )
    with open(out, "w") as f:
        f.write(canonical(res.config))


def near_flat_time(cfg: dict[str, Any]) -> float:
    """Differences of at most 1% (measurement noise): every config ties."""
    return 1.0 + 0.0005 * (cfg["num_stages"] + cfg["num_warps"] / 4)
