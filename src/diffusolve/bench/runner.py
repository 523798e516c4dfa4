"""A resumable bench runner: jobs with keys, one JSON line per finished job.

Every bench is a sequence of :class:`Job` s. A job has a **key** (a small JSON-able dict,
for example ``bench, phase, task, library, method, nfe, setting``) and a function that
returns the job's result fields. :func:`run_jobs` runs the jobs in order and appends each
record (``key + result``) to a JSONL file as soon as it finishes (one line, flushed and
fsynced), so an interrupted run loses at most the job that was running. With
``mode="resume"`` the file's records are loaded first and every job whose key is already
there is skipped: a resumed run ends with the same records as an uninterrupted one.

Records must be deterministic given the run's configuration; the only field allowed to
differ between two runs is :data:`TIMING` (a dict of wall times and the like), which is
never part of a key. The file's first line is a header ``{"header": {...}}`` with the
bench name, the key fields and the configuration; resuming with another configuration is
refused.

Jobs may be produced lazily (a generator): the runner finishes job ``k`` (its record is in
the store) before it asks for job ``k + 1``, so a later job -- a settings search's final
run, say -- can be built from earlier records (:meth:`RecordStore.get`).

Example:
    >>> from diffusolve.bench.runner import Job, RecordStore, run_jobs
    >>> store = RecordStore(None, bench="demo", key_fields=("x",))
    >>> run_jobs([Job({"x": i}, lambda s, i=i: {"y": i * i}) for i in range(3)], store)
    (3, 0)
    >>> [r["y"] for r in store.records]
    [0, 1, 4]
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TIMING",
    "Job",
    "RecordStore",
    "RecordsExistError",
    "run_jobs",
    "strip_timing",
    "key_id",
]

#: the one record field that may differ between two runs of the same jobs (wall times)
TIMING = "timing"
MODES = ("new", "resume", "overwrite")


class RecordsExistError(FileExistsError):
    """A records file exists and the run neither resumes nor overwrites it."""


def key_id(key: dict[str, Any], fields: Sequence[str]) -> str:
    """Canonical text of a key (the fields in ``fields``; nested dicts sorted)."""
    return json.dumps({f: key.get(f) for f in fields}, sort_keys=True, default=str)


def strip_timing(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its :data:`TIMING` field (what must match between runs)."""
    return {k: v for k, v in record.items() if k != TIMING}


@dataclass
class Job:
    """One unit of bench work.

    Attributes:
        key: identifies the record (JSON-able; the store's ``key_fields`` are used).
        run: ``run(store) -> result fields`` (a dict; its optional :data:`TIMING` dict is
            merged with the runner's own timing).
        label: text for progress displays.
    """

    key: dict[str, Any]
    run: Callable[[RecordStore], dict[str, Any]]
    label: str = ""


class RecordStore:
    """The records of one bench run, in memory and appended to a JSONL file.

    Args:
        path: the JSONL file, or ``None`` to keep records in memory only.
        bench: the bench name (written to the header, checked on resume).
        key_fields: the record fields that make up a key.
        config: everything that changes the records' values (seed, sample counts, ...);
            a resumed file must have been written with the same configuration.
        mode: ``"new"`` (refuse an existing file), ``"resume"`` (load it and continue) or
            ``"overwrite"`` (start the file afresh).

    Raises:
        RecordsExistError: ``mode="new"`` and ``path`` exists.
        ValueError: on resume, the file belongs to another bench or configuration, or is
            not a records file.
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        bench: str,
        key_fields: Sequence[str],
        config: dict[str, Any] | None = None,
        mode: str = "new",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.path = None if path is None else Path(path)
        self.key_fields = tuple(key_fields)
        self.header = {
            "bench": bench,
            "key_fields": list(self.key_fields),
            "config": json.loads(json.dumps(config or {}, default=str)),
        }
        self.records: list[dict[str, Any]] = []
        self._index: dict[str, dict[str, Any]] = {}
        self.loaded = 0
        #: called before a query that may miss: ``fetch(key_id)`` before :meth:`get` of an
        #: absent key, ``fetch(None)`` before :meth:`select`. ``diffusolve.distributed``
        #: sets it to wait for records that other ranks are still producing.
        self.fetch: Callable[[str | None], None] | None = None
        if self.path is None:
            return
        exists = self.path.exists()
        if exists and mode == "new":
            raise RecordsExistError(
                f"records file {self.path} already exists: pass --resume to continue that run "
                "or --force to start it over"
            )
        if exists and mode == "resume":
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(json.dumps({"header": self.header}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------ file
    def _load(self) -> None:
        assert self.path is not None
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        good = 0  # bytes of complete, parsable lines
        parsed: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            if i == len(lines) - 1:
                break  # text after the last newline: a line cut by a kill, dropped
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 2 and not lines[-1]:
                    break  # an unparsable last line: cut by a kill, dropped
                raise ValueError(
                    f"{self.path}: line {i + 1} is not JSON; not a records file of this bench"
                ) from None
            parsed.append(obj)
            good += len(line) + 1
        if not parsed or "header" not in parsed[0]:
            raise ValueError(f"{self.path} has no records header; not a records file")
        header = parsed[0]["header"]
        if header.get("bench") != self.header["bench"]:
            raise ValueError(
                f"{self.path} holds records of bench {header.get('bench')!r}, not "
                f"{self.header['bench']!r}: choose another --records path"
            )
        old, new = header.get("config", {}), self.header["config"]
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                raise ValueError(
                    f"{self.path} was written with {k}={old.get(k)!r}, this run has "
                    f"{k}={new.get(k)!r}: resume with the same options, or pass --force to "
                    "start over"
                )
        if tuple(header.get("key_fields", ())) != self.key_fields:
            raise ValueError(f"{self.path} uses other key fields {header.get('key_fields')}")
        for rec in parsed[1:]:
            self._add(rec)
        self.loaded = len(self.records)
        if good != len(raw):  # drop a partial last line before appending
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._index[key_id(record, self.key_fields)] = record

    def append(self, record: dict[str, Any], *, write: bool = True) -> None:
        """Add a record; with a file (and ``write``), write it as one line, flushed and
        fsynced. ``write=False`` keeps it in memory only (another process writes it)."""
        if self.path is not None and write:
            self.write_line(record)
        self._add(record)

    def write_line(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the file as one line, flushed and fsynced (not added)."""
        assert self.path is not None
        line = json.dumps(record, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ queries
    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The record with this key, or ``None``."""
        kid = key_id(key, self.key_fields)
        if kid not in self._index and self.fetch is not None:
            self.fetch(kid)
        return self._index.get(kid)

    def __contains__(self, key: dict[str, Any]) -> bool:
        return self.get(key) is not None

    def select(self, **fields: Any) -> list[dict[str, Any]]:
        """Records whose fields equal ``fields`` (in file order)."""
        if self.fetch is not None:
            self.fetch(None)
        return [r for r in self.records if all(r.get(k) == v for k, v in fields.items())]


def _finite(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


def run_jobs(
    jobs: Iterable[Job],
    store: RecordStore,
    *,
    on_record: Callable[[Job, dict[str, Any], bool], None] | None = None,
) -> tuple[int, int]:
    """Run ``jobs`` in order, skipping those whose key is in ``store``.

    Each finished job's record ``{**key, **result, "timing": {..., "seconds": ...}}`` is
    appended to the store before the next job is asked for. ``on_record(job, record,
    skipped)`` is called after every job (run or skipped).

    Returns:
        ``(n_run, n_skipped)``.
    """
    n_run = n_skipped = 0
    for job in jobs:
        done = store.get(job.key)
        if done is not None:
            n_skipped += 1
            if on_record is not None:
                on_record(job, done, True)
            continue
        start = time.perf_counter()
        result = dict(job.run(store))
        timing = {k: _finite(v) for k, v in dict(result.pop(TIMING, None) or {}).items()}
        timing["seconds"] = round(time.perf_counter() - start, 6)
        record = {**job.key, **result, TIMING: timing}
        store.append(record)
        n_run += 1
        if on_record is not None:
            on_record(job, record, False)
    return n_run, n_skipped
