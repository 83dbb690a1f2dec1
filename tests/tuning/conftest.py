"""Every tuning test runs against its own empty cache dir and no shipped configs."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_tuning(tmp_path, monkeypatch):
    import nsa_dsl.tuning as tuning
    import nsa_dsl.tuning.store as store

    cache = tmp_path / "cache"
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(cache))
    monkeypatch.delenv("NSA_DSL_AUTOTUNE", raising=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(store, "SHIPPED_DIR", shipped)
    # Durability (fsync) is not what these tests check, and it dominates their time on slow disks: the
    # Optuna journal fsyncs every log line. Worker processes spawned by a test keep the real fsync.
    import os

    monkeypatch.setattr(os, "fsync", lambda fd: None)
    tuning.clear_memory()
    yield
    tuning.clear_memory()
