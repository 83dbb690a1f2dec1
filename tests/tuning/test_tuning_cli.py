"""``nsa-tune`` in-process (fake kernel and timer: ``--fake``) and as a console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from nsa_dsl.tuning.cli import main, parse_seq_lens


def test_parse_seq_lens():
    assert parse_seq_lens("8k,32K, 65536,1m") == [8192, 32768, 65536, 1 << 20]


def test_tune_then_cache_hit(capsys):
    assert main(["tiny", "--fake", "--kernels", "fake_fwd", "--seq-lens", "1k,4k", "--trials", "12"]) == 0
    out = capsys.readouterr().out
    assert "fake_fwd" in out and "tuned" in out and "speedup" in out and "geometric-mean" in out
    assert main(["tiny", "--fake", "--kernels", "fwd", "--seq-lens", "1k,4k", "--trials", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("cache") >= 2 and "tuned  " not in out


def test_budget_seconds_and_workers(capsys):
    assert (
        main(
            [
                "tiny",
                "--fake",
                "--kernels",
                "fake_fwd",
                "--seq-lens",
                "2k",
                "--budget-seconds",
                "3",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 workers" in out and "fake_fwd" in out


def test_groups_without_kernels_are_skipped(capsys):
    assert main(["tiny", "--fake", "--kernels", "fwd,bwd,decode", "--trials", "4", "--seq-lens", "1k"]) == 0
    out = capsys.readouterr().out
    assert "no bwd kernels" in out and "no decode kernels" in out


def test_export_import(tmp_path, capsys, monkeypatch):
    assert main(["tiny", "--fake", "--kernels", "fake_fwd", "--seq-lens", "1k", "--trials", "5"]) == 0
    f = tmp_path / "records.json"
    assert main(["export", str(f)]) == 0
    data = json.loads(f.read_text())
    assert len(data["records"]) == 1
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert main(["import", str(f)]) == 0
    assert "imported 1 records" in capsys.readouterr().out
    assert main(["tiny", "--fake", "--kernels", "fake_fwd", "--seq-lens", "1k", "--trials", "5"]) == 0
    assert "cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["no_such_spec"], "no built-in spec"),
        (["tiny", "--fake", "--kernels", "nope"], "--kernels: unknown kernel or group 'nope'"),
        (["tiny", "--fake", "--trials", "0"], "--trials"),
        (["tiny", "--fake", "--trials", "3", "--budget-seconds", "3"], "not allowed with"),
        (["tiny", "--fake", "--seq-lens", "abc"], "--seq-lens"),
        (["import", "/no/such/file.json"], "import: cannot read"),
        (["/no/such/spec.yaml", "--fake"], "spec: no file '/no/such/spec.yaml'"),
        (["tiny", "--fake", "--seq-lens", "0"], "--seq-lens: lengths must be positive"),
        (["tiny", "--fake", "--seq-lens", ","], "--seq-lens: give at least one length"),
        (["tiny", "--fake", "--batch", "x"], "argument --batch: must be a positive integer, got 'x'"),
        (["export", "/dev/null/records.json"], "export: cannot write /dev/null/records.json"),
        (["tiny", "--bogus"], "unrecognized arguments"),
        (["tiny", "--fake", "--local-fraction", "1.5"], "argument --local-fraction: must be from 0 to 1"),
        (["tiny", "--fake", "--local-fraction", "x"], "--local-fraction: must be a number from 0 to 1"),
    ],
)
def test_errors_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ("attention:\n  heds: 64\n", "attention.heds: unknown field (did you mean 'heads'?)"),
        ("attention:\n  heads: 6\n  kv_heads: 4\n", "attention.heads: must be a multiple of"),
        ("attention: [1, 2\n", "line 2"),
    ],
)
def test_bad_spec_file_one_line_exit_2(tmp_path, capsys, content, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    assert main([str(p), "--fake", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsa-tune: error: ") and needle in lines[0], lines
    assert "Traceback" not in err


def test_console_script_error():
    exe = shutil.which("nsa-tune")
    cmd = [exe] if exe else [sys.executable, "-m", "nsa_dsl.tuning.cli"]
    p = subprocess.run(
        [*cmd, "tiny", "--fake", "--kernels", "nope"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--kernels" in p.stderr


def test_real_kernel_through_the_interpreter(capsys):
    """End to end on a generated kernel (tiny spec, Triton interpreter): tune, then a cache hit."""
    pytest.importorskip("nsa_dsl.codegen.plan")
    from nsa_dsl.codegen.plan import all_kernels

    if "win_fwd" not in all_kernels():
        pytest.skip("win_fwd not registered")
    argv = ["tiny", "--kernels", "win_fwd", "--seq-lens", "32", "--trials", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "win_fwd" in out and "tuned" in out
    assert main(argv) == 0
    assert "cache" in capsys.readouterr().out


def test_local_fraction_reaches_the_search(monkeypatch, capsys):
    """``--local-fraction`` is passed to every job's search (without it: the search's own LOCAL_FRACTION)."""
    import nsa_dsl.tuning as tuning

    seen, orig = [], tuning.tune_kernel

    def spy(*a, **kw):
        seen.append(kw.get("local", "default"))
        return orig(*a, **kw)

    monkeypatch.setattr(tuning, "tune_kernel", spy)
    argv = ["tiny", "--fake", "--seq-lens", "64", "--trials", "3", "--force"]
    assert main([*argv, "--local-fraction", "0"]) == 0
    assert main(argv) == 0
    assert seen and seen[0] == 0.0 and seen[-1] == "default"
