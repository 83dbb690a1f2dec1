"""Record keys, the record file (invalidation, corruption, concurrent writers) and the lookup order."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp

import nsa_dsl.tuning as tuning
import nsa_dsl.tuning.keys as keys
import pytest
from nsa_dsl.tuning import store
from nsa_dsl.tuning.testing import FakeKernelDef, fake_registry

from nsa_dsl import load_spec

SPEC = load_spec("tiny")


class _Limits:
    def __init__(self, name="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132):
        self.name, self.capability, self.sm_count = name, capability, sm_count
        self.smem_per_block, self.interpreter = 232448, False


H100 = _Limits()


def _record(spec, kernel, T, B, limits, config, **extra):  # noqa: N803
    f = keys.key_fields(spec, kernel, T=T, B=B, limits=limits)
    return {"fields": {**f, **extra}, "config": config, "time_ms": 1.0}


# ---- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, b", [(1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024), (1025, 2048), (65536, 65536)]
)
def test_bucket(n, b):
    assert keys.bucket(n) == b


def test_key_fields_and_key_changes():
    f = keys.key_fields(SPEC, "cmp_fwd", T=5000, B=3, limits=H100)
    assert f["T_bucket"] == 8192 and f["B_bucket"] == 4
    assert f["gpu"] == "NVIDIA H100 80GB HBM3" and f["capability"] == "9.0" and f["sm_count"] == 132
    assert f["spec_hash"] == SPEC.hash and f["kernel"] == "cmp_fwd"
    import torch
    import triton

    assert f["torch"] == torch.__version__ and f["triton"] == triton.__version__ and f["generator"]
    k = keys.record_key(f)
    assert keys.record_key(keys.key_fields(SPEC, "cmp_fwd", T=8000, B=4, limits=H100)) == k  # same buckets
    others = [
        keys.key_fields(SPEC, "cmp_fwd", T=9000, B=3, limits=H100),
        keys.key_fields(SPEC, "cmp_fwd", T=5000, B=5, limits=H100),
        keys.key_fields(SPEC, "win_fwd", T=5000, B=3, limits=H100),
        keys.key_fields(load_spec("small_group"), "cmp_fwd", T=5000, B=3, limits=H100),
        keys.key_fields(SPEC, "cmp_fwd", T=5000, B=3, limits=_Limits(name="NVIDIA H200")),
        keys.key_fields(SPEC, "cmp_fwd", T=5000, B=3, limits=_Limits(sm_count=114)),
        keys.key_fields(SPEC, "cmp_fwd", T=5000, B=3, limits=_Limits(capability=(8, 0))),
        {**f, "triton": "0.0.1"},
        {**f, "torch": "1.0"},
        {**f, "generator": "other"},
    ]
    assert len({keys.record_key(o) for o in others} | {k}) == len(others) + 1


def test_bad_shape_rejected():
    with pytest.raises(ValueError, match="T: must be a positive integer"):
        keys.key_fields(SPEC, "cmp_fwd", T=0, B=1, limits=H100)


# ---- the record file --------------------------------------------------------------------------------


def test_put_get_roundtrip_and_atomic_file(tmp_path):
    st = store.user_store()
    rec = _record(SPEC, "fake_fwd", 1000, 1, H100, {"BLOCK_M": 32})
    key = st.put(rec)
    data = json.loads(st.path.read_text())
    assert data["format"] == store.FORMAT and key in data["records"]
    assert st.get(key, rec["fields"])["config"] == {"BLOCK_M": 32}
    assert not list(st.path.parent.glob("*.tmp"))  # no temp file left behind
    assert str(st.path).startswith(str(tmp_path / "cache" / "tuning"))


def test_record_from_other_version_is_ignored(monkeypatch):
    reg = fake_registry()
    cur = keys.key_fields(SPEC, "fake_fwd", T=1000, B=1, limits=H100)
    # Records written by other versions (as another install would key them) ...
    for field, value in [("generator", "nsa_dsl-0.0.1/codegen-0"), ("triton", "2.0.0"), ("torch", "1.13")]:
        f = {**cur, field: value}
        store.user_store().put({"fields": f, "config": {"BLOCK_M": 16}})
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg) is None
    # ... and a record stored under the current key whose fields say another version (hand-copied file).
    key = keys.record_key(cur)
    path = store.user_store().path
    data = json.loads(path.read_text())
    data["records"][key] = {"fields": {**cur, "generator": "old"}, "config": {"BLOCK_M": 16}}
    path.write_text(json.dumps(data))
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg) is None
    # The current version's record is found.
    store.user_store().put({"fields": cur, "config": {"BLOCK_M": 128}})
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg)["BLOCK_M"] == 128


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        '{"format": "nsa-dsl-tuning/1"}',
        '{"format": "other/9", "records": {}}',
        "\x00\x01",
    ],
)
def test_corrupt_file_reported_and_ignored(content, caplog):
    path = store.user_store().path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="nsa_dsl.tuning"):
        assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=fake_registry()) is None
    assert any("tuning cache" in r.getMessage() for r in caplog.records)
    # Writing afterwards works and leaves a valid file; the corrupt one is kept aside.
    rec = _record(SPEC, "fake_fwd", 1000, 1, H100, {"BLOCK_M": 64})
    store.user_store().put(rec)
    assert json.loads(path.read_text())["format"] == store.FORMAT
    assert path.with_name(path.name + ".corrupt").exists()
    got = tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=fake_registry())
    assert got["BLOCK_M"] == 64


def test_bad_record_inside_good_file_is_skipped(caplog):
    path = store.user_store().path
    good = _record(SPEC, "fake_fwd", 1000, 1, H100, {"BLOCK_M": 64})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "format": store.FORMAT,
                "records": {keys.record_key(good["fields"]): good, "junk": {"config": 3}},
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="nsa_dsl.tuning"):
        recs = store.user_store().load()
    assert list(recs) == [keys.record_key(good["fields"])]
    assert any("junk" in r.getMessage() for r in caplog.records)


def test_concurrent_writers_keep_valid_json(tmp_path):
    from nsa_dsl.tuning.testing import write_records_worker

    path = str(tmp_path / "shared" / "records.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_records_worker, args=(path, r, 12)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    data = json.loads(open(path).read())
    recs = data["records"]
    assert len(recs) == 4 * 12  # no lost update
    assert {(r["config"]["rank"], r["config"]["i"]) for r in recs.values()} == {
        (r, i) for r in range(4) for i in range(12)
    }


# ---- lookup order -----------------------------------------------------------------------------------


def _write_shipped(records, name="h100.json"):
    d = store.SHIPPED_DIR
    st = store.RecordStore(d / name)
    st.put_many(records)


def test_lookup_order_memory_user_shipped_none():
    reg = fake_registry()
    kw = dict(T=3000, B=1, limits=H100, registry=reg)
    assert tuning.lookup(SPEC, "fake_fwd", **kw) is None  # nothing anywhere
    shipped_cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1, "schedule": "group"}
    f = keys.key_fields(SPEC, "fake_fwd", T=3000, B=1, limits=H100)
    _write_shipped([{"fields": {**f, "triton": "3.6.0", "torch": "2.11"}, "config": shipped_cfg}])
    assert tuning.lookup(SPEC, "fake_fwd", **kw) == shipped_cfg  # shipped (versions not compared)
    tuning.clear_memory()
    user_cfg = {**shipped_cfg, "BLOCK_M": 128, "BLOCK_N": 16}
    store.user_store().put({"fields": f, "config": user_cfg})
    assert tuning.lookup(SPEC, "fake_fwd", **kw) == user_cfg  # user cache beats shipped
    # Memory beats the files: change the file behind the tuner's back.
    store.user_store().put({"fields": f, "config": {**user_cfg, "BLOCK_M": 64}})
    assert tuning.lookup(SPEC, "fake_fwd", **kw) == user_cfg
    tuning.clear_memory()
    assert tuning.lookup(SPEC, "fake_fwd", **kw)["BLOCK_M"] == 64


def test_shipped_match_rules():
    reg = fake_registry()
    base = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1, "schedule": "group"}
    f8 = keys.key_fields(SPEC, "fake_fwd", T=8192, B=1, limits=H100)
    f32 = keys.key_fields(SPEC, "fake_fwd", T=32768, B=1, limits=H100)
    h200 = keys.key_fields(SPEC, "fake_fwd", T=16384, B=1, limits=_Limits(name="NVIDIA H200"))
    a100 = keys.key_fields(SPEC, "fake_fwd", T=16384, B=1, limits=_Limits(name="A100", capability=(8, 0)))
    bad = keys.key_fields(SPEC, "fake_fwd", T=16384, B=2, limits=H100)
    _write_shipped(
        [
            {"fields": f8, "config": {**base, "BLOCK_M": 16}},
            {"fields": f32, "config": {**base, "BLOCK_M": 64}},
            {"fields": h200, "config": {**base, "BLOCK_M": 128, "BLOCK_N": 16}},
            {"fields": a100, "config": {**base, "num_warps": 8}},
            {"fields": bad, "config": {**base, "BLOCK_N": 64, "BLOCK_M": 128}},  # invalid (check) and other B
        ]
    )
    look = lambda T, lim=H100, B=1: tuning.lookup(SPEC, "fake_fwd", T=T, B=B, limits=lim, registry=reg)  # noqa: E731
    assert look(8192)["BLOCK_M"] == 16
    tuning.clear_memory()
    assert look(16384)["BLOCK_M"] == 16  # same GPU preferred; nearest bucket, tie -> smaller
    assert look(40000)["BLOCK_M"] == 64
    assert look(16384, _Limits(name="NVIDIA H200"))["BLOCK_M"] == 128  # exact GPU name
    assert look(16384, _Limits(name="NVIDIA GH200"))["BLOCK_M"] == 128  # same capability, nearest T
    assert look(16384, _Limits(name="A100", capability=(8, 0)))["num_warps"] == 8
    assert look(16384, _Limits(name="X", capability=(10, 0))) is None  # other architecture
    assert look(16384, B=2) is None  # the only B=2 record fails KernelDef.check


def test_autotune_env_tunes_on_lookup(monkeypatch):
    import nsa_dsl.tuning.search as search
    from nsa_dsl.tuning.testing import FakeTarget, fake_time
    from nsa_dsl.tuning.timing import FakeTimer

    calls = []
    real = search.tune_kernel

    def fake_tune(spec, kernel, **kw):
        calls.append(kernel)
        kw.update(timer=FakeTimer(fake_time), target=FakeTarget(), trials=6, confirm=0)
        return real(spec, kernel, **kw)

    monkeypatch.setattr(search, "tune_kernel", fake_tune)
    reg = fake_registry()
    assert tuning.lookup(SPEC, "fake_fwd", T=100, B=1, limits=H100, registry=reg) is None
    assert calls == []  # nothing tuned implicitly
    monkeypatch.setenv("NSA_DSL_AUTOTUNE", "1")
    cfg = tuning.lookup(SPEC, "fake_fwd", T=100, B=1, limits=H100, registry=reg)
    assert calls == ["fake_fwd"] and cfg is not None
    tuning.clear_memory()
    assert tuning.lookup(SPEC, "fake_fwd", T=100, B=1, limits=H100, registry=reg) == cfg  # now from the file
    assert calls == ["fake_fwd"]


def test_export_import_roundtrip(tmp_path, monkeypatch):
    recs = [_record(SPEC, "fake_fwd", t, 1, H100, {"BLOCK_M": t // 64}) for t in (1024, 2048, 4096)]
    store.user_store().put_many(recs)
    out = tmp_path / "export.json"
    assert tuning.export_records(out) == 3
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "other_machine"))
    tuning.clear_memory()
    assert store.user_store().load() == {}
    assert tuning.import_records(out) == 3
    got = tuning.lookup(SPEC, "fake_fwd", T=2048, B=1, limits=H100, registry=fake_registry())
    assert got == {**FakeKernelDef().default(SPEC, H100), "BLOCK_M": 32}  # merged over the default
    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    with pytest.raises(ValueError, match="not a tuning-records file"):
        tuning.import_records(bad)


def test_stale_record_with_unknown_or_invalid_params_is_ignored():
    reg = fake_registry()
    f = keys.key_fields(SPEC, "fake_fwd", T=1000, B=1, limits=H100)
    store.user_store().put({"fields": f, "config": {"BLOCK_M": 64, "OLD_PARAM": 3}})
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg) is None
    store.user_store().put({"fields": f, "config": {"BLOCK_M": 128, "BLOCK_N": 64}})  # fails check()
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg) is None
    # shipped: the best-ranked record is stale, the next one is used
    base = FakeKernelDef().default(SPEC, H100)
    f8 = keys.key_fields(SPEC, "fake_fwd", T=8192, B=1, limits=H100)
    f16 = keys.key_fields(SPEC, "fake_fwd", T=16384, B=1, limits=H100)
    _write_shipped(
        [{"fields": f8, "config": {**base, "GONE": 1}}, {"fields": f16, "config": {**base, "BLOCK_M": 16}}]
    )
    assert tuning.lookup(SPEC, "fake_fwd", T=8192, B=1, limits=H100, registry=reg)["BLOCK_M"] == 16


def test_record_tuned_against_another_default_is_ignored():
    """When the kernel's default changes (the kernel changed), an old winner must not hide the new default."""
    reg = fake_registry()
    base = FakeKernelDef().default(SPEC, H100)
    f = keys.key_fields(SPEC, "fake_fwd", T=1000, B=1, limits=H100)
    old_default = {**base, "num_warps": 8}
    store.user_store().put({"fields": f, "config": {**base, "BLOCK_M": 32}, "default_config": old_default})
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg) is None
    store.user_store().put({"fields": f, "config": {**base, "BLOCK_M": 32}, "default_config": base})
    assert tuning.lookup(SPEC, "fake_fwd", T=1000, B=1, limits=H100, registry=reg)["BLOCK_M"] == 32


def test_shipped_configs_in_the_package(monkeypatch):
    """The configs shipped in nsa_dsl/tuning/configs parse, and are found for their GPU (and for another GPU
    of the same architecture) unless the kernel's default changed since they were tuned."""
    from pathlib import Path

    plan = pytest.importorskip("nsa_dsl.codegen.plan")
    import nsa_dsl.tuning as tuning_pkg

    folder = Path(tuning_pkg.__file__).resolve().parent / "configs"
    monkeypatch.setattr(store, "SHIPPED_DIR", folder)
    recs = store.shipped_records()
    if not recs:
        pytest.skip("no shipped configs")
    from nsa_dsl.tuning.schedules import schedule_defs

    reg = {**plan.all_kernels(), **schedule_defs()}
    found = 0
    for key, rec in recs.items():
        f = rec["fields"]
        spec = next(
            (
                load_spec(n)
                for n in ("nsa_paper", "small_group", "fla_compat")
                if load_spec(n).hash == f["spec_hash"]
            ),
            None,
        )
        assert spec is not None, key
        for name in (f["gpu"], "some other sm90 card"):
            lim = plan.DeviceLimits(
                name=name,
                capability=tuple(int(x) for x in f["capability"].split(".")),
                sm_count=f["sm_count"],
                smem_per_block=232448,
            )
            tuning.clear_memory()
            got = tuning.lookup(spec, f["kernel"], T=f["T_bucket"], B=f["B_bucket"], limits=lim)
            kd = reg[f["kernel"]]
            if rec.get("default_config") != kd.default(spec, lim):
                assert got is None, key  # stale by design: the kernel's default changed since tuning
                continue
            assert got == {**kd.default(spec, lim), **rec["config"]}, key
            found += 1
    if not found:
        pytest.skip("every shipped record is stale (kernel defaults changed): re-tune (bench_tuning.py)")
