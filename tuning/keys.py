"""Cache keys for tuning records.

A record is identified by the device (GPU name, compute capability, SM count), the software (triton, torch and
generator versions), the spec (content hash), the kernel, and a shape bucket (T and batch rounded up to powers
of two). ``key_fields`` returns these as a dict; ``record_key`` hashes its canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ._compat import generator_version, limits_fields

__all__ = ["bucket", "key_fields", "record_key", "canonical", "VERSION_FIELDS", "SOFTWARE_FIELDS"]

#: Fields whose mismatch makes a record stale ("from another version").
SOFTWARE_FIELDS = ("triton", "torch", "generator")
VERSION_FIELDS = SOFTWARE_FIELDS  # alias kept for readability in callers


def bucket(n: int) -> int:
    """The power-of-two bucket of a size: the smallest 2**k >= n (1 for n <= 1)."""
    n = int(n)
    if n <= 1:
        return 1
    return 1 << (n - 1).bit_length()


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): used for hashing and for deterministic tie-breaking."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def software_fields() -> dict[str, str]:
    import torch
    import triton

    return {
        "triton": str(triton.__version__),
        "torch": str(torch.__version__),
        "generator": generator_version(),
    }


def key_fields(spec: Any, kernel: str, *, T: int, B: int, limits: Any) -> dict[str, Any]:  # noqa: N803
    """All fields that identify a tuning record (see module doc). ``spec`` is an ``NSASpec``."""
    if int(T) < 1:
        raise ValueError(f"T: must be a positive integer, got {T!r}")
    if int(B) < 1:
        raise ValueError(f"B: must be a positive integer, got {B!r}")
    return {
        **limits_fields(limits),
        **software_fields(),
        "spec_hash": str(spec.hash),
        "kernel": str(kernel),
        "T_bucket": bucket(T),
        "B_bucket": bucket(B),
    }


def record_key(fields: dict[str, Any]) -> str:
    """A readable, unique key: ``<kernel>-T<bucket>-B<bucket>-<sha256 of the canonical fields, 16 hex>``."""
    h = hashlib.sha256(canonical(fields).encode()).hexdigest()[:16]
    return f"{fields['kernel']}-T{fields['T_bucket']}-B{fields['B_bucket']}-{h}"
