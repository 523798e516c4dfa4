"""The guidance-on-digits bench phase through the runner (trimmed; the full quick run is slow)."""

from __future__ import annotations

import pytest

from diffusolve.bench import guidance_digits as phase
from diffusolve.bench.runner import RecordStore, run_jobs, strip_timing

pytestmark = pytest.mark.usefixtures("single_thread")
FIELDS = ("bench", "phase", "task", "method", "setting")


def _store():
    return RecordStore(None, bench="guidance", key_fields=FIELDS)


def test_trimmed_jobs_give_tables_goals_and_deterministic_records(monkeypatch, tmp_path):
    monkeypatch.setattr(phase, "_n", lambda quick: 20)
    monkeypatch.setattr(phase, "STEPS", 4)
    phase._assets.cache_clear()
    keep = {("fd-floor", "n=20"), ("cfg", "scale=1"), ("cfg", "scale=2"), ("elucd", "scale=0.3")}
    keep |= {("loss", "scale=4"), ("cfg++", "scale=0.3")}
    try:
        runs = []
        for _ in range(2):
            jobs = [j for j in phase.jobs(False, 0) if (j.key["method"], j.key["setting"]) in keep]
            assert all(set(j.key) == set(FIELDS) and j.key["phase"] in phase.PHASES for j in jobs)
            store = _store()
            run_jobs(jobs, store)
            runs.append(store.records)
    finally:
        phase._assets.cache_clear()
    assert [strip_timing(r) for r in runs[0]] == [strip_timing(r) for r in runs[1]]
    records = runs[0]
    assert len(records) == len(keep)
    for r in records:
        if r["method"] != "fd-floor":
            assert r["nfe"] == 5 and 0 <= r["acc_judge"] <= 1 and r["fd"] > 0
            assert r["judge_is_guide"] is False
    ((title, table),) = phase.tables(records)
    assert "| elucd | 0 |" in table and "| cfg | 2 |" in table  # scale 0 = conditional
    ((goal, met, text),) = phase.goals(records)
    assert goal == phase.GOAL and isinstance(met, bool) and text
    assert phase.plots(records, tmp_path)[0].is_file()


def test_goal_dominance_rule():
    def rec(method, scale, acc, fd):
        return {"phase": "digits", "method": method, "scale": scale, "acc_judge": acc, "fd": fd}

    cfg = [rec("cfg", 1.0, 0.90, 0.30), rec("cfg", 2.0, 0.97, 0.60)]
    ((_, met, _),) = phase.goals(cfg + [rec("elucd", 1.0, 0.95, 0.70)])
    assert not met
    ((_, met, text),) = phase.goals(cfg + [rec("elucd", 1.0, 0.97, 0.50)])
    assert met and "elucd" in text


@pytest.mark.slow
def test_quick_bench_runs_in_full():
    store = _store()
    run_jobs(list(phase.jobs(True, 0)), store)
    assert phase.tables(store.records) and phase.goals(store.records)
