"""The NSA spec: what a user writes (YAML or Python), validated before anything runs.

Pipeline step 1 of 6: spec -> validated spec (+ sympy-derived quantities, see ``nsa_dsl.derived``)
-> kernel plan -> emitted source -> loaded op -> tuned config.

Every field carries the paper's symbol (arXiv 2502.11089). The dataclasses are frozen; ``NSASpec.from_dict``
validates and collects *all* problems into one ``SpecError`` whose lines each name a field path and a rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AttentionSpec",
    "CompressionSpec",
    "SelectionSpec",
    "WindowSpec",
    "GateSpec",
    "NSASpec",
    "SpecError",
    "load_spec",
    "list_builtin_specs",
    "DTYPES",
    "COMPRESSION_FUNCTIONS",
]

DTYPES = ("bfloat16", "float16", "float32")
COMPRESSION_FUNCTIONS = ("mean", "linear", "mlp")
MAX_HEAD_DIM = 256


class SpecError(ValueError):
    """A spec broke one or more rules. ``errors`` holds one line per problem: ``field.path: rule``."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + e for e in self.errors))


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shape. ``heads`` = query heads h, ``kv_heads`` = KV heads (GQA groups), G = heads / kv_heads.

    ``head_dim_qk`` = d_k, ``head_dim_v`` = d_v, ``scale`` = softmax scale (None: 1/sqrt(d_k)),
    ``dtype`` = activation dtype the kernels are specialised for.
    """

    heads: int = 64
    kv_heads: int = 4
    head_dim_qk: int = 192
    head_dim_v: int = 128
    scale: float | None = None
    dtype: str = "bfloat16"

    @property
    def group_size(self) -> int:
        """G: query heads sharing one KV head."""
        return self.heads // self.kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim_qk)


@dataclass(frozen=True)
class CompressionSpec:
    """Compression branch: blocks of ``block`` (l) tokens every ``stride`` (d) tokens -> one key/value (phi).

    ``function``: ``mean`` | ``linear`` | ``mlp`` (the paper's phi). ``position_encoding``: add a learnable
    intra-block position embedding before phi (linear/mlp). ``mlp_hidden``: hidden width of the MLP phi
    (None: l * head_dim, i.e. one hidden unit per input feature).
    """

    block: int = 32
    stride: int = 16
    function: str = "mlp"
    position_encoding: bool = True
    mlp_hidden: int | None = None


@dataclass(frozen=True)
class SelectionSpec:
    """Selection branch: blocks of ``block`` (l') tokens, ``top_n`` (n) per query and KV head.

    ``force_initial`` blocks 0..force_initial-1 and the ``force_local`` most recent valid blocks are always
    selected (they count towards n).
    """

    block: int = 64
    top_n: int = 16
    force_initial: int = 1
    force_local: int = 2


@dataclass(frozen=True)
class WindowSpec:
    """Sliding-window branch: the last ``size`` (w) tokens. 0 or None switches the branch off."""

    size: int | None = 512

    @property
    def enabled(self) -> bool:
        return bool(self.size)


@dataclass(frozen=True)
class GateSpec:
    """Per-head sigmoid gates g_cmp, g_slc, g_win computed from the hidden state.

    ``hidden``: width of the gate MLP's hidden layer (0: a single linear map, hidden -> heads*3).
    """

    hidden: int = 0


_SECTIONS: dict[str, type] = {
    "attention": AttentionSpec,
    "compression": CompressionSpec,
    "selection": SelectionSpec,
    "window": WindowSpec,
    "gates": GateSpec,
}


@dataclass(frozen=True)
class NSASpec:
    """A complete NSA configuration. Build with ``NSASpec.from_dict`` / ``load_spec`` to get validation;
    the plain constructor also validates (``__post_init__``)."""

    name: str = "nsa"
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    window: WindowSpec = field(default_factory=WindowSpec)
    gates: GateSpec = field(default_factory=GateSpec)

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise SpecError(errors)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> NSASpec:
        """Build and validate from a plain dict (the YAML layout). All problems are reported at once."""
        errors: list[str] = []
        if not isinstance(data, dict):
            raise SpecError([f"<root>: must be a mapping of sections, got {type(data).__name__}"], source)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "name":
                if not isinstance(value, str) or not value:
                    errors.append("name: must be a non-empty string")
                else:
                    kwargs["name"] = value
                continue
            if key not in _SECTIONS:
                errors.append(f"{key}: unknown section{_hint(key, ['name', *_SECTIONS])}")
                continue
            section_cls = _SECTIONS[key]
            if value is None and key == "window":
                value = {"size": None}
            if not isinstance(value, dict):
                errors.append(f"{key}: must be a mapping, got {type(value).__name__}")
                continue
            names = [f.name for f in dataclasses.fields(section_cls)]
            good = {}
            for fk, fv in value.items():
                if fk not in names:
                    errors.append(f"{key}.{fk}: unknown field{_hint(fk, names)}")
                else:
                    good[fk] = fv
            kwargs[key] = good
        # Type checks per field before constructing (so that arithmetic rules see sane values).
        sections = {}
        for key, section_cls in _SECTIONS.items():
            values = kwargs.get(key, {})
            errors.extend(_check_types(key, section_cls, values))
            sections[key] = values
        if errors:
            raise SpecError(errors, source)
        try:
            return cls(
                name=kwargs.get("name", "nsa"),
                **{k: _SECTIONS[k](**v) for k, v in sections.items()},
            )
        except SpecError as e:
            raise SpecError(e.errors, source) from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout; ``NSASpec.from_dict(spec.to_dict()) == spec``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> NSASpec:
        """A copy with some fields changed, e.g. ``spec.replace(window={"size": 0})``."""
        d = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(d.get(key), dict):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return NSASpec.from_dict(d)

    # ---- identity ------------------------------------------------------------------------------
    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Content hash (16 hex digits) of the spec's values, independent of key order and formatting."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    # ---- shorthands used everywhere ------------------------------------------------------------
    @property
    def G(self) -> int:  # noqa: N802 - the paper's symbol
        return self.attention.group_size

    @property
    def scale(self) -> float:
        return self.attention.softmax_scale

    @property
    def window_size(self) -> int:
        """w, 0 when the window branch is off."""
        return int(self.window.size or 0)

    def num_compressed(self, T: int) -> int:  # noqa: N803
        """Tc = floor((T - l) / d) + 1 complete compressed blocks (0 if T < l)."""
        l, d = self.compression.block, self.compression.stride
        return 0 if T < l else (T - l) // d + 1

    def num_selection_blocks(self, T: int) -> int:  # noqa: N803
        """ceil(T / l') selection blocks (the last one may be partial)."""
        return -(-T // self.selection.block)


def _hint(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(options)})"


_FIELD_TYPES: dict[tuple[str, str], str] = {
    ("attention", "heads"): "posint",
    ("attention", "kv_heads"): "posint",
    ("attention", "head_dim_qk"): "posint",
    ("attention", "head_dim_v"): "posint",
    ("attention", "scale"): "optposfloat",
    ("attention", "dtype"): "dtype",
    ("compression", "block"): "posint",
    ("compression", "stride"): "posint",
    ("compression", "function"): "function",
    ("compression", "position_encoding"): "bool",
    ("compression", "mlp_hidden"): "optposint",
    ("selection", "block"): "posint",
    ("selection", "top_n"): "posint",
    ("selection", "force_initial"): "nonnegint",
    ("selection", "force_local"): "nonnegint",
    ("window", "size"): "optnonnegint",
    ("gates", "hidden"): "nonnegint",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_error(path: str, kind: str, v: Any) -> str | None:
    if kind == "posint":
        return None if _is_int(v) and v > 0 else f"{path}: must be a positive integer, got {v!r}"
    if kind == "nonnegint":
        return None if _is_int(v) and v >= 0 else f"{path}: must be a non-negative integer, got {v!r}"
    if kind == "optposint":
        return None if v is None or (_is_int(v) and v > 0) else f"{path}: must be a positive integer or null, got {v!r}"
    if kind == "optnonnegint":
        ok = v is None or (_is_int(v) and v >= 0)
        return None if ok else f"{path}: must be a non-negative integer or null (0/null = off), got {v!r}"
    if kind == "optposfloat":
        ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v))
        return None if ok else f"{path}: must be a positive number or null (1/sqrt(head_dim_qk)), got {v!r}"
    if kind == "dtype":
        return None if v in DTYPES else f"{path}: must be one of {', '.join(DTYPES)}, got {v!r}"
    if kind == "function":
        ok = v in COMPRESSION_FUNCTIONS
        return None if ok else f"{path}: must be one of {', '.join(COMPRESSION_FUNCTIONS)}, got {v!r}"
    if kind == "bool":
        return None if isinstance(v, bool) else f"{path}: must be true or false, got {v!r}"
    raise AssertionError(kind)


def _check_types(section: str, cls: type, values: dict[str, Any]) -> list[str]:
    errors = []
    for name, v in values.items():
        err = _type_error(f"{section}.{name}", _FIELD_TYPES[(section, name)], v)
        if err:
            errors.append(err)
    return errors


def _validate(spec: NSASpec) -> list[str]:
    """Every rule, all problems at once. Arithmetic rules are checked with sympy (see ``derived``)."""
    from sympy import Integer

    errors: list[str] = []
    for key, cls in _SECTIONS.items():
        section = getattr(spec, key)
        if not isinstance(section, cls):
            errors.append(f"{key}: must be a {cls.__name__}, got {type(section).__name__}")
            continue
        errors.extend(_check_types(key, cls, dataclasses.asdict(section)))
    if errors:
        return errors
    a, c, s, w = spec.attention, spec.compression, spec.selection, spec.window
    if Integer(a.heads) % Integer(a.kv_heads) != 0:
        errors.append(
            f"attention.heads: must be a multiple of attention.kv_heads ({a.heads} % {a.kv_heads} != 0)"
        )
    for f in ("head_dim_qk", "head_dim_v"):
        if getattr(a, f) > MAX_HEAD_DIM:
            errors.append(f"attention.{f}: must be <= {MAX_HEAD_DIM}, got {getattr(a, f)}")
    if Integer(c.block) % Integer(c.stride) != 0:
        errors.append(f"compression.stride: must divide compression.block ({c.block} % {c.stride} != 0)")
    if Integer(s.block) % Integer(c.stride) != 0:
        errors.append(f"compression.stride: must divide selection.block ({s.block} % {c.stride} != 0)")
    if c.block > s.block:
        errors.append(f"compression.block: must be <= selection.block ({c.block} > {s.block})")
    if s.top_n < s.force_initial + s.force_local:
        errors.append(
            f"selection.top_n: must be >= force_initial + force_local "
            f"({s.top_n} < {s.force_initial} + {s.force_local})"
        )
    if c.function == "mean" and c.position_encoding:
        # A position encoding added before a mean only shifts every key by a constant; reject it so that
        # the spec says what actually runs.
        errors.append("compression.position_encoding: must be false when compression.function is 'mean'")
    if w.size is not None and w.size < 0:
        errors.append(f"window.size: must be >= 0, got {w.size}")
    return errors


# ---- files -------------------------------------------------------------------------------------


def list_builtin_specs() -> list[str]:
    """Names of the specs shipped in ``specs/`` (usable anywhere as ``load_spec(name)``)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("nsa_dsl.specs").iterdir() if p.name.endswith(".yaml"))


def _resolve(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.exists():
        return p
    from importlib.resources import files

    name = str(path_or_name)
    name = name[:-5] if name.endswith(".yaml") else name
    cand = files("nsa_dsl.specs") / f"{name}.yaml"
    if cand.is_file():
        return Path(str(cand))
    known = list_builtin_specs()
    raise SpecError([f"spec: no file '{path_or_name}' and no built-in spec of that name{_hint(name, known)}"])


def load_spec(path_or_name: str | Path) -> NSASpec:
    """Load a spec from a YAML file path or a built-in name (``"nsa_paper"``). Raises ``SpecError``."""
    import yaml

    path = _resolve(path_or_name)
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"yaml: {where}{problem}"], str(path)) from None
    if data is None:
        data = {}
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    return NSASpec.from_dict(data, source=str(path))
