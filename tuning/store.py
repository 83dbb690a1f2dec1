"""Tuning records on disk: the user's cache file and the configs shipped in the package.

File format (both places)::

    {"format": "nsa-dsl-tuning/1", "records": {"<key>": {"fields": {...}, "config": {...}, ...}}}

The user cache lives at ``<cache_root>/tuning/records.json``. Writes are read-modify-write under a
``filelock.FileLock`` and land atomically (temporary file in the same folder + ``os.replace``), so concurrent
writers never leave a partial file. A corrupt file is reported with a logging warning and treated as empty
(and moved aside to ``records.json.corrupt`` on the next write); it is never fatal. Records whose fields
do not match the current ones (another triton/torch/generator version, another GPU) are simply not found.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from ._compat import tuning_dir
from .keys import record_key

__all__ = ["FORMAT", "RecordStore", "user_store", "shipped_records", "validate_record"]

log = logging.getLogger("nsa_dsl.tuning.store")

FORMAT = "nsa-dsl-tuning/1"
#: The configs shipped in the package (records in the same format).
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
_LOCK_TIMEOUT_S = 60.0


def validate_record(rec: Any) -> str | None:
    """Why ``rec`` is not a usable record (None = fine)."""
    if not isinstance(rec, dict):
        return f"record must be an object, got {type(rec).__name__}"
    if not isinstance(rec.get("fields"), dict):
        return "record.fields: missing or not an object"
    if not isinstance(rec.get("config"), dict):
        return "record.config: missing or not an object"
    for f in ("kernel", "T_bucket", "B_bucket", "spec_hash"):
        if f not in rec["fields"]:
            return f"record.fields.{f}: missing"
    return None


def _parse(text: str, where: str) -> dict[str, dict[str, Any]] | None:
    """Records of a file's text, or None (warning logged) if it is corrupt or of another format."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        log.warning("tuning cache %s is corrupt (%s at line %d); ignoring it", where, e.msg, e.lineno)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("records"), dict):
        log.warning("tuning cache %s is corrupt (no 'records' object); ignoring it", where)
        return None
    if data.get("format") != FORMAT:
        log.warning(
            "tuning cache %s has format %r, expected %r; ignoring it", where, data.get("format"), FORMAT
        )
        return None
    out: dict[str, dict[str, Any]] = {}
    for key, rec in data["records"].items():
        why = validate_record(rec)
        if why:
            log.warning("tuning cache %s: record %s ignored (%s)", where, key, why)
            continue
        out[str(key)] = rec
    return out


class RecordStore:
    """One JSON file of tuning records (see module doc). Safe for concurrent processes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._memo: tuple[tuple[int, int], dict[str, dict[str, Any]]] | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=_LOCK_TIMEOUT_S)

    def _read_unlocked(self) -> tuple[dict[str, dict[str, Any]], bool]:
        """(records, corrupt)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}, False
        stamp = (st.st_mtime_ns, st.st_size)
        if self._memo is not None and self._memo[0] == stamp:
            return dict(self._memo[1]), False
        try:
            text = self.path.read_text()
        except OSError as e:
            log.warning("tuning cache %s unreadable (%s); ignoring it", self.path, e)
            return {}, True
        recs = _parse(text, str(self.path))
        if recs is None:
            return {}, True
        self._memo = (stamp, recs)
        return dict(recs), False

    def load(self) -> dict[str, dict[str, Any]]:
        """All records (key -> record). A missing or corrupt file gives ``{}`` (corruption is logged)."""
        return self._read_unlocked()[0]

    def get(self, key: str, fields: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The record stored under ``key`` whose fields equal ``fields`` (when given), else None."""
        rec = self.load().get(key)
        if rec is None:
            return None
        if fields is not None and rec.get("fields") != fields:
            log.info("tuning record %s ignored: its fields differ from the current ones", key)
            return None
        return rec

    def put_many(self, records: Iterable[dict[str, Any]]) -> int:
        """Insert or replace records (keyed by their fields); returns how many were written."""
        recs = list(records)
        for r in recs:
            why = validate_record(r)
            if why:
                raise ValueError(f"record: {why}")
        with self._lock():
            current, corrupt = self._read_unlocked()
            if corrupt and self.path.exists():
                aside = self.path.with_name(self.path.name + ".corrupt")
                os.replace(self.path, aside)
                log.warning(
                    "tuning cache %s was corrupt; moved it to %s and started a new one", self.path, aside
                )
            for r in recs:
                current[record_key(r["fields"])] = r
            self._write_unlocked(current)
        return len(recs)

    def put(self, record: dict[str, Any]) -> str:
        """Insert or replace one record; returns its key."""
        self.put_many([record])
        return record_key(record["fields"])

    def _write_unlocked(self, records: dict[str, dict[str, Any]]) -> None:
        data = {"format": FORMAT, "records": {k: records[k] for k in sorted(records)}}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=str(self.path.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a cache file is as readable as any other
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._memo = None


_STORES: dict[str, RecordStore] = {}


def user_store() -> RecordStore:
    """The user's record file, ``<cache_root>/tuning/records.json`` (honours ``NSA_DSL_CACHE_DIR``). One
    instance per path, so that its parsed contents are reused until the file changes (mtime/size)."""
    path = tuning_dir() / "records.json"
    st = _STORES.get(str(path))
    if st is None:
        st = _STORES.setdefault(str(path), RecordStore(path))
    return st


def shipped_records(folder: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Records of the configs shipped in the package (``nsa_dsl.tuning/configs/*.json``), merged; files
    processed in name order (a later file wins on equal keys)."""
    folder = Path(SHIPPED_DIR if folder is None else folder)
    if not folder.is_dir():
        return {}
    files = sorted(folder.glob("*.json"))
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    hit = _SHIPPED_MEMO.get(str(folder))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out: dict[str, dict[str, Any]] = {}
    for p in files:
        try:
            recs = _parse(p.read_text(), str(p))
        except OSError as e:
            log.warning("shipped tuning configs %s unreadable (%s); ignoring them", p, e)
            continue
        if recs:
            out.update(recs)
    _SHIPPED_MEMO[str(folder)] = (stamp, out)
    return out


_SHIPPED_MEMO: dict[str, tuple[tuple, dict[str, dict[str, Any]]]] = {}
