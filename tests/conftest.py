"""Shared pytest set-up.

* Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` is set here, before
  any test module imports triton (an explicit setting in the environment wins).
* Tests marked ``@pytest.mark.gpu`` are skipped when no CUDA device is present.
"""

from __future__ import annotations

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


HAS_CUDA = _cuda_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
