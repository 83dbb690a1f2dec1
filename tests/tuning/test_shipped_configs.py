"""The tuning records shipped in the package (``nsa_dsl/tuning/configs/*.json``) are still usable.

A shipped record is silently skipped at lookup time when its kernel's default changed since it was tuned or
when the current generator rejects its config; this test turns that into a failure, so that a change of a
default or of a search space cannot leave stale records in the package unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import nsa_dsl.tuning as tuning
import pytest
from nsa_dsl.codegen.plan import DeviceLimits, all_kernels, get_kernel
from nsa_dsl.tuning import store

from nsa_dsl import load_spec

SHIPPED = sorted((Path(tuning.__file__).resolve().parent / "configs").glob("*.json"))
SPECS = {str(load_spec(name).hash): name for name in ("nsa_paper", "small_group", "fla_compat")}


def _limits(fields: dict) -> DeviceLimits:
    major, minor = (int(x) for x in str(fields["capability"]).split("."))
    return DeviceLimits(name=fields["gpu"], capability=(major, minor), sm_count=int(fields["sm_count"]),
                        smem_per_block=227 * 1024 if major >= 9 else 163 * 1024)


def _records():
    for path in SHIPPED:
        data = json.loads(path.read_text())
        assert data.get("format") == "nsa-dsl-tuning/1", path.name
        for key, rec in data["records"].items():
            yield pytest.param(path.name, key, rec, id=f"{path.stem}:{key.rsplit('-', 1)[0]}")


def test_shipped_files_exist_for_paper_and_small_group():
    names = {p.name for p in SHIPPED}
    assert {"nsa_paper_h200.json", "small_group_h200.json"} <= names


@pytest.mark.parametrize(("fname", "key", "rec"), list(_records()))
def test_shipped_record_is_usable(fname, key, rec):
    assert store.validate_record(rec) is None, key
    fields = rec["fields"]
    assert fields["spec_hash"] in SPECS, f"{key}: spec hash of no shipped spec"
    spec = load_spec(SPECS[fields["spec_hash"]])
    assert fname.startswith(SPECS[fields["spec_hash"]]), f"{key} is filed under {fname}"
    if fields["kernel"].startswith("schedule."):
        return
    kdef = get_kernel(fields["kernel"])
    limits = _limits(fields)
    assert rec.get("default_config") == dict(kdef.default(spec, limits)), (
        f"{key}: the kernel's default changed since this record was tuned (re-tune or drop it)"
    )
    usable = tuning._usable(dict(rec["config"]), kdef, spec, limits, "shipped", rec.get("default_config"))
    assert usable is not None, f"{key}: the current generator rejects the shipped config"


@pytest.mark.parametrize("spec_name", ["nsa_paper", "small_group", "fla_compat"])
def test_gpu_defaults_are_points_of_their_space(spec_name):
    """Each kernel's sm90 default sets every parameter its search space lists, to one of the listed values,
    so that the tuner's study starts from the default as a point of the space (a parameter that only a
    template fallback supplies, or a default value the space omits, would leave the default out of it)."""
    spec = load_spec(spec_name)
    h200 = DeviceLimits("NVIDIA H200", (9, 0), 132, 227 * 1024)
    for name, kd in all_kernels().items():
        if kd.enabled is not None and not kd.enabled(spec):
            continue
        space, default = kd.space(spec, h200), kd.default(spec, h200)
        missing = sorted(set(space) - set(default))
        assert not missing, f"{name}: default lacks {missing}"
        outside = {p: default[p] for p in space if default[p] not in space[p]}
        assert not outside, f"{name}: default values {outside} are not in the space"
