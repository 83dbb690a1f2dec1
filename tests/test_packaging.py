"""Packaging: the README's two commands, `.ci/run` running the test command verbatim, and a normal
(non-editable) install that imports ``nsa_dsl.codegen`` / ``nsa_dsl.tuning`` and finds specs by name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

needs_source = pytest.mark.skipif(not README.exists(), reason="not running from a source checkout")


def _setup_commands() -> list[str]:
    text = README.read_text()
    m = re.search(r"^## Set up\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README has no '## Set up' section"
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", m.group(1), flags=re.S)
    return [b.strip() for b in blocks]


@needs_source
def test_readme_has_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    main, test = cmds
    assert main.startswith("pip install ") and "nsa-compile nsa_paper" in main
    assert "'.[test]'" in test and "pytest" in test
    assert "torch==" in main and "torch==" in test  # a bare `torch` would pull a multi-GB CUDA build


@needs_source
def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _setup_commands()[1]
    lines = [ln.strip() for ln in CI_RUN.read_text().splitlines()]
    assert test_cmd in lines, f"{test_cmd!r} is not a line of .ci/run"
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
    assert CI_RUN.read_text().startswith("#!/usr/bin/env bash")


def _readme_after_setup() -> str:
    text = README.read_text()
    m = re.search(r"^## Tour\n.*", text, flags=re.S | re.M)
    assert m, "README has no '## Tour' section"
    return m.group(0)


@needs_source
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every Python block after the set-up commands runs as written (tiny spec; kernels in the interpreter
    on a CPU; caches in a temporary directory)."""
    import nsa_dsl.tuning as tuning

    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", _readme_after_setup(), flags=re.S)
    assert len(blocks) >= 5  # tour, kernels, backward, decode (+ CUDA graph), tuning
    tuning.clear_memory()
    try:
        for i, block in enumerate(blocks):
            exec(compile(textwrap.dedent(block), f"README.md python block {i}", "exec"), {})
    finally:
        tuning.clear_memory()


def _readme_commands(prog: str) -> list[list[str]]:
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", _readme_after_setup(), flags=re.S):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == prog:
                out.append(argv[1:])
    return out


@needs_source
def test_readme_nsa_compile_commands_run(tmp_path, monkeypatch, capsys):
    from nsa_dsl.cli import compile_main

    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cmds = _readme_commands("nsa-compile")
    assert any("-o" in c for c in cmds)
    for argv in cmds:
        if argv[0].endswith(".yaml"):  # the "your own file" example
            continue
        assert compile_main(argv) == 0, (argv, capsys.readouterr().err)


@needs_source
def test_readme_nsa_tune_commands_parse():
    """The README's nsa-tune commands use real options, groups and kernel names (parsed, not run)."""
    from nsa_dsl.codegen.plan import all_kernels
    from nsa_dsl.tuning import cli
    from nsa_dsl.tuning.schedules import schedule_defs

    from nsa_dsl import load_spec

    cmds = _readme_commands("nsa-tune")
    assert {c[0] for c in cmds} >= {"export", "import"}
    registry = {**all_kernels(), **schedule_defs()}
    for argv in cmds:
        if argv[0] in ("export", "import"):
            assert len(argv) == 2, argv
            continue
        args = cli._tune_parser().parse_args(argv)
        assert cli.parse_seq_lens(args.seq_lens)
        kernels, _ = cli._select_kernels(load_spec(args.spec), args.kernels, registry)
        assert kernels, argv


@needs_source
def test_readme_links_resolve():
    text = README.read_text()
    assert "nsa_dsl/SEMANTICS.md" in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"


def test_installed_layout_in_this_environment():
    import nsa_dsl.codegen  # noqa: F401 - installs from codegen/
    import nsa_dsl.tuning  # noqa: F401 - installs from tuning/

    import nsa_dsl
    from nsa_dsl import list_builtin_specs

    assert {"nsa_paper", "fla_compat", "small_group", "tiny"} <= set(list_builtin_specs())
    assert nsa_dsl.__version__


_CHECK = textwrap.dedent(
    """
    import os, sys
    import nsa_dsl, nsa_dsl.codegen, nsa_dsl.tuning
    from nsa_dsl import load_spec, list_builtin_specs
    site = os.path.realpath(sys.argv[1])
    for mod in (nsa_dsl, nsa_dsl.codegen, nsa_dsl.tuning):
        assert os.path.realpath(mod.__file__).startswith(site), (mod.__name__, mod.__file__)
    assert {"nsa_paper", "fla_compat", "small_group", "tiny"} <= set(list_builtin_specs())
    assert load_spec("nsa_paper").attention.heads == 64
    print("OK", sorted(list_builtin_specs()))
    """
)


@needs_source
def test_normal_install_imports_codegen_tuning_and_finds_specs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("nsa_dsl", "codegen", "tuning", "specs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("nsa_dsl-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    # the wheel ships the spec files and maps codegen/ and tuning/ under nsa_dsl (never as top-level names)
    assert (site / "nsa_dsl" / "specs" / "nsa_paper.yaml").is_file()
    assert (site / "nsa_dsl" / "codegen" / "__init__.py").is_file()
    assert (site / "nsa_dsl" / "tuning" / "__init__.py").is_file()
    assert not (site / "codegen").exists() and not (site / "tuning").exists()
    if (ROOT / "nsa_dsl" / "SEMANTICS.md").exists():
        assert (site / "nsa_dsl" / "SEMANTICS.md").is_file()
    # every module, template, spec and config of the source tree made it into the wheel (a new sub-package
    # must be added to pyproject's package list)
    installed_as = {"nsa_dsl": "nsa_dsl", "codegen": "nsa_dsl/codegen", "tuning": "nsa_dsl/tuning"}
    installed_as["specs"] = "nsa_dsl/specs"
    missing = [
        str(f.relative_to(src))
        for top, dest in installed_as.items()
        for f in (src / top).rglob("*")
        if f.is_file()
        and f.suffix in (".py", ".j2", ".yaml", ".json")
        and not any(part.startswith(".") for part in f.relative_to(src).parts)
        and not (site / dest / f.relative_to(src / top)).is_file()
    ]
    assert not missing, f"not in the wheel: {missing}"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", _CHECK, str(site)],
        cwd=tmp_path,  # not the checkout: nothing importable from the source tree
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK")


def test_public_api_names_docs_and_hints(tmp_path):
    """Every name of ``nsa_dsl.__all__`` resolves and is documented; ``import nsa_dsl`` stays light (no
    torch); the public entry points carry docstrings and type hints on every parameter and the return."""
    import inspect

    import nsa_dsl

    assert len(set(nsa_dsl.__all__)) == len(nsa_dsl.__all__)
    for name in nsa_dsl.__all__:
        obj = getattr(nsa_dsl, name)
        assert name == "__version__" or inspect.getdoc(obj), name
        assert name in dir(nsa_dsl), name
    for lazy in ("compile", "NSAttention", "NSACache", "cost_model", "compress", "Compressor"):
        assert lazy in nsa_dsl.__all__, lazy
    code = "import sys, nsa_dsl; nsa_dsl.load_spec('tiny'); print('torch' in sys.modules)"
    # from a neutral directory: `python -c` puts the cwd first on sys.path, and the source tree's
    # nsa_dsl/ lacks the nsa_dsl.specs package that only the install maps in
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr

    from nsa_dsl.codegen.ops import NSAOps

    entry = [nsa_dsl.compile, nsa_dsl.load_spec, nsa_dsl.cost_model, nsa_dsl.NSAttention.__init__,
             nsa_dsl.NSAttention.forward, nsa_dsl.NSACache.__init__]
    entry += [f for n, f in vars(NSAOps).items() if inspect.isfunction(f) and not n.startswith("_")]
    for f in entry:
        assert f.__doc__ or f.__name__ == "__init__", f.__qualname__
        sig = inspect.signature(f)
        missing = [p.name for p in sig.parameters.values() if p.name != "self"
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is p.empty]
        assert not missing and sig.return_annotation is not sig.empty, (f.__qualname__, missing)
