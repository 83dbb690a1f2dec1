"""Loading (pipeline step 5): rendered source -> a content-addressed file -> an imported module.

Files go to ``cache_dir() / "kernels" / f"{kernel}_{key}.py"``. The key hashes spec, kernel, config, generator
version and template text, so a file's name fixes its content: a cache hit neither rewrites the file nor
re-imports the module (an in-memory dict answers first). Writes are atomic (temp file + ``os.replace``)
under a ``filelock`` so concurrent processes never see half a file; files get the usual 0666-minus-umask mode.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from filelock import FileLock

from .plan import KernelPlan

__all__ = [
    "cache_dir",
    "kernel_path",
    "write_source",
    "load",
    "load_path",
    "clear_memory_cache",
    "current_umask",
    "STATS",
]

log = logging.getLogger("nsa_dsl.codegen.loader")

_MODULES: dict[str, ModuleType] = {}
#: Counters (for tests and logs): files written, modules imported, in-memory hits.
STATS = {"writes": 0, "imports": 0, "memory_hits": 0}


def cache_dir() -> Path:
    """``$NSA_DSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsa_dsl``, else ``~/.cache/nsa_dsl`` (created)."""
    env = os.environ.get("NSA_DSL_CACHE_DIR")
    if env:
        p = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nsa_dsl"
    p.mkdir(parents=True, exist_ok=True)
    return p


def kernel_path(plan: KernelPlan, root: Path | None = None) -> Path:
    root = root if root is not None else cache_dir() / "kernels"
    return Path(root) / f"{plan.kernel}_{plan.key}.py"


def write_source(path: Path, source: str) -> bool:
    """Write ``source`` to ``path`` atomically unless an identical file is there. Returns True if written.

    The file gets the mode a plain ``open(path, "w")`` would give it (0666 minus the umask, e.g. 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == source:
        return False
    with FileLock(str(_lock_path(path))):
        if path.is_file() and path.read_text() == source:
            return False
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
        try:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the mode open() would (respects the umask)
                os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    STATS["writes"] += 1
    log.debug("wrote %s", path)
    return True


def current_umask() -> int:
    """The process umask, read without changing it where possible (``/proc/self/status`` on Linux; else
    the set-and-restore idiom)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock_path(path: Path) -> Path:
    """Lock files live in ``cache_dir()/locks`` (named by a hash of the target path), so directories written
    by ``emit_to_dir`` contain only the kernels."""
    import hashlib

    h = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    d = cache_dir() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{h}.lock"


def load_path(path: Path, module_name: str) -> ModuleType:
    """Import a generated file by path (registered in ``sys.modules`` so Triton can find its source)."""
    spec = importlib.util.spec_from_file_location(module_name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"path: cannot import generated module from {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    STATS["imports"] += 1
    return mod


def load(plan: KernelPlan) -> ModuleType:
    """The imported module for ``plan`` (render + write + import on a miss; nothing on a hit)."""
    key = plan.key
    mod = _MODULES.get(key)
    if mod is not None:
        STATS["memory_hits"] += 1
        return mod
    path = kernel_path(plan)
    if not path.is_file():
        from .render import render

        write_source(path, render(plan))
    mod = load_path(path, f"nsa_dsl_gen_{plan.kernel}_{key}")
    _MODULES[key] = mod
    log.info("loaded %s (%s) from %s", plan.kernel, key, path)
    return mod


def clear_memory_cache() -> None:
    """Forget imported modules (the next ``load`` re-imports from the file cache; for tests)."""
    _MODULES.clear()
