"""One rank of the distributed tests (tests/test_distributed.py runs it in 1 or 2 processes).

Usage: ``python tests/_distributed_worker.py OUT`` with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) for a world of 2, or none for a world of 1.
Everything is written under ``OUT``; rank 0 writes ``OUT/result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from diffusolve.bench.distributed import open_store, run_jobs_distributed  # noqa: E402
from diffusolve.bench.runner import Job, strip_timing  # noqa: E402
from diffusolve.distributed import (  # noqa: E402
    GaussianMoments,
    StreamingProjections,
    init,
    read_shards,
    sample_shards,
)
from diffusolve.models import GaussianMixture  # noqa: E402
from diffusolve.process import vp_linear  # noqa: E402

N, SHARD, BATCH = 21, 4, 2  # 6 shards, the last one short; batches of 2 inside a shard


def mixture() -> GaussianMixture:
    return GaussianMixture.random(8, 4, process=vp_linear(), seed=3)


def bench_jobs(store, n: int):
    """``n`` independent jobs, then one built from their records (as a settings search's
    final run is): it must see every rank's records."""
    for i in range(n):
        yield Job(
            {"phase": "try", "i": i},
            lambda s, i=i: {"value": (7 * i) % 5 + 0.1 * i, "timing": {"x": 0.5}},
        )
    best = max(store.select(phase="try"), key=lambda r: r["value"])

    def final(s, best=best):
        assert s.get({"phase": "try", "i": best["i"]}) is not None
        return {"best": best["i"], "n_seen": len(s.records)}

    yield Job({"phase": "final", "i": -1}, final)


def main(out: Path) -> None:
    ctx = init()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"world": ctx.world}
    model = mixture()
    for solver in ("ddim", "ddpm"):  # deterministic and stochastic
        r = sample_shards(
            model,
            out / f"gmm-{solver}",
            n=N,
            shape=(8,),
            steps=6,
            solver=solver,
            seed=11,
            shard_size=SHARD,
            batch_size=BATCH,
            ctx=ctx,
        )
        result[solver] = {"checksum": r.checksum, "written": r.written}

    from diffusolve.models import load

    digits = load("digits")
    r = sample_shards(
        digits,
        out / "digits",
        n=6,
        shape=(1, 16, 16),
        steps=3,
        solver="ddpm",
        shard_size=2,
        cond_of=lambda idx: idx % 10,
        ctx=ctx,
    )
    result["digits"] = {"checksum": r.checksum}

    # resume: a run stopped after one shard per rank, then the same run again
    kw = dict(n=N, shape=(8,), steps=6, solver="ddpm", seed=11, shard_size=SHARD, ctx=ctx)
    kw["batch_size"] = BATCH
    first = sample_shards(model, out / "resume", max_new_shards=1, **kw)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "resume").glob("shard-*")}
    second = sample_shards(model, out / "resume", **kw)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "resume").glob("shard-*")}
    result["resume"] = {
        "first_written": first.written,
        "first_pending": first.pending,
        "second_written": second.written,
        "second_skipped": second.skipped,
        "untouched": all(kept[k] == v for k, v in stamps.items()),
        "checksum": second.checksum,
    }

    # streaming statistics of this rank's shards, reduced over the ranks
    moments, proj = GaussianMoments(8), StreamingProjections(8, 32, seed=1)
    for _, t in read_shards(out / "gmm-ddpm", ctx=ctx):
        moments.update(t["samples"])
        proj.update(t["samples"])
    total, everyone = moments.reduce(ctx), proj.gather(ctx)
    result["moments"] = {
        "count": total.count,
        "total": total.total.tolist(),
        "outer": total.outer.tolist(),
        "sw_rows": int(len(everyone.values())),
    }
    result["projections"] = sorted(map(list, everyone.values().tolist()))

    # bench jobs over the ranks, then a resumed run with more jobs
    rec = out / "records.jsonl"
    store = open_store(rec, bench="t", key_fields=("phase", "i"), config={"s": 1}, ctx=ctx)
    n_run = run_jobs_distributed(bench_jobs(store, 5), store, ctx=ctx)
    store2 = open_store(
        rec, bench="t", key_fields=("phase", "i"), config={"s": 1}, mode="resume", ctx=ctx
    )
    n_run2 = run_jobs_distributed(
        (j for j in [Job({"phase": "more", "i": 0}, lambda s: {"v": 1})]), store2, ctx=ctx
    )
    result["runner"] = {
        "counts": [list(n_run), list(n_run2)],
        "records": [strip_timing(r) for r in store2.records],
    }
    if ctx.is_main:
        (out / "result.json").write_text(json.dumps(result))
    if ctx.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
