"""The NSA spec: what a user writes (YAML or Python), validated before anything runs.

Pipeline step 1 of 6: spec -> validated spec (+ sympy-derived quantities, see ``nsa_dsl.derived``)
-> kernel plan -> emitted source -> loaded op -> tuned config.

Every field carries the paper's symbol (arXiv 2502.11089). The dataclasses are frozen. Validation collects
*all* problems into one ``SpecError``; each of its lines names a field path and the rule it breaks, e.g.
``attention.heads: must be a multiple of attention.kv_heads (got attention.heads=64, attention.kv_heads=5)``.
Type rules (positive integers, known dtypes, ...) and unknown keys (with a "did you mean" hint) are checked
per field; the arithmetic rules between fields are sympy relations (``RULES``) evaluated on every field that
passed its own check, so one bad field never hides another problem.

YAML layout (every section and field optional, defaults are the paper's)::

    name: nsa_paper
    attention:   {heads: 64, kv_heads: 4, head_dim_qk: 192, head_dim_v: 128, scale: null, dtype: bfloat16}
    compression: {block: 32, stride: 16, function: mlp, position_encoding: true, mlp_hidden: null}
    selection:   {block: 64, top_n: 16, force_initial: 1, force_local: 2}
    window:      {size: 512}          # 0 or null (or `window: null`) switches the branch off
    gates:       {hidden: 0}
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
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
    "Rule",
    "load_spec",
    "list_builtin_specs",
    "DTYPES",
    "COMPRESSION_FUNCTIONS",
    "MAX_HEAD_DIM",
]

DTYPES = ("bfloat16", "float16", "float32")
COMPRESSION_FUNCTIONS = ("mean", "linear", "mlp")
MAX_HEAD_DIM = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A spec broke one or more rules.

    ``errors`` holds one line per problem, ``"field.path: rule"``. ``source`` is the file (if any) and
    ``lines`` maps field paths to their line numbers in it; ``str(err)`` prefixes each line with
    ``source:line:`` where known, so every printed line says where the problem is.
    """

    def __init__(self, errors: list[str], source: str | None = None, lines: dict[str, int] | None = None):
        self.errors = list(errors)
        self.source = source
        self.lines = dict(lines or {})
        super().__init__("\n".join(self.messages()))

    def __reduce__(self) -> tuple:  # picklable (e.g. across tuning worker processes)
        return (type(self), (self.errors, self.source, self.lines))

    def messages(self) -> list[str]:
        """The printable lines: ``[source[:line]: ]field.path: rule``."""
        out = []
        for e in self.errors:
            path = e.split(":", 1)[0]
            line = self.lines.get(path)
            if line is None:  # a rule on a field the file leaves at its default: another field it names
                named = [
                    ln for p, ln in self.lines.items() if "." in p and re.search(rf"\b{re.escape(p)}\b", e)
                ]
                line = min(named) if named else self.lines.get(path.split(".", 1)[0])
            if self.source and line is not None:
                out.append(f"{self.source}:{line}: {e}")
            elif self.source:
                out.append(f"{self.source}: {e}")
            else:
                out.append(e)
        return out


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shape.

    ``heads``: query heads (h); ``kv_heads``: KV heads (GQA groups), G = heads / kv_heads query heads share
    one KV head. ``head_dim_qk``: d_k; ``head_dim_v``: d_v (both <= 256). ``scale``: softmax scale (None:
    1/sqrt(d_k)). ``dtype``: activation dtype the kernels are specialised for (bfloat16 | float16 | float32).
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
        """The scale actually used: ``scale`` or 1/sqrt(d_k)."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim_qk)


@dataclass(frozen=True)
class CompressionSpec:
    """Compression branch: blocks of ``block`` (l) tokens every ``stride`` (d) tokens -> one key/value (phi).

    ``function``: ``mean`` | ``linear`` | ``mlp`` (the paper's phi). ``position_encoding``: add a learnable
    intra-block position embedding before phi (linear/mlp only; must be false for mean). ``mlp_hidden``:
    hidden width of the MLP phi (None: l * head_dim, one hidden unit per input feature).
    """

    block: int = 32
    stride: int = 16
    function: str = "mlp"
    position_encoding: bool = True
    mlp_hidden: int | None = None


@dataclass(frozen=True)
class SelectionSpec:
    """Selection branch: blocks of ``block`` (l') tokens, ``top_n`` (n) blocks per query and KV head.

    ``force_initial``: blocks 0..force_initial-1 and ``force_local``: the force_local most recent valid
    blocks are always selected (they count towards n, so n >= force_initial + force_local).
    """

    block: int = 64
    top_n: int = 16
    force_initial: int = 1
    force_local: int = 2


@dataclass(frozen=True)
class WindowSpec:
    """Sliding-window branch: the last ``size`` (w) tokens. 0 or None switches the branch off (its gate
    slot is then ignored)."""

    size: int | None = 512

    @property
    def enabled(self) -> bool:
        return bool(self.size)


@dataclass(frozen=True)
class GateSpec:
    """Per-head sigmoid gates g_cmp, g_slc, g_win computed from the hidden state.

    ``hidden``: width of the gate MLP's hidden layer (0: a single linear map, hidden -> heads * 3).
    """

    hidden: int = 0


_SECTIONS: dict[str, type] = {
    "attention": AttentionSpec,
    "compression": CompressionSpec,
    "selection": SelectionSpec,
    "window": WindowSpec,
    "gates": GateSpec,
}

# ---- per-field type rules ------------------------------------------------------------------------

_FIELD_KINDS: dict[str, str] = {
    "attention.heads": "posint",
    "attention.kv_heads": "posint",
    "attention.head_dim_qk": "posint",
    "attention.head_dim_v": "posint",
    "attention.scale": "optposfloat",
    "attention.dtype": "dtype",
    "compression.block": "posint",
    "compression.stride": "posint",
    "compression.function": "function",
    "compression.position_encoding": "bool",
    "compression.mlp_hidden": "optposint",
    "selection.block": "posint",
    "selection.top_n": "posint",
    "selection.force_initial": "nonnegint",
    "selection.force_local": "nonnegint",
    "window.size": "optnonnegint",
    "gates.hidden": "nonnegint",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_error(path: str, kind: str, v: Any) -> str | None:
    if kind == "posint":
        return None if _is_int(v) and v > 0 else f"{path}: must be a positive integer, got {v!r}"
    if kind == "nonnegint":
        return None if _is_int(v) and v >= 0 else f"{path}: must be a non-negative integer, got {v!r}"
    if kind == "optposint":
        ok = v is None or (_is_int(v) and v > 0)
        return None if ok else f"{path}: must be a positive integer or null, got {v!r}"
    if kind == "optnonnegint":
        ok = v is None or (_is_int(v) and v >= 0)
        return None if ok else f"{path}: must be a non-negative integer or null (0/null = off), got {v!r}"
    if kind == "optposfloat":
        ok = v is None or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        )
        return None if ok else f"{path}: must be a positive number or null (1/sqrt(head_dim_qk)), got {v!r}"
    if kind == "dtype":
        if v in DTYPES:
            return None
        hint = _hint(v, list(DTYPES)) if isinstance(v, str) else f" (known: {', '.join(DTYPES)})"
        return f"{path}: must be a known dtype{hint}, got {v!r}"
    if kind == "function":
        if v in COMPRESSION_FUNCTIONS:
            return None
        opts = list(COMPRESSION_FUNCTIONS)
        hint = _hint(v, opts) if isinstance(v, str) else f" (known: {', '.join(opts)})"
        return f"{path}: must be one of {', '.join(opts)}{hint}, got {v!r}"
    if kind == "bool":
        return None if isinstance(v, bool) else f"{path}: must be true or false, got {v!r}"
    raise AssertionError(kind)


# ---- arithmetic rules between fields (sympy) ----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One arithmetic rule: ``relation`` is a sympy relation over symbols named after field paths.

    The error is reported on ``field`` as ``"<field>: <text> (got <values>)"``. ``nsa_dsl.spec.RULES`` lists
    them all. A rule is skipped when any
    field it reads failed its own check (that field already has an error).
    """

    field: str
    text: str
    relation: Any  # a sympy Relational

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(sorted(str(s) for s in self.relation.free_symbols))

    def check(self, values: dict[str, Any]) -> str | None:
        """``None`` if the rule holds for ``values`` (path -> value), else the error line."""
        import sympy as sp

        subs = {s: sp.Integer(values[str(s)]) for s in self.relation.free_symbols}
        if bool(self.relation.xreplace(subs)):
            return None
        fs = (self.field, *(p for p in self.fields if p != self.field))
        got = repr(values[fs[0]]) if len(fs) == 1 else ", ".join(f"{p}={values[p]!r}" for p in fs)
        return f"{self.field}: {self.text} (got {got})"


@lru_cache(maxsize=1)
def _rules() -> tuple[Rule, ...]:
    import sympy as sp

    s = {p: sp.Symbol(p, integer=True) for p in _FIELD_KINDS}
    H, Hkv = s["attention.heads"], s["attention.kv_heads"]  # noqa: N806
    dk, dv = s["attention.head_dim_qk"], s["attention.head_dim_v"]
    l, d, lp = s["compression.block"], s["compression.stride"], s["selection.block"]  # noqa: E741
    n, fi, fl = s["selection.top_n"], s["selection.force_initial"], s["selection.force_local"]
    return (
        Rule("attention.heads", "must be a multiple of attention.kv_heads (G = heads / kv_heads)",
             sp.Eq(sp.Mod(H, Hkv), 0)),
        Rule("attention.head_dim_qk", f"must be <= {MAX_HEAD_DIM}", sp.Le(dk, MAX_HEAD_DIM)),
        Rule("attention.head_dim_v", f"must be <= {MAX_HEAD_DIM}", sp.Le(dv, MAX_HEAD_DIM)),
        Rule("compression.stride", "must divide compression.block (d | l)", sp.Eq(sp.Mod(l, d), 0)),
        Rule("compression.stride", "must divide selection.block (d | l')", sp.Eq(sp.Mod(lp, d), 0)),
        Rule("compression.block", "must be <= selection.block (l <= l')", sp.Le(l, lp)),
        Rule("selection.top_n", "must be >= selection.force_initial + selection.force_local",
             sp.Ge(n, fi + fl)),
    )  # fmt: skip


def __getattr__(name: str) -> Any:  # RULES is built lazily (sympy import)
    if name == "RULES":
        return _rules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_values(values: dict[str, Any], bad: set[str]) -> list[str]:
    """Cross-field rules on ``values`` (path -> value, every field), skipping rules that read a path in
    ``bad``."""
    errors = [
        e for rule in _rules() if not (set(rule.fields) & bad) and (e := rule.check(values)) is not None
    ]
    fn, pe = "compression.function", "compression.position_encoding"
    if not ({fn, pe} & bad) and values[fn] == "mean" and values[pe]:
        # A position encoding added before a mean only shifts every key by a constant: reject it so that
        # the spec says what actually runs.
        errors.append(f"{pe}: must be false when {fn} is 'mean'")
    return errors


def _validate_sections(sections: dict[str, dict[str, Any]]) -> list[str]:
    """Type rules per field, then the arithmetic rules on every field that passed (defaults fill gaps)."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    bad: set[str] = set()
    for key, cls in _SECTIONS.items():
        given = sections.get(key, {})
        for f in dataclasses.fields(cls):
            path = f"{key}.{f.name}"
            if path in given:
                err = _type_error(path, _FIELD_KINDS[path], given[path])
                if err:
                    errors.append(err)
                    bad.add(path)
                values[path] = given[path]
            else:
                values[path] = f.default
    errors.extend(_check_values(values, bad))
    return errors


def _validate(spec: NSASpec) -> list[str]:
    """Every rule on a constructed spec, all problems at once."""
    errors: list[str] = []
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        errors.append(
            f"name: must be a non-empty string of letters, digits, '_', '.', '-', got {spec.name!r}"
        )
    sections: dict[str, dict[str, Any]] = {}
    for key, cls in _SECTIONS.items():
        section = getattr(spec, key)
        if not isinstance(section, cls):
            errors.append(f"{key}: must be a {cls.__name__}, got {type(section).__name__}")
            continue
        sections[key] = {f"{key}.{k}": v for k, v in dataclasses.asdict(section).items()}
    return errors + _validate_sections(sections)


# ---- the spec -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NSASpec:
    """A complete NSA configuration.

    Build with ``load_spec(path_or_name)``, ``NSASpec.from_yaml(text)``, ``NSASpec.from_dict(d)`` or the
    constructor (``NSASpec(attention=AttentionSpec(heads=8, kv_heads=2))``); all of them validate and raise
    ``SpecError`` listing every problem. Round trips are lossless: ``from_dict(s.to_dict()) == s`` and
    ``from_yaml(s.to_yaml()) == s``.
    """

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
    def from_dict(
        cls, data: dict[str, Any], *, source: str | None = None, lines: dict[str, int] | None = None
    ) -> NSASpec:
        """Build and validate from a plain dict (the YAML layout). All problems are reported at once.

        ``source`` / ``lines`` (field path -> line number) only decorate the error messages.
        """
        if not isinstance(data, dict):
            raise SpecError(
                [f"<root>: must be a mapping of sections, got {type(data).__name__}"], source, lines
            )
        errors: list[str] = []
        name = data.get("name", "nsa")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            errors.append(f"name: must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
        sections: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key == "name":
                continue
            if key not in _SECTIONS:
                errors.append(f"{key}: unknown section{_hint(key, ['name', *_SECTIONS])}")
                continue
            if value is None and key == "window":
                value = {"size": None}
            elif value is None:
                value = {}
            if not isinstance(value, dict):
                extra = (
                    " (use `window: {size: 0}` or `window: null` to switch it off)" if key == "window" else ""
                )
                errors.append(f"{key}: must be a mapping of fields, got {type(value).__name__}{extra}")
                continue
            names = [f.name for f in dataclasses.fields(_SECTIONS[key])]
            good = {}
            for fk, fv in value.items():
                if fk not in names:
                    errors.append(f"{key}.{fk}: unknown field{_hint(str(fk), names)}")
                else:
                    good[f"{key}.{fk}"] = fv
            sections[key] = good
        errors.extend(_validate_sections(sections))
        if errors:
            raise SpecError(errors, source, lines)
        return cls(
            name=name,
            **{k: _SECTIONS[k](**{p.split(".", 1)[1]: v for p, v in sections.get(k, {}).items()})
               for k in _SECTIONS},
        )  # fmt: skip

    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None, default_name: str | None = None) -> NSASpec:
        """Parse and validate YAML text. Syntax errors and duplicate keys are reported with line numbers."""
        data, lines = _parse_yaml(text, source)
        if data is None:
            data = {}
        if isinstance(data, dict) and "name" not in data and default_name:
            data = {"name": default_name, **data}
        return cls.from_dict(data, source=source, lines=lines)

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout; ``NSASpec.from_dict(spec.to_dict()) == spec``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The normalised YAML (every field spelled out); ``NSASpec.from_yaml(spec.to_yaml()) == spec``."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> NSASpec:
        """A validated copy with some fields changed, e.g. ``spec.replace(window={"size": 0})``."""
        d = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(d.get(key), dict):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return NSASpec.from_dict(d)

    # ---- identity ------------------------------------------------------------------------------
    def canonical_json(self) -> str:
        """The spec's values as compact JSON with sorted keys (the input of ``hash``)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Content hash (16 hex digits) of the spec's values, independent of key order and formatting."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    # ---- shorthands used everywhere ------------------------------------------------------------
    @property
    def G(self) -> int:  # noqa: N802 - the paper's symbol
        """Query heads per KV head."""
        return self.attention.group_size

    @property
    def scale(self) -> float:
        """Softmax scale actually used (``attention.scale`` or 1/sqrt(d_k))."""
        return self.attention.softmax_scale

    @property
    def window_size(self) -> int:
        """w, 0 when the window branch is off."""
        return int(self.window.size or 0)

    def num_compressed(self, T: int) -> int:  # noqa: N803
        """Tc = floor((T - l) / d) + 1 complete compressed blocks (0 if T < l)."""
        l, d = self.compression.block, self.compression.stride  # noqa: E741
        return 0 if T < l else (T - l) // d + 1

    def num_selection_blocks(self, T: int) -> int:  # noqa: N803
        """ceil(T / l') selection blocks (the last one may be partial)."""
        return -(-T // self.selection.block)


def _hint(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(options)})"


# ---- files ----------------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str | None) -> tuple[Any, dict[str, int]]:
    """``(data, lines)``: the parsed document and the line number of every mapping key (dotted path)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for knode, _ in node.value:
            key = loader.construct_object(knode, deep=True)
            line = knode.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", knode.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        detail = f"{problem} ({context})" if context and problem != context else problem
        raise SpecError([f"yaml: {where}{detail}"], source) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    path = f"{prefix}.{k.value}" if prefix else str(k.value)
                    lines.setdefault(path, k.start_mark.line + 1)
                    walk(v, path)

    walk(node, "")
    return data, lines


def list_builtin_specs() -> list[str]:
    """Names of the specs shipped in ``specs/`` (usable from any directory as ``load_spec(name)``)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("nsa_dsl.specs").iterdir() if p.name.endswith(".yaml"))


def _resolve(path_or_name: str | Path) -> tuple[str, Callable[[], str]]:
    """``(display name, reader)`` for a file path or a built-in spec name."""
    p = Path(path_or_name)
    if p.is_file():
        return str(p), p.read_text
    from importlib.resources import files

    name = str(path_or_name)
    name = name[:-5] if name.endswith(".yaml") else name
    if "/" not in name and "\\" not in name:
        cand = files("nsa_dsl.specs") / f"{name}.yaml"
        if cand.is_file():
            return f"{name}.yaml", cand.read_text
    if p.exists():
        raise SpecError([f"spec: '{path_or_name}' is not a file"])
    known = list_builtin_specs()
    raise SpecError([f"spec: no file '{path_or_name}' and no built-in spec of that name{_hint(name, known)}"])


def load_spec(path_or_name: str | Path) -> NSASpec:
    """Load a spec from a YAML file path or a built-in name (``"nsa_paper"``, see ``list_builtin_specs``).

    A file without ``name:`` is named after its stem. Raises ``SpecError`` (a ``ValueError``) listing every
    problem, with line numbers where the file has them.
    """
    source, read = _resolve(path_or_name)
    try:
        text = read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"spec: cannot read file ({e})"], source) from None
    stem = Path(source).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem[:-4] if stem.endswith(".yml") else stem
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("_.-") or "nsa"
    return NSASpec.from_yaml(text, source=source, default_name=stem)
