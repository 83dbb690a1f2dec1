"""Kernel plans (pipeline step 3): validated spec + kernel name + tile/schedule config -> ``KernelPlan``.

A plan is pure data: the spec, which kernel, its compile-time constants derived from the spec (block sizes,
stride, overlap weights, n, w, G, head dims, scale, dtype) and its tile/schedule config. ``render`` turns a
plan into Triton source, ``loader.load`` imports it. The tuner drives the same path with other configs.

Kernels are registered with ``register(KernelDef(...))``. Each family lives in its own module
``nsa_dsl.codegen.kernels_<family>`` (found and imported automatically), so adding a kernel is one
self-contained block in one file:

    register(KernelDef(name="slc_fwd", template="slc_fwd.py.j2", pass_="fwd",
                       space=..., check=..., default=...))

Emitted-module convention: every template defines module constants ``KERNEL``, ``KEY``, ``SPEC_HASH``,
``CONFIG`` and a Python launcher ``run(...)`` whose signature is the stage's (e.g. ``cmp_fwd``:
``run(q, k_cmp, v_cmp, cu_seqlens=None, cu_cmp=None) -> (o_cmp, lse_cmp)``); ``NSAOps`` calls ``run``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import Any

from .._version import __version__
from ..derived import derive
from ..spec import NSASpec

__all__ = [
    "GENERATOR_VERSION",
    "TEMPLATE_DIR",
    "DeviceLimits",
    "KernelDef",
    "KernelPlan",
    "KERNELS",
    "register",
    "get_kernel",
    "make_plan",
    "spec_constants",
    "split_dim",
    "next_pow2",
]

log = logging.getLogger("nsa_dsl.codegen.plan")

#: Bumped whenever the generator's output changes for an unchanged spec/config/template (part of every key).
GENERATOR_VERSION = f"nsa_dsl-{__version__}/codegen-1"

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


# ------------------------------------------------------------------------------------------------
# device limits
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLimits:
    """What a kernel config must fit in. ``arch`` names the default-config family ("sm90", "interpreter").

    ``smem_per_block``: bytes of shared memory one program may use; ``max_num_warps``: per program;
    ``interpreter``: True for the CPU Triton interpreter (tiny tiles, no smem limit that matters).
    """

    name: str
    capability: tuple[int, int]
    sm_count: int
    smem_per_block: int
    max_num_warps: int = 32
    registers_per_sm: int = 65536
    interpreter: bool = False

    @property
    def arch(self) -> str:
        if self.interpreter:
            return "interpreter"
        return f"sm{self.capability[0]}{self.capability[1]}"

    @classmethod
    def interpreter_limits(cls) -> DeviceLimits:
        return cls(
            name="triton-interpreter (CPU)",
            capability=(0, 0),
            sm_count=1,
            smem_per_block=1 << 30,
            interpreter=True,
        )

    @classmethod
    def detect(cls, device: Any = None) -> DeviceLimits:
        """The limits of ``device`` (default: the current CUDA device), or the interpreter entry on CPU."""
        import os

        import torch

        dev = torch.device(device) if device is not None else None
        if (
            os.environ.get("TRITON_INTERPRET") == "1"
            or not torch.cuda.is_available()
            or (dev is not None and dev.type != "cuda")
        ):
            return cls.interpreter_limits()
        idx = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        return _detect_cuda(idx)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capability": list(self.capability),
            "sm_count": self.sm_count,
            "smem_per_block": self.smem_per_block,
            "max_num_warps": self.max_num_warps,
            "registers_per_sm": self.registers_per_sm,
            "interpreter": self.interpreter,
        }


@lru_cache(maxsize=16)
def _detect_cuda(idx: int) -> DeviceLimits:
    import torch

    p = torch.cuda.get_device_properties(idx)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or getattr(
        p, "max_shared_memory_per_block_optin", 0
    )
    if not smem:
        smem = 227 * 1024 if p.major >= 9 else (163 * 1024 if p.major == 8 else 96 * 1024)
    return DeviceLimits(
        name=p.name,
        capability=(p.major, p.minor),
        sm_count=p.multi_processor_count,
        smem_per_block=int(smem),
        registers_per_sm=int(getattr(p, "regs_per_multiprocessor", 65536) or 65536),
    )


# ------------------------------------------------------------------------------------------------
# kernel definitions and the registry
# ------------------------------------------------------------------------------------------------

SpaceFn = Callable[[NSASpec, DeviceLimits], dict[str, list]]
CheckFn = Callable[[NSASpec, Mapping[str, Any], DeviceLimits], "str | None"]
DefaultFn = Callable[[NSASpec, DeviceLimits], dict[str, Any]]
ConstantsFn = Callable[[NSASpec, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class KernelDef:
    """One generated kernel.

    ``name``: registry key ("cmp_fwd", "slc_topk", "slc_fwd", ...); ``template``: file in
    ``codegen/templates``;
    ``pass_``: "fwd" | "bwd" | "decode"; ``space(spec, limits)``: the tuner's search space (param -> values);
    ``check(spec, config, limits)``: why a config is invalid (None = valid); ``default(spec, limits)``: the
    deterministic per-architecture default; ``constants(spec, config)``: extra template constants (optional,
    merged over ``spec_constants``); ``enabled(spec)``: whether this spec needs the kernel (e.g. no window).
    """

    name: str
    template: str
    pass_: str
    space: SpaceFn
    check: CheckFn
    default: DefaultFn
    constants: ConstantsFn | None = None
    enabled: Callable[[NSASpec], bool] | None = None
    doc: str = ""

    def is_enabled(self, spec: NSASpec) -> bool:
        return True if self.enabled is None else bool(self.enabled(spec))


KERNELS: dict[str, KernelDef] = {}


def register(kdef: KernelDef) -> KernelDef:
    """Add (or replace) a kernel in the registry; returns it."""
    if kdef.pass_ not in ("fwd", "bwd", "decode"):
        raise ValueError(f"KernelDef.pass_: must be 'fwd', 'bwd' or 'decode', got {kdef.pass_!r}")
    if not (TEMPLATE_DIR / kdef.template).is_file():
        raise ValueError(f"KernelDef.template: no file {kdef.template!r} in {TEMPLATE_DIR}")
    KERNELS[kdef.name] = kdef
    return kdef


_DISCOVERED = False


def _discover() -> None:
    """Import every ``nsa_dsl.codegen.kernels_*`` module (each registers its kernels)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    pkg = importlib.import_module("nsa_dsl.codegen")
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name.startswith("kernels_"):
            try:
                importlib.import_module(f"nsa_dsl.codegen.{m.name}")
            except Exception as e:  # a half-written family must not break the others
                log.warning("kernel family %s failed to import: %s", m.name, e)


def get_kernel(name: str) -> KernelDef:
    """The registered ``KernelDef`` called ``name`` (one-line error listing the known ones otherwise)."""
    _discover()
    if name not in KERNELS:
        raise KeyError(
            f"kernel: unknown kernel {name!r} (registered: {', '.join(sorted(KERNELS)) or 'none'})"
        )
    return KERNELS[name]


def all_kernels() -> dict[str, KernelDef]:
    _discover()
    return dict(KERNELS)


# ------------------------------------------------------------------------------------------------
# constants
# ------------------------------------------------------------------------------------------------


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def split_dim(dim: int, min_chunk: int = 16) -> list[tuple[int, int, int]]:
    """Split a head dim into power-of-two chunks ``(offset, width, valid)`` (e.g. 192 -> 128 + 64).

    ``valid`` < ``width`` only for a last, masked chunk (dims that are not a multiple of ``min_chunk``).
    The templates unroll over the chunks, so dk = 192 costs 192 columns, not 256.
    """
    out, off, rem = [], 0, dim
    while rem > 0:
        if rem < min_chunk:
            out.append((off, min_chunk, rem))
            break
        w = 1 << (rem.bit_length() - 1)
        out.append((off, w, w))
        off += w
        rem -= w
    return out


def element_bytes(spec: NSASpec) -> int:
    """Bytes per element of the spec's attention dtype (q, K/V and the outputs)."""
    return 4 if spec.attention.dtype == "float32" else 2


def spec_constants(spec: NSASpec) -> dict[str, Any]:
    """Compile-time constants every template may use (values baked into the emitted source)."""
    a, c, s = spec.attention, spec.compression, spec.selection
    der = derive(spec)
    G = spec.G
    return {
        "HQ": a.heads,
        "HKV": a.kv_heads,
        "G": G,
        "GP": next_pow2(G),
        "DK": a.head_dim_qk,
        "DV": a.head_dim_v,
        "DK_CHUNKS": split_dim(a.head_dim_qk),
        "DV_CHUNKS": split_dim(a.head_dim_v),
        "SCALE": float(spec.scale),
        "LOG2E": math.log2(math.e),
        "SCALE_LOG2E": float(spec.scale) * math.log2(math.e),
        "LN2": math.log(2.0),
        "DTYPE": a.dtype,
        "CMP_BLOCK": c.block,
        "CMP_STRIDE": c.stride,
        "SLC_BLOCK": s.block,
        "TOP_N": s.top_n,
        "TOP_NP": next_pow2(s.top_n),
        "FORCE_INITIAL": s.force_initial,
        "FORCE_LOCAL": s.force_local,
        "WINDOW": spec.window_size,
        "RATIO": der.ratio,
        "OVERLAP": tuple(der.overlap),
        "OVERLAP_OFFSET": der.overlap_offset,
    }


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPlan:
    """Everything needed to render one kernel: spec, kernel name, config, derived constants, limits."""

    spec: NSASpec
    kernel: str
    config: Mapping[str, Any] = field(hash=False)
    constants: Mapping[str, Any] = field(hash=False)
    limits: DeviceLimits = field(default_factory=DeviceLimits.interpreter_limits)

    @property
    def kdef(self) -> KernelDef:
        return get_kernel(self.kernel)

    @property
    def template_text(self) -> str:
        """The kernel's template plus the shared macro files it may import (all part of the key; read once
        per process)."""
        return _template_text(self.kdef.template)

    @cached_property
    def key(self) -> str:
        """Content hash (20 hex digits) of spec + kernel + config + generator version + template text
        (computed once per plan: every launch looks its module up by it)."""
        return _plan_key(
            self.spec.canonical_json(),
            self.kernel,
            _canon(self.config),
            GENERATOR_VERSION,
            self.template_text,
        )

    def __hash__(self) -> int:
        return hash(self.key)


@cache
def _template_text(template: str) -> str:
    parts = [(TEMPLATE_DIR / template).read_text()]
    for p in sorted(TEMPLATE_DIR.glob("_*.j2")):
        parts.append(p.read_text())
    return "\n".join(parts)


@lru_cache(maxsize=1024)
def _plan_key(spec_json: str, kernel: str, config_json: str, version: str, template_text: str) -> str:
    h = hashlib.sha256()
    for part in (spec_json, kernel, config_json, version, template_text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _canon(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)


def make_plan(
    spec: NSASpec,
    kernel: str,
    config: Mapping[str, Any] | None = None,
    limits: DeviceLimits | None = None,
) -> KernelPlan:
    """Plan ``kernel`` for ``spec``: the default config (per ``limits.arch``) overridden by ``config``.

    Raises ``ValueError`` (one line, naming the parameter and the rule) for unknown parameters or a config
    that ``KernelDef.check`` rejects.
    """
    if not isinstance(spec, NSASpec):
        raise TypeError(f"spec: must be an NSASpec, got {type(spec).__name__}")
    kdef = get_kernel(kernel)
    limits = limits or DeviceLimits.detect()
    cfg = dict(kdef.default(spec, limits))
    if config:
        space = kdef.space(spec, limits)
        known = set(space) | set(cfg)
        for k in config:
            if k not in known:
                raise ValueError(
                    f"config.{kernel}.{k}: unknown parameter (known: {', '.join(sorted(known))})"
                )
        cfg.update(config)
    why = kdef.check(spec, cfg, limits)
    if why:
        raise ValueError(f"config.{kernel}: {why}")
    consts = spec_constants(spec)
    if kdef.constants is not None:
        consts.update(kdef.constants(spec, cfg))
    return KernelPlan(spec=spec, kernel=kernel, config=dict(cfg), constants=consts, limits=limits)
