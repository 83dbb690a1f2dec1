"""Thin access to the code generator's names (``nsa_dsl.codegen``), with fallbacks.

The tuner is written against the codegen contract (``KERNELS``, ``KernelDef``, ``DeviceLimits``,
``GENERATOR_VERSION``, ``loader.cache_dir``). Everything goes through this module so that tests can run with a
fake registry and the tuner keeps working while parts of the generator are still missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "cache_root",
    "tuning_dir",
    "generator_version",
    "get_registry",
    "get_kernel_def",
    "detect_limits",
    "limits_fields",
]


def cache_root() -> Path:
    """The nsa_dsl cache directory: ``nsa_dsl.codegen.loader.cache_dir()`` when available, else the same rule:
    ``$NSA_DSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsa_dsl``, else ``~/.cache/nsa_dsl``."""
    try:
        from nsa_dsl.codegen.loader import cache_dir  # type: ignore[import-not-found]

        return Path(cache_dir())
    except ImportError:
        pass
    env = os.environ.get("NSA_DSL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nsa_dsl"


def tuning_dir() -> Path:
    """``<cache_root>/tuning``: tuning records and Optuna study journals live here."""
    return cache_root() / "tuning"


def generator_version() -> str:
    """``nsa_dsl.codegen.plan.GENERATOR_VERSION`` (the package version while codegen is absent)."""
    try:
        from nsa_dsl.codegen.plan import GENERATOR_VERSION  # type: ignore[import-not-found]

        return str(GENERATOR_VERSION)
    except ImportError:
        from nsa_dsl import __version__

        return f"nsa_dsl-{__version__}+nogen"


def get_registry() -> dict[str, Any]:
    """The codegen kernel registry ``KERNELS`` (name -> KernelDef), or ``{}`` if codegen is not importable."""
    try:
        from nsa_dsl.codegen.plan import all_kernels  # type: ignore[import-not-found]
    except ImportError:
        return {}
    return all_kernels()


def get_kernel_def(kernel: str, registry: dict[str, Any] | None = None) -> Any:
    """The KernelDef for ``kernel``; ``KeyError`` with a one-line message if it is not registered."""
    if registry is None:
        reg = get_registry()
        if kernel.startswith("schedule."):
            from .schedules import schedule_defs

            reg = {**reg, **schedule_defs()}
    else:
        reg = registry
    if kernel not in reg:
        known = ", ".join(sorted(reg)) or "none"
        raise KeyError(f"kernel: '{kernel}' is not registered in nsa_dsl.codegen (registered: {known})")
    return reg[kernel]


class _FallbackLimits:
    """Stand-in for ``DeviceLimits`` when codegen is absent (tests without the generator)."""

    def __init__(self, name: str, capability: tuple[int, int], sm_count: int, smem_per_block: int):
        self.name = name
        self.capability = capability
        self.sm_count = sm_count
        self.smem_per_block = smem_per_block


def detect_limits(device: Any = None) -> Any:
    """``DeviceLimits.detect(device)`` from codegen, else a minimal equivalent."""
    try:
        from nsa_dsl.codegen.plan import DeviceLimits  # type: ignore[import-not-found]

        return DeviceLimits.detect(device)
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        idx = torch.device(device or "cuda").index or 0
        p = torch.cuda.get_device_properties(idx)
        smem = getattr(p, "shared_memory_per_block_optin", 0) or 49152
        return _FallbackLimits(p.name, (p.major, p.minor), p.multi_processor_count, int(smem))
    return _FallbackLimits("interpreter", (0, 0), 1, 1 << 30)


def limits_fields(limits: Any) -> dict[str, Any]:
    """The device identity used in cache keys: GPU name, compute capability ("9.0"), SM count."""
    cap = getattr(limits, "capability", (0, 0))
    if isinstance(cap, (tuple, list)):
        cap_s = ".".join(str(int(c)) for c in cap)
    else:
        cap_s = str(cap)
    return {
        "gpu": str(getattr(limits, "name", "unknown")),
        "capability": cap_s,
        "sm_count": int(getattr(limits, "sm_count", 0) or 0),
    }
