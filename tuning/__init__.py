"""nsa_dsl.tuning: the autotuner (pipeline step 6) — Optuna search over generated kernels, per-GPU cache.

Lookup order for a kernel's config (``lookup``): in-memory -> the user's cache
(``<cache_root>/tuning/records.json``; ``NSA_DSL_CACHE_DIR`` overrides the root) -> configs shipped in the
package (``nsa_dsl/tuning/configs/*.json``) -> None, in which case the caller uses the kernel's deterministic
per-architecture default (``KernelDef.default``). Nothing is tuned implicitly unless
``NSA_DSL_AUTOTUNE=1`` (then a missing record is tuned on first lookup) or the caller asks
(``nsa_dsl.compile(spec, tune=True)`` -> ``tune_kernel``).

Records are keyed by GPU name, compute capability, SM count, triton/torch/generator versions, spec hash,
kernel and shape bucket (T and B rounded up to powers of two); see ``keys``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from typing import Any

from .keys import bucket, canonical, key_fields, record_key

__all__ = [
    "lookup",
    "tune_kernel",
    "tune",
    "TuneResult",
    "autotune_enabled",
    "clear_memory",
    "export_records",
    "import_records",
    "bucket",
    "key_fields",
    "record_key",
    "canonical",
]

log = logging.getLogger("nsa_dsl.tuning")

_MEMORY: dict[str, dict[str, Any]] = {}
_MEM_LOCK = threading.Lock()
_TUNING: contextvars.ContextVar[bool] = contextvars.ContextVar("nsa_dsl_tuning_active", default=False)


def _memory_put(key: str, config: dict[str, Any]) -> None:
    with _MEM_LOCK:
        _MEMORY[key] = dict(config)


def clear_memory() -> None:
    """Forget the in-memory tier (the next lookup reads the files again)."""
    with _MEM_LOCK:
        _MEMORY.clear()


def autotune_enabled() -> bool:
    """True when ``NSA_DSL_AUTOTUNE=1`` (tune missing records on lookup)."""
    return os.environ.get("NSA_DSL_AUTOTUNE", "").strip().lower() in ("1", "true", "yes", "on")


def _usable(
    cfg: dict[str, Any], kdef: Any, spec: Any, limits: Any, where: str, tuned_default: Any = None
) -> dict[str, Any] | None:
    """``cfg`` merged over the kernel's default if the current generator accepts it (known parameters,
    ``KernelDef.check`` under the current limits) and the kernel's default is still the one the record was
    tuned against (``tuned_default``, when the record has it: a changed default means the kernel changed, and
    a pinned old winner must not hide the new default), else None (logged). Without a KernelDef: ``cfg``."""
    if kdef is None:
        return dict(cfg)
    try:
        default = dict(kdef.default(spec, limits))
        known = set(default) | set(kdef.space(spec, limits))
        unknown = sorted(set(cfg) - known)
        full = {**default, **cfg}
        if unknown:
            why = f"unknown parameters {unknown}"
        elif isinstance(tuned_default, dict) and tuned_default != default:
            why = "the kernel's default config changed since this record was tuned"
        else:
            why = kdef.check(spec, full, limits)
    except Exception as e:  # a stale record must never break a lookup
        why = f"{type(e).__name__}: {e}"
    if why:
        log.info("%s config for %s ignored: %s", where, getattr(kdef, "name", "?"), why)
        return None
    return full


def _shipped_match(fields: dict[str, Any], kdef: Any, spec: Any, limits: Any) -> dict[str, Any] | None:
    """Best usable shipped record for ``fields``: same spec hash, kernel and batch bucket; the same GPU
    name (else the same compute capability); the nearest T bucket (ties -> the smaller). Software versions
    are not compared (shipped configs are data, re-validated by ``_usable`` under the current limits)."""
    import math

    from .store import shipped_records

    ranked: list[tuple[tuple[int, float, int, str], dict[str, Any]]] = []
    for key, rec in shipped_records().items():
        f = rec["fields"]
        if (f.get("spec_hash"), f.get("kernel"), f.get("B_bucket")) != (
            fields["spec_hash"],
            fields["kernel"],
            fields["B_bucket"],
        ):
            continue
        if f.get("capability") != fields["capability"]:
            continue
        same_gpu = f.get("gpu") == fields["gpu"]
        tb = int(f.get("T_bucket", 1))
        dist = abs(math.log2(tb) - math.log2(fields["T_bucket"]))
        ranked.append(((0 if same_gpu else 1, dist, tb, key), rec))
    for _, rec in sorted(ranked, key=lambda x: x[0]):
        cfg = _usable(rec["config"], kdef, spec, limits, "shipped", rec.get("default_config"))
        if cfg is not None:
            return cfg
    return None


def lookup(
    spec: Any,
    kernel: str,
    *,
    T: int,  # noqa: N803
    B: int = 1,  # noqa: N803
    limits: Any = None,
    registry: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The tuned config of ``kernel`` for ``spec`` at shape (T, B) on this device, or None (use the default).

    Order: memory -> user cache -> shipped configs -> (tune now, only if ``NSA_DSL_AUTOTUNE=1``) -> None.
    Never raises for cache problems (corrupt files are reported in the log and ignored).
    """
    from ._compat import detect_limits, get_registry
    from .store import user_store

    if limits is None:
        limits = detect_limits()
    fields = key_fields(spec, kernel, T=T, B=B, limits=limits)
    key = record_key(fields)
    with _MEM_LOCK:
        hit = _MEMORY.get(key)
    if hit is not None:
        return dict(hit)
    try:
        rec = user_store().get(key, fields)
    except Exception as e:  # unreadable cache dir etc.: never fatal
        log.warning("tuning cache lookup failed (%s); ignoring the user cache", e)
        rec = None
    if registry is None:
        reg = get_registry()
        if kernel.startswith("schedule."):
            from .schedules import schedule_defs

            reg = {**reg, **schedule_defs()}
    else:
        reg = registry
    if rec is not None:
        cfg = _usable(rec["config"], reg.get(kernel), spec, limits, "cached", rec.get("default_config"))
        if cfg is not None:
            _memory_put(key, cfg)
            return cfg
    cfg = _shipped_match(fields, reg.get(kernel), spec, limits)
    if cfg is not None:
        _memory_put(key, cfg)
        return dict(cfg)
    if autotune_enabled() and not _TUNING.get() and kernel in reg:
        log.info("NSA_DSL_AUTOTUNE=1: tuning %s at T=%d B=%d", kernel, T, B)
        try:
            return dict(tune_kernel(spec, kernel, T=T, B=B, limits=limits, registry=registry).config)
        except Exception as e:
            log.warning("autotuning %s failed (%s); using the default config", kernel, e)
    return None


def tune_kernel(spec: Any, kernel: str, *, T: int, B: int = 1, **kwargs: Any) -> Any:  # noqa: N803
    """Tune one kernel at one shape (see ``search.tune_kernel`` for the options); returns a ``TuneResult``.
    Lookups made while tuning never trigger tuning themselves."""
    from .search import tune_kernel as _tune

    tok = _TUNING.set(True)
    try:
        return _tune(spec, kernel, T=T, B=B, **kwargs)
    finally:
        _TUNING.reset(tok)


def tune(
    spec: Any,
    *,
    kernels: list[str] | None = None,
    seq_lens: tuple[int, ...] | list[int] = (8192,),
    B: int = 1,  # noqa: N803
    **kwargs: Any,
) -> list[Any]:
    """Tune several kernels (default: every registered forward kernel this spec uses) at several sequence
    lengths; kernels without a tuning target are skipped (logged). Used by ``nsa_dsl.compile(spec,
    tune=True)``. Returns the ``TuneResult`` list."""
    from ._compat import get_registry
    from .targets import NoTarget

    reg = kwargs.get("registry") or get_registry()
    if kernels is None:
        kernels = sorted(k for k, d in reg.items() if getattr(d, "pass_", "fwd") == "fwd")
    out = []
    for t in seq_lens:
        for k in kernels:
            d = reg.get(k)
            enabled = getattr(d, "is_enabled", None)
            if callable(enabled) and not enabled(spec):
                continue
            try:
                out.append(tune_kernel(spec, k, T=t, B=B, **kwargs))
            except NoTarget as e:
                log.info("%s; skipped", e)
    return out


def __getattr__(name: str) -> Any:
    if name == "TuneResult":
        from .search import TuneResult

        return TuneResult
    raise AttributeError(f"module 'nsa_dsl.tuning' has no attribute {name!r}")


def export_records(path: str | os.PathLike[str]) -> int:
    """Write every record of the user cache to ``path`` (same file format); returns how many."""
    from .store import RecordStore, user_store

    recs = user_store().load()
    out = RecordStore(path)
    if os.path.exists(path):
        os.unlink(path)
    out.put_many(recs.values())
    return len(recs)


def import_records(path: str | os.PathLike[str]) -> int:
    """Merge the records of ``path`` into the user cache (same key = replaced); returns how many."""
    from pathlib import Path

    from .store import _parse, user_store

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"import: cannot read {path}: {e.strerror or e}") from None
    recs = _parse(text, str(p))
    if recs is None:
        raise ValueError(f"import: {path} is not a tuning-records file (corrupt or another format)")
    n = user_store().put_many(recs.values())
    clear_memory()
    return n
