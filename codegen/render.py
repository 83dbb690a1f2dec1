"""Rendering (pipeline step 4): ``KernelPlan`` -> Triton source text.

Templates live in ``codegen/templates`` (jinja2, ``StrictUndefined``: a missing constant is an error, never an
empty string). Every template does ``{% import "_macros.j2" as m %}`` for the shared pieces. The emitted file
starts with a header naming the spec (hash and values), the config and the generator version; it imports only
torch/triton (and the standard library) and runs on its own.
"""

from __future__ import annotations

import json
from functools import lru_cache

import jinja2

from .plan import GENERATOR_VERSION, TEMPLATE_DIR, KernelPlan

__all__ = ["render", "header", "environment"]


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = _pyrepr
    env.globals["GENERATOR_VERSION"] = GENERATOR_VERSION
    return env


def _pyrepr(x: object) -> str:
    if isinstance(x, jinja2.Undefined):
        x._fail_with_undefined_error()  # StrictUndefined: a missing value is an error, never a string
    return repr(x)


def _spec_lines(d: dict, indent: str = "") -> list[str]:
    """The spec's values in YAML layout (no yaml dependency at render time)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{indent}{k}:")
            out.extend(_spec_lines(v, indent + "  "))
        else:
            out.append(f"{indent}{k}: {json.dumps(v)}")
    return out


def header(plan: KernelPlan) -> str:
    """The comment block every emitted file starts with."""
    spec_yaml = _spec_lines(plan.spec.to_dict())
    lines = [
        f"# nsa-dsl generated kernel: {plan.kernel}  (pass: {plan.kdef.pass_})",
        f"# generator: {GENERATOR_VERSION}",
        f"# key: {plan.key}",
        f"# spec: {plan.spec.name}  hash: {plan.spec.hash}",
        f"# config: {json.dumps(dict(plan.config), sort_keys=True)}",
        "# spec values:",
        *[f"#   {ln}" for ln in spec_yaml],
        "# DO NOT EDIT: regenerate with `nsa-compile SPEC -o DIR`.",
    ]
    return "\n".join(lines) + "\n"


def tidy_blank_lines(source: str) -> str:
    """Collapse the blank-line runs that template macros leave behind: at most two before a top-level line
    (PEP 8 between definitions), at most one before an indented line; blank lines lose trailing spaces."""
    out: list[str] = []
    run = 0
    for line in source.split("\n"):
        if not line.strip():
            run += 1
            continue
        if out:
            out += [""] * min(run, 1 if line[:1].isspace() else 2)
        run = 0
        out.append(line)
    return "\n".join(out) + "\n"


def render(plan: KernelPlan) -> str:
    """Render ``plan`` to Python/Triton source (header first; blank-line runs tidied)."""
    tmpl = environment().get_template(plan.kdef.template)
    body = tmpl.render(
        plan=plan,
        spec=plan.spec,
        c=plan.constants,
        cfg=plan.config,
        kernel=plan.kernel,
        key=plan.key,
        spec_hash=plan.spec.hash,
        generator_version=GENERATOR_VERSION,
    )
    return header(plan) + tidy_blank_lines(body)
