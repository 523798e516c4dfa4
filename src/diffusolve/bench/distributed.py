"""The bench runner across ranks: each rank runs its share of the jobs, rank 0 merges.

It lives in ``bench`` (not ``distributed``) because it extends the bench runner: the
``distributed`` package stays below ``bench`` and knows nothing of records. Every runner-based
bench (``samplers``, ``inverse``, ``inversion``, ``guidance``) opens its store with
:func:`open_store` and runs its jobs with :func:`run_jobs_distributed`, so it runs unchanged
under ``torchrun``; in a world of 1 both are the one-process runner exactly.

Every rank walks the same job sequence (the benches' job generators are deterministic).
The ``k``-th job not already in the records belongs to rank ``k % world`` (round-robin by job
index); its owner runs it and appends the record to its own JSONL part
(``<records>.parts/rank-<r>.jsonl``, one line, flushed and fsynced). A job generator may
build later jobs from earlier records (a settings search's final run): while the jobs run,
the store's ``get`` and ``select`` (through ``RecordStore.fetch``) wait for a job another
rank owns until its line appears in that rank's part (jobs only ever wait for earlier jobs,
so no rank waits for one that is waiting for it). At the end rank 0 appends
every new record to the records file in job order -- the file a one-process run writes, up
to :data:`~diffusolve.bench.runner.TIMING` -- and removes the parts. A killed run leaves
its parts; the next ``resume`` merges them first, so nothing finished is run twice.

The part files live next to the records file, so the ranks must share a filesystem (one
machine, or a shared disk across nodes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..distributed.context import DistContext, current
from .runner import TIMING, Job, RecordStore, _finite, key_id, run_jobs

__all__ = ["run_jobs_distributed", "open_store", "merge_parts"]


def _parts_dir(store: RecordStore, parts_dir: str | Path | None) -> Path:
    if parts_dir is not None:
        return Path(parts_dir)
    if getattr(store, "parts_dir", None) is not None:  # set by open_store
        return Path(store.parts_dir)  # type: ignore[attr-defined]
    if store.path is None:
        raise ValueError(
            "a records store in memory has no folder for the ranks' parts: pass parts_dir= "
            "(a folder every rank can read)"
        )
    return store.path.with_name(store.path.name + ".parts")


def _read_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` after byte ``offset``; returns them and the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    recs = [json.loads(line) for line in data[:end].split(b"\n") if line.strip()]
    return recs, offset + end


def merge_parts(store: RecordStore, parts_dir: str | Path) -> int:
    """Append the records of a previous run's parts that ``store`` lacks (in rank and file
    order) and delete the parts; returns the number added. Rank 0 only."""
    parts = Path(parts_dir)
    if not parts.is_dir():
        return 0
    added = 0
    for part in sorted(parts.glob("rank-*.jsonl")):
        recs, _ = _read_lines(part, 0)
        for rec in recs:
            if rec not in store:
                store.append(rec)
                added += 1
    for part in parts.glob("rank-*.jsonl"):
        part.unlink()
    parts.rmdir() if not any(parts.iterdir()) else None
    return added


def open_store(
    path: str | Path | None,
    *,
    bench: str,
    key_fields: tuple[str, ...],
    config: dict[str, Any] | None = None,
    mode: str = "new",
    ctx: DistContext | None = None,
) -> RecordStore:
    """A :class:`~diffusolve.bench.runner.RecordStore` on every rank: rank 0 opens the file
    (``mode`` as in the one-process runner: new, resume or overwrite) and, on resume, merges
    the parts a killed distributed run left; the other ranks get an in-memory copy of its
    records. An error of rank 0 (file exists, other configuration) is raised on every rank.
    """
    ctx = current() if ctx is None else ctx
    if ctx.world == 1:
        store = RecordStore(path, bench=bench, key_fields=key_fields, config=config, mode=mode)
        if path is not None and mode == "resume":  # a killed run of several ranks
            merge_parts(store, _parts_dir(store, None))
        return store
    store = None
    error = None
    if ctx.is_main:
        try:
            store = RecordStore(path, bench=bench, key_fields=key_fields, config=config, mode=mode)
            if path is not None and mode == "resume":
                merge_parts(store, _parts_dir(store, None))
        except (OSError, ValueError) as err:
            error = f"{type(err).__name__}\0{err}"
    error = ctx.broadcast_object(error)
    if error is not None:
        kind, _, text = error.partition("\0")
        raise (FileExistsError if "Exist" in kind else ValueError)(text)
    records = ctx.broadcast_object(store.records if store is not None else None)
    if store is None:
        store = RecordStore(None, bench=bench, key_fields=key_fields, config=config)
        for rec in records:
            store.append(rec)
    if path is not None:  # where run_jobs_distributed puts the ranks' parts, on every rank
        store.parts_dir = Path(path).with_name(Path(path).name + ".parts")  # type: ignore[attr-defined]
    return store


class _Exchange:
    """Reads the other ranks' parts into ``store`` (in memory) and waits for pending jobs;
    installed as ``store.fetch`` while the jobs run."""

    def __init__(
        self, store: RecordStore, parts: Path, ctx: DistContext, poll: float, timeout: float
    ):
        self.store, self.parts, self.ctx = store, parts, ctx
        self.poll, self.timeout = poll, timeout
        self.pending: dict[str, int] = {}  # key id -> owner rank, record not seen yet
        self._offsets = {r: 0 for r in range(ctx.world)}

    def part(self, rank: int) -> Path:
        return self.parts / f"rank-{rank}.jsonl"

    def _read(self, rank: int) -> None:
        recs, self._offsets[rank] = _read_lines(self.part(rank), self._offsets[rank])
        for rec in recs:
            k = key_id(rec, self.store.key_fields)
            self.pending.pop(k, None)
            if k not in self.store._index:
                self.store.append(rec, write=False)

    def fetch(self, kid: str | None) -> None:
        """Wait until the record of ``kid`` (``None``: of every pending job) is here."""
        keys = list(self.pending) if kid is None else [kid]
        start, delay = time.monotonic(), self.poll
        for k in keys:
            while k in self.pending:
                self._read(self.pending[k])
                if k not in self.pending:
                    break
                if time.monotonic() - start > self.timeout:
                    raise TimeoutError(
                        f"rank {self.ctx.rank} waited {self.timeout:.0f} s for job {k} of rank "
                        f"{self.pending[k]}; is that rank still running?"
                    )
                time.sleep(delay)
                delay = min(2 * delay, 0.5)

    def write(self, record: dict[str, Any]) -> None:
        """Append this rank's record to its part, then read it back like the others' (the
        same JSON round trip on every rank)."""
        with open(self.part(self.ctx.rank), "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._read(self.ctx.rank)


def run_jobs_distributed(
    jobs: Iterable[Job],
    store: RecordStore,
    *,
    ctx: DistContext | None = None,
    parts_dir: str | Path | None = None,
    on_record: Callable[[Job, dict[str, Any], bool], None] | None = None,
    poll: float = 0.02,
    timeout: float = 24 * 3600.0,
) -> tuple[int, int]:
    """:func:`~diffusolve.bench.runner.run_jobs` over the ranks of ``ctx``.

    Args:
        jobs: the same job sequence on every rank (a generator may read earlier records
            through ``store.get`` / ``store.select``: they wait for other ranks' records).
        store: the records (:func:`open_store`: rank 0's file, the others' copies).
        ctx: the distributed context (default: :func:`~diffusolve.distributed.current`).
            In a world of 1 this is :func:`run_jobs` exactly.
        parts_dir: where the ranks' JSONL parts go (default ``<records>.parts``; required
            for an in-memory store).
        on_record: ``on_record(job, record, skipped)`` for the jobs this rank ran or skipped.
        poll: first interval (s) between reads of another rank's part.
        timeout: how long a rank waits for another rank's record before giving up.

    Returns:
        ``(n_run, n_skipped)`` over all ranks; afterwards every rank's ``store`` holds every
        record in job order, and rank 0's records file has the new ones in job order.

    Example:
        >>> from diffusolve.bench.runner import Job, RecordStore
        >>> store = RecordStore(None, bench="demo", key_fields=("x",))
        >>> jobs = [Job({"x": i}, lambda s, i=i: {"y": i * i}) for i in range(3)]
        >>> run_jobs_distributed(jobs, store)
        (3, 0)
    """
    ctx = current() if ctx is None else ctx
    if ctx.world == 1:
        return run_jobs(jobs, store, on_record=on_record)
    parts = _parts_dir(store, parts_dir)
    parts.mkdir(parents=True, exist_ok=True)
    # a part left by a killed run was merged by open_store (resume) or is discarded
    (parts / f"rank-{ctx.rank}.jsonl").unlink(missing_ok=True)
    ctx.barrier()
    ex = _Exchange(store, parts, ctx, poll, timeout)
    n_before = len(store.records)
    before = {key_id(r, store.key_fields) for r in store.records}  # done by earlier runs
    order: dict[str, int] = {}  # key id -> position among this run's jobs
    n_skipped = 0
    store.fetch = ex.fetch
    try:
        for job in jobs:
            k = key_id(job.key, store.key_fields)
            done = store._index.get(k) if k in before else None
            if done is not None:
                n_skipped += 1
                if on_record is not None:
                    on_record(job, done, True)
                continue
            owner = ctx.owner(len(order))
            order[k] = len(order)
            if owner != ctx.rank:
                if k not in store._index:
                    ex.pending[k] = owner
                continue
            start = time.perf_counter()
            result = dict(job.run(store))
            timing = {k_: _finite(v) for k_, v in dict(result.pop(TIMING, None) or {}).items()}
            timing["seconds"] = round(time.perf_counter() - start, 6)
            ex.write({**job.key, **result, TIMING: timing})
            if on_record is not None:
                on_record(job, store._index[k], False)
        ex.fetch(None)
    finally:
        store.fetch = None
    ctx.barrier()  # every part is complete: every rank has every record
    new = sorted(store.records[n_before:], key=lambda r: order[key_id(r, store.key_fields)])
    store.records[n_before:] = new
    if ctx.is_main:
        if store.path is not None:
            for rec in new:
                store.write_line(rec)
        for p in parts.glob("rank-*.jsonl"):
            p.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()
    ctx.barrier()
    return len(order), n_skipped
