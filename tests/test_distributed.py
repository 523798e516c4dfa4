"""diffusolve.distributed: the same samples, statistics and bench records for any world size.

The two-process tests run ``tests/_distributed_worker.py`` as rank 0 and rank 1 of a gloo
group (torchrun's environment variables, set here) next to a one-process run of the same
script, all three at once, and compare what they wrote: shard checksums (bitwise equal
samples, deterministic and stochastic solvers, analytic mixture and the bundled network),
moments reduced over the ranks, gathered projections and merged bench records.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusolve.bench.distributed import open_store, run_jobs_distributed
from diffusolve.bench.runner import Job, RecordStore, run_jobs, strip_timing
from diffusolve.distributed import (
    ConfigMismatchError,
    GaussianMoments,
    StreamingProjections,
    read_shards,
    run_sharded,
    sample_shards,
    streaming_fd,
    tensor_sha256,
)
from diffusolve.metrics import sliced_wasserstein
from diffusolve.metrics.fd import frechet_distance

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The worker in a world of 1 and in a world of 2 (gloo), run concurrently."""
    base = tmp_path_factory.mktemp("dist")
    out = {1: base / "w1", 2: base / "w2"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out[1])], env=_env())]
    for rank in (0, 1):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out[2])], env=env))
    for p in procs:
        assert p.wait(timeout=300) == 0, "a worker failed (see its output above)"
    return out


def _result(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


def _all_samples(folder: Path) -> torch.Tensor:
    return torch.cat([t["samples"] for _, t in read_shards(folder)])


def test_samples_are_bitwise_the_same_for_one_and_two_processes(runs) -> None:
    one, two = _result(runs[1]), _result(runs[2])
    assert (one["world"], two["world"]) == (1, 2)
    for what in ("ddim", "ddpm", "digits"):  # deterministic, stochastic, the bundled UNet
        assert one[what]["checksum"] == two[what]["checksum"] is not None, what
    # world 2 wrote shard s on rank s % 2; the union is the same tensor, bit for bit
    a, b = _all_samples(runs[1] / "gmm-ddpm"), _all_samples(runs[2] / "gmm-ddpm")
    assert a.shape == (21, 8) and torch.equal(a, b)
    # and sample i is sample i of an unsharded run with seed + i (stochastic steps too)
    manifest = json.loads((runs[1] / "gmm-ddpm" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["seed"] == 11
    assert [s["stop"] - s["start"] for s in manifest["shards"]] == [4, 4, 4, 4, 4, 1]


def test_stopped_two_process_run_resumes_without_rewriting(runs) -> None:
    res = _result(runs[2])["resume"]
    assert res["first_written"] == [0, 1] and res["first_pending"] == [2, 3, 4, 5]
    assert res["second_skipped"] == [0, 1] and res["second_written"] == [2, 3, 4, 5]
    assert res["untouched"]  # the finished shards were not written again
    assert res["checksum"] == _result(runs[1])["ddpm"]["checksum"]


def test_moments_reduced_over_ranks_give_the_in_memory_fd_and_sw(runs) -> None:
    x = _all_samples(runs[1] / "gmm-ddpm").double().numpy()
    ref = _all_samples(runs[1] / "gmm-ddim").double().numpy()
    m = _result(runs[2])["moments"]
    f64 = torch.float64
    reduced = GaussianMoments(
        8, m["count"], torch.tensor(m["total"], dtype=f64), torch.tensor(m["outer"], dtype=f64)
    )
    assert reduced.count == 21
    np.testing.assert_allclose(reduced.mean.numpy(), x.mean(0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(reduced.cov.numpy(), np.cov(x, rowvar=False), atol=1e-13)
    in_memory = frechet_distance(x, ref)
    streamed = reduced.frechet_distance(GaussianMoments(8).update(ref))
    assert streamed == pytest.approx(in_memory, rel=1e-10)
    # the gathered projections are every sample's projections: SW equals the in-memory one
    proj = StreamingProjections(8, 32, seed=1)
    proj.parts = [np.array(_result(runs[2])["projections"])]
    other = StreamingProjections(8, 32, seed=1).update(ref)
    sw = sliced_wasserstein(x, ref, n_projections=32, seed=1)
    assert proj.sliced_wasserstein(other) == pytest.approx(sw, rel=1e-12)


def test_two_process_bench_records_equal_one_process_records(runs) -> None:
    one, two = _result(runs[1])["runner"], _result(runs[2])["runner"]
    assert one["counts"] == two["counts"] == [[6, 0], [1, 0]]
    assert one["records"] == two["records"]
    final = [r for r in two["records"] if r["phase"] == "final"]
    assert final == [{"phase": "final", "i": -1, "best": 2, "n_seen": 5}]  # saw both ranks
    lines = [(runs[w] / "records.jsonl").read_text().splitlines() for w in (1, 2)]
    assert lines[0][0] == lines[1][0]  # same header
    recs = [[strip_timing(json.loads(s)) for s in ls[1:]] for ls in lines]
    assert recs[0] == recs[1] and len(recs[0]) == 7  # same records, same order
    assert not (runs[2] / "records.jsonl.parts").exists()  # parts merged and removed


# ------------------------------------------------------------------ one process


def _produce(start: int, stop: int) -> dict[str, torch.Tensor]:
    seeds = range(start, stop)
    x = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return {"samples": x}


def test_resume_keeps_finished_shards_and_rewrites_missing_or_corrupt_ones(tmp_path) -> None:
    whole = run_sharded(tmp_path / "whole", _produce, n=10, shard_size=3)
    out = tmp_path / "run"
    first = run_sharded(out, _produce, n=10, shard_size=3, max_new_shards=2)
    assert first.written == [0, 1] and first.pending == [2, 3] and first.checksum is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    stamp = (out / "shard-000000.safetensors").stat().st_mtime_ns
    (out / "shard-000002.safetensors.tmp-999").write_bytes(b"half a shard")  # killed writer
    bad = out / "shard-000001.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the data: its checksum no longer matches
    bad.write_bytes(bytes(raw))
    second = run_sharded(out, _produce, n=10, shard_size=3)
    assert second.skipped == [0] and second.written == [1, 2, 3]
    assert (out / "shard-000000.safetensors").stat().st_mtime_ns == stamp
    assert not list(out.glob("*.tmp-*"))
    assert second.checksum == whole.checksum
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["checksum"] == whole.checksum
    assert [s["sha256"] for s in manifest["shards"]] == [whole.checksums[s] for s in range(4)]
    x = _all_samples(out)
    assert torch.equal(x, _produce(0, 10)["samples"])
    assert tensor_sha256({"samples": x[:3], "index": torch.arange(3)}) == whole.checksums[0]


def test_other_configuration_or_foreign_files_are_refused_without_force(tmp_path) -> None:
    from diffusolve.models import Gaussian
    from diffusolve.process import vp_linear

    model = Gaussian(torch.zeros(2), torch.ones(2), process=vp_linear())
    kw = dict(n=5, shape=(2,), steps=3, solver="ddpm", shard_size=2)
    out = tmp_path / "a"
    first = sample_shards(model, out, seed=0, **kw)
    with pytest.raises(ConfigMismatchError, match=r"seed: 0 there, 1 now.*--force"):
        sample_shards(model, out, seed=1, **kw)
    with pytest.raises(ConfigMismatchError, match="shard_size"):
        sample_shards(model, out, seed=0, **{**kw, "shard_size": 3})
    assert sample_shards(model, out, seed=0, **kw).skipped == [0, 1, 2]  # still resumable
    forced = sample_shards(model, out, seed=1, force=True, **kw)
    assert forced.written == [0, 1, 2] and forced.checksum != first.checksum
    user = tmp_path / "b"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        sample_shards(model, user, **kw)
    sample_shards(model, user, force=True, **kw)
    assert (user / "notes.txt").read_text() == "mine"  # force never deletes foreign files


def test_streaming_fd_of_digits_features_equals_in_memory_fd(tmp_path) -> None:
    from diffusolve.models import digits_features
    from diffusolve.models.data import load_digits

    held, _ = load_digits("heldout")
    train, _ = load_digits("train")

    def produce(start, stop):
        return {"samples": held[start:stop]}

    run_sharded(tmp_path, produce, n=len(held), shard_size=64)
    per_shard = [digits_features(t["samples"]) for _, t in read_shards(tmp_path)]
    ref = digits_features(train[:500])
    fd, moments = streaming_fd(
        lambda: (t["samples"] for _, t in read_shards(tmp_path)),
        digits_features,
        GaussianMoments(64).update(ref),
    )
    assert moments.count == len(held)
    assert fd == pytest.approx(frechet_distance(torch.cat(per_shard), ref), rel=1e-9)
    assert fd > 0.0


def test_merge_parts_of_a_killed_distributed_run(tmp_path) -> None:
    """A killed run of several ranks leaves its parts; a resume (any world size) merges them
    so those jobs are not run again."""
    rec = tmp_path / "records.jsonl"
    RecordStore(rec, bench="t", key_fields=("i",), config={})
    parts = tmp_path / "records.jsonl.parts"
    parts.mkdir()
    (parts / "rank-1.jsonl").write_text(json.dumps({"i": 1, "y": 1, "timing": {}}) + "\n{")
    ran = []

    def job(i):
        return Job({"i": i}, lambda s, i=i: ran.append(i) or {"y": i * i})

    store = open_store(rec, bench="t", key_fields=("i",), config={}, mode="resume")
    assert run_jobs_distributed([job(i) for i in range(3)], store) == (2, 1)
    assert ran == [0, 2] and not parts.exists()
    assert [strip_timing(r) for r in store.records] == [{"i": 1, "y": 1}] + [
        {"i": i, "y": i * i} for i in (0, 2)
    ]
    plain = RecordStore(None, bench="t", key_fields=("i",))
    run_jobs([job(i) for i in range(3)], plain)  # world 1: exactly run_jobs


def test_cli_sample_shards_resume_and_refusals(tmp_path, capsys) -> None:
    from diffusolve.cli import main

    out = tmp_path / "s"
    args = ["sample", "--n", "3", "--steps", "2", "--shard-size", "2", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "wrote 2 shards, kept 0" in first
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    assert (cfg["model"], cfg["solver"], cfg["labels"], cfg["n"]) == (
        "digits",
        "dpmpp_2m",
        "i % 10",
        3,
    )
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "wrote 0 shards, kept 2" in again and first.split()[-1] == again.split()[-1]
    assert main(args + ["--seed", "5"]) == 2
    assert "another configuration" in capsys.readouterr().err
    bad = ["sample", "--n", "3", "--shard-size", "2", "--out", str(tmp_path / "g.png")]
    assert main(bad) == 2
    assert "folder" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_cli_two_processes_equal_one_and_resume_after_kill(tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m diffusolve -- sample ...`` against one process, and
    a one-process run killed after its first shards, then rerun: same checksum."""
    import time

    torchrun = Path(sys.executable).with_name("torchrun")
    base = ["sample", "--n", "40", "--steps", "5", "--solver", "ddpm", "--shard-size", "4"]
    one = subprocess.run(
        [sys.executable, "-m", "diffusolve", *base, "--out", str(tmp_path / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "--module",
            "diffusolve",
            "--",
            *base,
            "--out",
            str(tmp_path / "two"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert one.stdout.split()[-1] == two.stdout.split()[-1]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffusolve", *base, "--out", str(out)], env=_env()
    )
    while len(list(out.glob("shard-*.safetensors"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    rerun = subprocess.run(
        [sys.executable, "-m", "diffusolve", *base, "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert rerun.stdout.split()[-1] == one.stdout.split()[-1]
    assert f"kept {len(done)}" in rerun.stdout
    assert all((out / k).stat().st_mtime_ns == v for k, v in done.items())
