"""Sharded, resumable sample output: safetensors shards and a ``manifest.json``.

Samples ``0 .. n-1`` are cut into shards of ``shard_size`` consecutive indices; shard ``s``
belongs to rank ``s % world``. Inside a shard the samples are produced in batches of
``batch_size`` (fixed by the configuration, not by the world size), and sample ``i`` draws
everything random from its own seed, so each shard's bytes -- and the whole set -- are the
same for any number of processes.

Folder layout::

    DIR/manifest.json                  what was run, the shard list, checksums, status
    DIR/shard-000000.safetensors       "samples" [k, ...], "index" [k] (+ producer extras)

A shard is written to a temporary name and renamed (atomic on POSIX), so a killed job
leaves whole shards or none. Each shard carries in its metadata the configuration's hash,
its index range and the SHA-256 of its tensors; a restarted job keeps a shard only when all
three check out (and, once the manifest lists it, when its checksum equals the manifest's),
and writes the others. A folder holding a manifest of another configuration, or files that
are not ours, is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .context import DistContext, current

__all__ = [
    "ShardPlan",
    "ShardReport",
    "ConfigMismatchError",
    "run_sharded",
    "read_shards",
    "tensor_sha256",
    "MANIFEST",
    "FORMAT",
]

MANIFEST = "manifest.json"
FORMAT = "diffusolve-shards/1"
_PREFIX = "shard-"
_SUFFIX = ".safetensors"
_TMP = ".tmp-"


class ConfigMismatchError(ValueError):
    """The output folder holds shards of another configuration."""


@dataclass(frozen=True)
class ShardPlan:
    """``n`` samples in shards of ``shard_size`` consecutive indices (the last may be
    shorter).

    Example:
        >>> plan = ShardPlan(10, 4)
        >>> len(plan), [plan.range(s) for s in range(len(plan))]
        (3, [(0, 4), (4, 8), (8, 10)])
        >>> from diffusolve.distributed import DistContext
        >>> plan.owned(DistContext(rank=1, world=2, backend="gloo"))
        [1]
    """

    n: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")

    def __len__(self) -> int:
        return -(-self.n // self.shard_size)

    def range(self, shard: int) -> tuple[int, int]:
        """``(start, stop)`` indices of shard ``shard``."""
        if not 0 <= shard < len(self):
            raise IndexError(f"shard {shard} out of range [0, {len(self)})")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n)

    def owned(self, ctx: DistContext) -> list[int]:
        """The shards rank ``ctx.rank`` writes (round-robin)."""
        return [s for s in range(len(self)) if ctx.owns(s)]

    @staticmethod
    def name(shard: int) -> str:
        return f"{_PREFIX}{shard:06d}{_SUFFIX}"


@dataclass
class ShardReport:
    """What :func:`run_sharded` did (the same on every rank).

    Attributes:
        written: shards written by this run (all ranks), in order.
        skipped: shards found finished and verified.
        pending: shards not finished (a run stopped by ``max_new_shards``).
        checksums: shard -> SHA-256 of its tensors.
        checksum: SHA-256 of the shard checksums in order when every shard is done, else
            ``None``: equal checksums mean equal sample sets.
        manifest: the manifest's path.
    """

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    checksums: dict[int, str] = field(default_factory=dict)
    checksum: str | None = None
    manifest: Path | None = None


def tensor_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, names sorted): equal
    hashes mean bitwise equal tensors.

    Example:
        >>> a = {"x": torch.arange(4.0)}
        >>> tensor_sha256(a) == tensor_sha256({"x": torch.tensor([0.0, 1.0, 2.0, 3.0])})
        True
        >>> tensor_sha256(a) == tensor_sha256({"x": torch.arange(4.0).double()})
        False
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _combined(checksums: list[str]) -> str:
    return hashlib.sha256("\n".join(checksums).encode()).hexdigest()


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _verify(path: Path, shard: int, start: int, stop: int, config_hash: str) -> str | None:
    """The shard's checksum if ``path`` is a complete shard of this configuration, else
    ``None``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if (
        meta.get("config_sha256") != config_hash
        or meta.get("shard") != str(shard)
        or meta.get("range") != f"{start}:{stop}"
    ):
        return None
    digest = tensor_sha256(tensors)
    return digest if digest == meta.get("sha256") else None


def _write_shard(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # the writer makes a private file; shards are results to share
    os.replace(tmp, path)


def _ours(name: str) -> bool:
    return name == MANIFEST or name.startswith(_PREFIX) or name.startswith(MANIFEST + _TMP)


def _prepare(out: Path, manifest: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Rank 0's check of the folder; returns the previous manifest (same configuration) or
    ``None``. Raises on a folder it must not touch."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the shards")
    previous = None
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("format") != FORMAT:
            if not force:
                raise ConfigMismatchError(
                    f"{path} is not a diffusolve shard manifest; choose another --out, or pass "
                    "--force to replace it"
                )
        elif old.get("config") != manifest["config"]:
            if not force:
                a, b = old.get("config", {}), manifest["config"]
                diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                shown = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff)
                raise ConfigMismatchError(
                    f"{out} holds shards of another configuration ({shown}): rerun with the "
                    "same options to resume, choose another --out, or pass --force to discard "
                    "those shards"
                )
        else:
            previous = old
        if previous is None:  # forced: discard the other run's files (ours only)
            for p in out.iterdir():
                if _ours(p.name):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif out.is_dir() and not force:
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise FileExistsError(
                f"{out} already holds {shown} and no shard manifest; choose an empty or new "
                "--out, or pass --force to write the shards next to those files"
            )
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # temporary files of a killed run
        if _TMP in p.name and p.is_file():
            p.unlink()
    return previous


def run_sharded(
    out: str | Path,
    produce: Callable[[int, int], dict[str, Tensor]],
    *,
    n: int,
    shard_size: int,
    batch_size: int | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    ctx: DistContext | None = None,
    max_new_shards: int | None = None,
    on_shard: Callable[[int, str], None] | None = None,
) -> ShardReport:
    """Write samples ``0 .. n-1`` as safetensors shards under ``out`` with a manifest,
    resuming a previous run of the same configuration.

    Args:
        out: the output folder (created).
        produce: ``produce(start, stop) -> {"samples": Tensor [stop - start, ...], ...}``;
            every value has the batch first. It must make sample ``i`` from its own seed
            (e.g. ``seed + i``) so that a shard does not depend on which rank writes it.
        n: number of samples.
        shard_size: samples per shard (the last may be shorter).
        batch_size: ``produce`` is called on consecutive chunks of this size inside a
            shard (default: the whole shard). Part of the configuration: batch composition
            can change a network's float rounding.
        config: what was run (model, solver, options, seeds, ...): JSON-able; written to
            the manifest and compared on resume.
        force: discard shards of another configuration / write next to foreign files.
        ctx: the distributed context (default: :func:`~diffusolve.distributed.current`).
        max_new_shards: stop after this rank wrote that many shards (a time budget; tests
            use it to stop a run part-way).
        on_shard: ``on_shard(shard, "written" | "skipped")`` after each owned shard.

    Returns:
        A :class:`ShardReport`; rank 0 has also rewritten the manifest with the checksums.

    Raises:
        ConfigMismatchError: ``out`` holds shards of another configuration (no ``force``).
        FileExistsError: ``out`` holds other files and no manifest (no ``force``).

    Example:
        >>> import tempfile
        >>> def produce(start, stop):
        ...     return {"samples": torch.arange(start, stop, dtype=torch.float64)[:, None] ** 2}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = run_sharded(d, produce, n=10, shard_size=4, max_new_shards=2)
        ...     again = run_sharded(d, produce, n=10, shard_size=4)
        ...     x = torch.cat([t["samples"] for _, t in read_shards(d)])
        >>> first.written, first.pending, again.skipped, again.written
        ([0, 1], [2], [0, 1], [2])
        >>> x.flatten().tolist() == [float(i * i) for i in range(10)]
        True
    """
    ctx = current() if ctx is None else ctx
    out = Path(out).expanduser()
    plan = ShardPlan(n, shard_size)
    batch = shard_size if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    full_config = json.loads(
        json.dumps(
            {**(config or {}), "n": n, "shard_size": shard_size, "batch_size": batch},
            default=str,
        )
    )
    chash = _config_hash(full_config)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "config": full_config,
        "config_sha256": chash,
        "status": "running",
        "shards": [
            {"shard": s, "file": plan.name(s), "start": a, "stop": b, "sha256": None}
            for s in range(len(plan))
            for a, b in [plan.range(s)]
        ],
        "checksum": None,
    }

    # rank 0 checks the folder and writes the "running" manifest; the others wait for it
    error: str | None = None
    previous: dict[str, Any] | None = None
    if ctx.is_main:
        try:
            previous = _prepare(out, manifest, force)
            if previous is not None:  # keep the checksums already verified
                for entry, old in zip(manifest["shards"], previous.get("shards", []), strict=False):
                    entry["sha256"] = old.get("sha256")
            _write_json_atomic(out / MANIFEST, manifest)
        except (OSError, ValueError) as err:
            error = f"{type(err).__name__}\0{err}"
    error = ctx.broadcast_object(error)
    if error is not None:
        kind, _, text = error.partition("\0")
        exc = {"ConfigMismatchError": ConfigMismatchError, "FileExistsError": FileExistsError}
        raise exc.get(kind, ValueError)(text)
    manifest["shards"] = ctx.broadcast_object(manifest["shards"])

    mine: dict[int, tuple[str, str]] = {}  # shard -> (checksum, "written" | "skipped")
    new = 0
    for s in plan.owned(ctx):
        start, stop = plan.range(s)
        path = out / plan.name(s)
        digest = _verify(path, s, start, stop, chash)
        known = manifest["shards"][s]["sha256"]
        if digest is not None and (known is None or known == digest):
            mine[s] = (digest, "skipped")
        else:
            if max_new_shards is not None and new >= max_new_shards:
                continue
            parts = [produce(a, min(a + batch, stop)) for a in range(start, stop, batch)]
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
            if len(tensors["samples"]) != stop - start:
                raise ValueError(
                    f"produce({start}, {stop}) gave {len(tensors['samples'])} samples, "
                    f"expected {stop - start}"
                )
            digest = tensor_sha256(tensors)
            meta = {
                "config_sha256": chash,
                "shard": str(s),
                "range": f"{start}:{stop}",
                "sha256": digest,
            }
            _write_shard(path, tensors, meta)
            mine[s] = (digest, "written")
            new += 1
        if on_shard is not None:
            on_shard(s, mine[s][1])

    done: dict[int, tuple[str, str]] = {}
    for part in ctx.all_gather_object(mine):
        done.update(part)
    report = ShardReport(
        written=sorted(s for s, (_, how) in done.items() if how == "written"),
        skipped=sorted(s for s, (_, how) in done.items() if how == "skipped"),
        pending=[s for s in range(len(plan)) if s not in done],
        checksums={s: d for s, (d, _) in sorted(done.items())},
        manifest=out / MANIFEST,
    )
    if not report.pending:
        report.checksum = _combined([report.checksums[s] for s in range(len(plan))])
    if ctx.is_main:
        for entry in manifest["shards"]:
            entry["sha256"] = report.checksums.get(entry["shard"], entry["sha256"])
        manifest["status"] = "complete" if not report.pending else "running"
        manifest["checksum"] = report.checksum
        _write_json_atomic(out / MANIFEST, manifest)
    ctx.barrier()
    return report


def read_shards(
    out: str | Path, *, ctx: DistContext | None = None, verify: bool = True
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(shard, tensors)`` for the shards under ``out`` in index order -- with ``ctx``, only
    those rank ``ctx.rank`` owns -- one shard in memory at a time. With ``verify`` each
    shard's checksum is compared with the manifest's.

    Raises:
        ValueError: no manifest, a shard missing or not finished, or a checksum mismatch.
    """
    from safetensors.torch import load_file

    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise ValueError(f"{out} has no {MANIFEST}; write the shards first (diffusolve sample)")
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        s = entry["shard"]
        if ctx is not None and not ctx.owns(s):
            continue
        file = out / entry["file"]
        if entry.get("sha256") is None or not file.is_file():
            raise ValueError(f"shard {s} ({file}) is not finished: rerun the sampling to resume")
        tensors = load_file(str(file))
        if verify and tensor_sha256(tensors) != entry["sha256"]:
            raise ValueError(f"{file}: checksum differs from the manifest's; the file changed")
        yield s, tensors
