"""The analysis phases of bench guidance run through the runner and build tables/goals."""

import pytest

from diffusolve.bench import guidance_analysis as ga
from diffusolve.bench.runner import RecordStore, run_jobs, strip_timing

pytestmark = pytest.mark.usefixtures("single_thread")
KEY_FIELDS = ("bench", "phase", "task", "method", "setting")


def _run(jobs):
    store = RecordStore(None, bench="guidance", key_fields=KEY_FIELDS)
    run_jobs(jobs, store)
    return store.records


def test_analytic_phases_quick(tmp_path):
    jobs = [
        j
        for j in ga.jobs(True, 0)
        if j.key["phase"] == "intrinsic-dim" or j.key["task"] == "gmm-d8-edm"
    ]
    assert {j.key["phase"] for j in jobs} == {"likelihood", "intrinsic-dim"}
    assert all(set(j.key) == set(KEY_FIELDS) and j.key["phase"] in ga.PHASES for j in jobs)
    records = _run(jobs)
    titles = [t for t, _ in ga.tables(records)]
    assert any("Log-likelihood" in t for t in titles)
    assert any("Intrinsic dimension" in t for t in titles)
    goals = {g: (met, fig) for g, met, fig in ga.goals(records)}
    assert all(met for met, _ in goals.values()), goals
    assert ga.plots(records, tmp_path)
    # deterministic for the seed
    again = _run([j for j in ga.jobs(True, 0) if j.key["phase"] == "intrinsic-dim"])
    mine = [strip_timing(r) for r in records if r["phase"] == "intrinsic-dim"]
    assert mine == [strip_timing(r) for r in again]


@pytest.mark.slow
def test_all_phases_quick():
    records = _run(ga.jobs(True, 0))
    assert {r["phase"] for r in records} == set(ga.PHASES)
    assert len(ga.tables(records)) == 5
    assert all(met for _, met, _ in ga.goals(records))
