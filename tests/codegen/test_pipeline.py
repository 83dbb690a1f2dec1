"""The generator pipeline: plan keys, rendering (header, StrictUndefined), the content-addressed cache
(no rewrite / no re-import on a hit, atomic writes), emit_to_dir, and emitted files that run on their own."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jinja2
import pytest
from nsa_dsl.codegen import GENERATOR_VERSION, emit_to_dir
from nsa_dsl.codegen import loader as loader_mod
from nsa_dsl.codegen.loader import cache_dir, kernel_path, load, write_source
from nsa_dsl.codegen.plan import DeviceLimits, KernelDef, all_kernels, get_kernel, make_plan, split_dim
from nsa_dsl.codegen.render import environment, render

from nsa_dsl import load_spec


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def spec():
    return load_spec("tiny")


def test_generator_version_names_package_version():
    import nsa_dsl

    assert nsa_dsl.__version__ in GENERATOR_VERSION


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("NSA_DSL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "nsa_dsl"
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("NSA_DSL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nsa_dsl"


def test_device_limits_interpreter_on_cpu():
    lim = DeviceLimits.detect("cpu")
    assert lim.interpreter and lim.arch == "interpreter"


def test_registry_has_forward_kernels():
    names = set(all_kernels())
    assert {"cmp_fwd", "slc_topk", "cmp_topk"} <= names
    kd = get_kernel("cmp_fwd")
    assert isinstance(kd, KernelDef) and kd.pass_ == "fwd"
    with pytest.raises(KeyError, match="unknown kernel"):
        get_kernel("nope")


def test_default_configs_are_valid_on_every_arch(spec):
    paper = load_spec("nsa_paper")
    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    a100 = DeviceLimits("A100", (8, 0), 108, 163 * 1024)
    for s in (spec, paper, load_spec("fla_compat"), load_spec("small_group")):
        for name in ("cmp_fwd", "slc_topk", "cmp_topk"):
            kd = get_kernel(name)
            for lim in (DeviceLimits.interpreter_limits(), h100, a100):
                cfg = kd.default(s, lim)
                assert kd.check(s, cfg, lim) is None, (s.name, name, lim.name, cfg)
                space = kd.space(s, lim)
                assert set(cfg) <= set(space), (name, set(cfg) - set(space))
                if name in ("slc_topk", "cmp_topk"):  # every tunable parameter explicit, MERGE included
                    assert set(cfg) == set(space), (name, set(space) - set(cfg))
                    assert cfg["MERGE"] == "sort"


def test_split_dim():
    assert split_dim(192) == [(0, 128, 128), (128, 64, 64)]
    assert split_dim(128) == [(0, 128, 128)]
    assert split_dim(24) == [(0, 16, 16), (16, 16, 8)]


def test_key_changes_with_config_spec_and_is_stable(spec):
    lim = DeviceLimits.interpreter_limits()
    a = make_plan(spec, "cmp_fwd", None, lim)
    b = make_plan(spec, "cmp_fwd", None, lim)
    assert a.key == b.key and len(a.key) == 20
    c = make_plan(spec, "cmp_fwd", {"BLOCK_N": 32}, lim)
    assert c.key != a.key
    d = make_plan(spec.replace(selection={"top_n": 4}), "cmp_fwd", None, lim)
    assert d.key != a.key
    e = make_plan(spec, "slc_topk", None, lim)
    assert e.key != a.key


def test_key_covers_template_text(spec, monkeypatch):
    lim = DeviceLimits.interpreter_limits()
    plan = make_plan(spec, "cmp_fwd", None, lim)
    k0 = plan.key
    assert plan.key is k0  # computed once per plan (every launch looks its module up by it)
    monkeypatch.setattr(type(plan), "template_text", property(lambda self: "changed"))
    assert make_plan(spec, "cmp_fwd", None, lim).key != k0


def test_warm_module_lookup_touches_no_file(spec, cache, monkeypatch):
    """Every launch looks its module up through ``ops.module`` / ``load(plan)``: once a plan's module is
    loaded, the lookup must not read any file (it re-read the nine template files per call until session 12:
    ~160 us per launch, 3-5 ms of host time per forward + backward on the GPU)."""
    import nsa_dsl

    ops = nsa_dsl.compile(spec)
    kernels = ["cmp_fwd", "slc_topk", "slc_fwd", "bwd_cmp", "bwd_slc", "decode"]
    for k in kernels:
        ops.module(k, T=64)

    def no_read(*args, **kwargs):
        raise AssertionError("a warm module lookup read a file")

    monkeypatch.setattr(Path, "read_text", no_read)
    monkeypatch.setattr(Path, "read_bytes", no_read)
    monkeypatch.setattr(Path, "is_file", no_read)
    for _ in range(2):
        for k in kernels:
            assert ops.module(k, T=64) is ops.module(k, T=60)  # same bucket, same module


def test_make_plan_errors_name_the_parameter(spec):
    with pytest.raises(ValueError, match=r"^config.cmp_fwd.BLOCK_Q: unknown parameter"):
        make_plan(spec, "cmp_fwd", {"BLOCK_Q": 16})
    with pytest.raises(ValueError, match=r"BLOCK_N: must be a power of two"):
        make_plan(spec, "cmp_fwd", {"BLOCK_N": 24})


def test_render_header_and_strict_undefined(spec):
    plan = make_plan(spec, "cmp_fwd", None, DeviceLimits.interpreter_limits())
    src = render(plan)
    head = src.split('"""', 1)[0]
    assert head.startswith("# nsa-dsl generated kernel: cmp_fwd")
    assert f"hash: {spec.hash}" in head and GENERATOR_VERSION in head and plan.key in head
    assert '"BLOCK_M": ' in head and "top_n: 3" in head and "head_dim_qk: 16" in head
    # spec constants are baked in: the softmax scale * log2(e) appears as a literal
    assert repr(spec.scale * 1.4426950408889634)[:8] in src
    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ nope }}").render()


def test_emitted_imports_only_torch_triton_stdlib(spec):
    lim = DeviceLimits.interpreter_limits()
    allowed = {"math", "os", "torch", "triton", "triton.language"}
    for name in ("cmp_fwd", "slc_topk", "cmp_topk"):
        tree = ast.parse(render(make_plan(spec, name, None, lim)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= allowed, (name, [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom):
                assert node.module in allowed, (name, node.module)


def test_cache_hit_no_rewrite_no_reimport(spec, cache):
    plan = make_plan(spec, "cmp_fwd", None, DeviceLimits.interpreter_limits())
    loader_mod.clear_memory_cache()  # other tests may have loaded this plan from another cache dir
    imports0 = loader_mod.STATS["imports"]
    mod = load(plan)
    path = kernel_path(plan)
    assert path.is_file() and path.parent.parent == cache
    st = path.stat()
    assert loader_mod.STATS["imports"] == imports0 + 1
    assert load(plan) is mod and loader_mod.STATS["imports"] == imports0 + 1  # in-memory hit
    # a fresh process-level cache (memory cleared) reuses the file without rewriting it
    loader_mod.clear_memory_cache()
    writes0 = loader_mod.STATS["writes"]
    mod2 = load(plan)
    st2 = path.stat()
    assert loader_mod.STATS["writes"] == writes0
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert mod2.KEY == plan.key and mod2.SPEC_HASH == spec.hash


def test_write_source_atomic_and_idempotent(tmp_path):
    p = tmp_path / "k" / "x.py"
    assert write_source(p, "a = 1\n") is True
    assert write_source(p, "a = 1\n") is False
    threads = [threading.Thread(target=write_source, args=(p, f"a = {i}\n")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.read_text() in {f"a = {i}\n" for i in range(8)}
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, spec, cache, umask):
    """Emitted kernels (nsa-compile -o DIR), cached kernels and plain writes: 0666 minus the umask, like
    open() (a temp file + rename would otherwise leave mkstemp's 0600)."""
    from nsa_dsl.cli import compile_main

    want = 0o666 & ~umask
    old = os.umask(umask)
    try:
        assert loader_mod.current_umask() == umask
        p = tmp_path / "w" / "x.py"
        write_source(p, "a = 1\n")
        assert p.stat().st_mode & 0o777 == want
        plan = make_plan(spec, "cmp_fwd", None, DeviceLimits.interpreter_limits())
        loader_mod.clear_memory_cache()
        load(plan)
        assert kernel_path(plan).stat().st_mode & 0o777 == want
        assert compile_main(["tiny", "-o", str(tmp_path / "out")]) == 0
        files = list((tmp_path / "out").iterdir())
        assert files and {f.stat().st_mode & 0o777 for f in files} == {want}
    finally:
        os.umask(old)


def test_emit_to_dir_unchanged_is_not_rewritten(tmp_path, spec, cache):
    paths = emit_to_dir(spec, tmp_path / "out")
    assert any(p.name.startswith("cmp_fwd_") for p in paths)
    assert any(p.name.startswith("slc_topk_") for p in paths)
    on_disk = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert on_disk == sorted(p.name for p in paths)  # kernels only, no lock files
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}
    again = emit_to_dir("tiny", tmp_path / "out")
    assert sorted(again) == sorted(paths)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in again} == stats


def test_emitted_file_imports_from_a_copy(tmp_path, spec):
    plan = make_plan(spec, "slc_topk", None, DeviceLimits.interpreter_limits())
    src = tmp_path / "copy_of_kernel.py"
    src.write_text(render(plan))
    ms = importlib.util.spec_from_file_location("copy_of_kernel", src)
    mod = importlib.util.module_from_spec(ms)
    sys.modules["copy_of_kernel"] = mod
    try:
        ms.loader.exec_module(mod)
        assert mod.KERNEL == "slc_topk" and callable(mod.run) and mod.CONFIG == dict(plan.config)
    finally:
        sys.modules.pop("copy_of_kernel", None)


def test_emitted_file_runs_as_a_script(tmp_path, spec):
    plan = make_plan(spec, "cmp_fwd", None, DeviceLimits.interpreter_limits())
    f = tmp_path / "standalone.py"
    f.write_text(render(plan))
    shutil.copy(f, tmp_path / "again.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, str(f)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "self-test ok" in out.stdout
    assert Path(tmp_path / "again.py").read_text() == f.read_text()
