"""nsa-dsl: a compiler for DeepSeek's Native Sparse Attention (arXiv 2502.11089).

Entry points: ``load_spec`` / ``NSASpec`` (the spec), ``compile(spec) -> NSAOps`` (the generated, tuned
kernels: ``forward``, ``decode``), ``NSAttention`` (the ``nn.Module``), ``NSACache`` (decoding),
``cost_model`` (sympy costs), ``compress`` / ``Compressor`` (the compression functions).

Pipeline: spec (``nsa_dsl.spec``) -> derived quantities (``nsa_dsl.derived``) -> kernel plan
(``nsa_dsl.codegen.plan``) -> emitted Triton source (``nsa_dsl.codegen``) -> loaded op (``nsa_dsl.compile``)
-> tuned config (``nsa_dsl.tuning``). Ground truth: ``nsa_dsl.reference``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .spec import (
    AttentionSpec,
    CompressionSpec,
    GateSpec,
    NSASpec,
    SelectionSpec,
    SpecError,
    WindowSpec,
    list_builtin_specs,
    load_spec,
)

logging.getLogger("nsa_dsl").addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "AttentionSpec",
    "CompressionSpec",
    "GateSpec",
    "NSASpec",
    "SelectionSpec",
    "SpecError",
    "WindowSpec",
    "list_builtin_specs",
    "load_spec",
    # lazy (imported on first use, see _LAZY)
    "compile",
    "cost_model",
    "compress",
    "Compressor",
    "NSAttention",
    "NSACache",
]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .cache import NSACache
    from .codegen.ops import compile  # noqa: A004
    from .compression import Compressor, compress
    from .cost import cost_model
    from .layer import NSAttention

# Heavier pieces are imported lazily so that `import nsa_dsl` stays cheap and a broken optional part
# never prevents loading a spec.
_LAZY = {
    "compress": ("nsa_dsl.compression", "compress"),
    "Compressor": ("nsa_dsl.compression", "Compressor"),
    "NSAttention": ("nsa_dsl.layer", "NSAttention"),
    "cost_model": ("nsa_dsl.cost", "cost_model"),
    "compile": ("nsa_dsl.codegen.ops", "compile"),
    "NSACache": ("nsa_dsl.cache", "NSACache"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'nsa_dsl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
