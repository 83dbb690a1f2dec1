"""nsa_dsl.codegen: spec -> kernel plan -> rendered Triton source -> cached, imported module -> ``NSAOps``.

* ``plan``: ``DeviceLimits``, ``KernelDef`` registry (``register``), ``make_plan``, ``KernelPlan.key``;
* ``render``: jinja2 templates in ``codegen/templates`` -> source with a header (spec, config, version);
* ``loader``: content-addressed file cache + import (``cache_dir()``, ``load(plan)``);
* ``ops``: ``compile(spec) -> NSAOps`` (``forward``, ``forward_train``, stage entry points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import GENERATOR_VERSION, KERNELS, DeviceLimits, KernelDef, KernelPlan, make_plan, register

__all__ = [
    "GENERATOR_VERSION",
    "KERNELS",
    "DeviceLimits",
    "KernelDef",
    "KernelPlan",
    "make_plan",
    "register",
    "emit_to_dir",
    "emit_plans",
]


def emit_plans(
    spec: Any,
    config: dict[str, dict[str, Any]] | None = None,
    limits: DeviceLimits | None = None,
    passes: tuple[str, ...] = ("fwd", "bwd", "decode"),
) -> list[KernelPlan]:
    """One plan per registered kernel that ``spec`` needs (config: kernel -> params overrides)."""
    from .plan import all_kernels

    config = config or {}
    limits = limits or DeviceLimits.detect()
    plans = []
    for name, kdef in sorted(all_kernels().items()):
        if kdef.pass_ in passes and kdef.is_enabled(spec):
            plans.append(make_plan(spec, name, config.get(name), limits))
    return plans


def emit_to_dir(spec: Any, outdir: str | Path, config: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """Render every kernel ``spec`` needs into ``outdir`` as ``{kernel}_{key}.py``; returns the paths.

    ``spec``: an ``NSASpec``, a built-in spec name or a YAML path. Unchanged files are not rewritten.
    """
    from ..spec import NSASpec, load_spec
    from .loader import kernel_path, write_source
    from .render import render

    if not isinstance(spec, NSASpec):
        spec = load_spec(spec)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plan in emit_plans(spec, config):
        path = kernel_path(plan, out)
        if not path.is_file():
            write_source(path, render(plan))
        paths.append(path)
    return paths
