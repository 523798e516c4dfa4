"""The resumable bench runner: records appear as jobs finish; a resumed run equals an
uninterrupted one (records identical except their timing field)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusolve.bench import samplers
from diffusolve.bench.runner import (
    TIMING,
    Job,
    RecordsExistError,
    RecordStore,
    run_jobs,
    strip_timing,
)

TINY = dict(
    tasks=["gauss-d2-vp"],
    nfes=[5],
    n_samples=12,
    n_select=6,
    methods=["ddim", "dpmpp_2m"],
    schedulers=["DDIM"],
    quick=True,
    progress=False,
)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _records(path: Path) -> list[dict]:
    """The file's records (header dropped) without timing, in file order."""
    return [strip_timing(r) for r in _lines(path)[1:]]


def _squares(n: int, fail_at: int | None = None):
    for i in range(n):

        def run(store, i=i):
            if i == fail_at:
                raise KeyboardInterrupt
            return {"y": i * i, TIMING: {"note": "not compared"}}

        yield Job({"x": i}, run)


def test_store_appends_each_record_and_resume_skips_done_jobs(tmp_path):
    path = tmp_path / "r.jsonl"
    store = RecordStore(path, bench="t", key_fields=("x",), config={"a": 1})
    with pytest.raises(KeyboardInterrupt):
        run_jobs(_squares(5, fail_at=3), store)
    assert len(_lines(path)) == 1 + 3  # header + the three finished jobs, already on disk
    with pytest.raises(RecordsExistError, match="--resume"):
        RecordStore(path, bench="t", key_fields=("x",), config={"a": 1})
    with pytest.raises(ValueError, match="a=1.*a=2"):
        RecordStore(path, bench="t", key_fields=("x",), config={"a": 2}, mode="resume")
    resumed = RecordStore(path, bench="t", key_fields=("x",), config={"a": 1}, mode="resume")
    assert resumed.loaded == 3
    assert run_jobs(_squares(5), resumed) == (2, 3)
    assert [r["y"] for r in _records(path)] == [0, 1, 4, 9, 16]
    assert all("seconds" in r[TIMING] for r in _lines(path)[1:])
    fresh = RecordStore(path, bench="t", key_fields=("x",), config={"a": 1}, mode="overwrite")
    assert fresh.records == [] and len(_lines(path)) == 1


def test_resume_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "r.jsonl"
    run_jobs(_squares(2), RecordStore(path, bench="t", key_fields=("x",)))
    with open(path, "a") as f:
        f.write('{"x": 2, "y": ')  # a write interrupted mid-line
    store = RecordStore(path, bench="t", key_fields=("x",), mode="resume")
    assert store.loaded == 2
    run_jobs(_squares(3), store)
    assert [r["y"] for r in _records(path)] == [0, 1, 4]


def test_interrupted_bench_resumes_to_the_same_records(tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    want = samplers.run_bench(records=full, **TINY)
    assert {r["phase"] for r in _records(full)} == {"task", "select", "final"}

    # interrupt the same run at its 5th solver call (records of earlier jobs are on disk)
    calls = {"n": 0}
    real = samplers.run_ours

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    part = tmp_path / "part.jsonl"
    monkeypatch.setattr(samplers, "run_ours", flaky)
    with pytest.raises(KeyboardInterrupt):
        samplers.run_bench(records=part, **TINY)
    monkeypatch.setattr(samplers, "run_ours", real)
    n_done = len(_lines(part)) - 1
    assert 0 < n_done < len(_records(full))
    with pytest.raises(RecordsExistError):
        samplers.run_bench(records=part, **TINY)
    got = samplers.run_bench(records=part, resume=True, **TINY)
    assert got["meta"]["records_resumed"] == n_done
    assert _records(part) == _records(full)
    for a, b in zip(got["records"], want["records"], strict=True):
        assert strip_timing(a) == strip_timing(b)
    assert got["summary"] == want["summary"] and got["tasks"].keys() == want["tasks"].keys()

    # resuming a finished run runs nothing and gives the same result
    again = samplers.run_bench(records=part, resume=True, **TINY)
    assert again["meta"]["records_run"] == 0 and again["summary"] == want["summary"]


def test_final_record_is_the_best_trial_rerun_on_all_samples(tmp_path):
    path = tmp_path / "r.jsonl"
    samplers.run_bench(records=path, **TINY)
    recs = _records(path)
    for method in ("dpmpp_2m", "DDIM"):
        trials = [r for r in recs if r["phase"] == "select" and r["method"] == method]
        (final,) = [r for r in recs if r["phase"] == "final" and r["method"] == method]
        ok = [t for t in trials if t["rel_error"] is not None]
        best = min(ok, key=lambda t: t["rel_error"])
        assert final["setting"] == best["setting"]
        assert final["settings_tried"] == len(trials)
        assert final["settings_failed"] == len(trials) - len(ok)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffusolve", "bench", "samplers", *args]


def test_killed_cli_run_resumes_to_the_same_records(tmp_path):
    """A real SIGKILL in the middle of `diffusolve bench samplers`, then --resume
    (about 17 s on 2 idle cores: three CLI runs)."""
    args = [
        "--tasks", "gauss-d2-vp,gauss-d2-rf", "--nfe", "5,10", "--n-samples", "12",
        "--methods", "ddim,dpmpp_2m,unipc_bh2_2", "--schedulers", "DDIM,UniPC",
        "--quick", "--no-progress", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    part = tmp_path / "part.jsonl"
    proc = subprocess.Popen(
        _cli(*args, "--records", str(part)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(part.read_text().splitlines()) - 1
    done = subprocess.run(
        _cli(*args, "--records", str(part), "--resume"), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"{n_done} resumed" in done.stdout
    full = tmp_path / "full.jsonl"
    ref = subprocess.run(
        _cli(*args, "--records", str(full)), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    assert _records(part) == _records(full)
    assert len(_records(full)) > n_done
