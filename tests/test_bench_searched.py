"""Searched schedules as ``bench samplers`` methods: same start, fixed NFE, held-out
flag, search cost; our best fixed-schedule vs searched; the NFE 5 vs 10 ratio; FD-digits
plumbing (with a stub metric: the real network task takes minutes)."""

from __future__ import annotations

import pytest
import torch

from diffusolve.bench import samplers as bs
from diffusolve.bench.report import (
    NOT_HELDOUT_MARK,
    fd_summary_table,
    markdown_tables,
    moonshot,
    moonshot_table,
    searched_table,
    summarize,
)
from diffusolve.bench.tasks import build_task
from diffusolve.metrics import rel_error
from diffusolve.process import get_process, make_grid
from diffusolve.solvers.search import Schedule

SEEN_ELSEWHERE = (
    "gauss-d2-vp: calibration priors seeds 1000..1003 (16 starts each); held out: prior "
    "seed 0 with the bench's starts (seed 1)"
)


def _schedule(path, data=SEEN_ELSEWHERE, model="gauss-d2-vp", solver="dpmpp_2m", **info):
    p = get_process("ddpm-linear")
    sch = Schedule.for_solver(
        p,
        make_grid(p, 4, "logsnr"),
        solver,
        final="denoise",
        info={"model": model, "data": data, "mode": "timesteps", "budget": 10, **info},
    )
    return sch.save(path)


def _run(schedules, nfes=(5,), **kw):
    return bs.run_bench(
        tasks=["gauss-d2-vp", "gauss-d2-rf"],
        nfes=list(nfes),
        n_samples=16,
        n_select=8,
        quick=True,
        methods=["ddim"],
        schedulers=["DDIM"],
        schedules=schedules,
        progress=False,
        **kw,
    )


def test_searched_schedule_is_a_method_on_its_process_at_its_nfe(tmp_path):
    path = _schedule(tmp_path / "mine.json")
    out = _run([str(path)], nfes=(5, 6))
    rows = [r for r in out["records"] if r["method"] == "searched:mine"]
    # ddpm-linear only (not the rectified-flow task), NFE 5 only (not 6)
    assert [(r["task"], r["nfe"]) for r in rows] == [("gauss-d2-vp", 5)]
    (r,) = rows
    task = build_task("gauss-d2-vp", 16)
    want = rel_error(
        Schedule.load(path).sample(task.model, task.x_T, dtype=torch.float64), task.ref
    )
    assert r["rel_error"] == pytest.approx(want, rel=1e-12)  # same x_T, run as it is
    assert r["library"] == "diffusolve" and r["nfe_used"] == 5 and r["settings_tried"] == 0
    assert "schedule=mine" in r["setting"] and "no settings search" in r["note"]
    s = r["searched"]
    assert s["heldout"] is True and "1000..1003" in s["note"] and "prior seed 0" in s["note"]
    assert s["cost"]["proxy_evaluations"] == 10
    assert s["cost"]["model_evaluations"] == 10 * 5 * 4 * 16  # budget x NFE x starts
    assert s["cost"]["seconds"] is None and "not recorded" in s["cost"]["note"]
    (meta,) = out["meta"]["searched"]
    assert meta["tasks"] == ["gauss-d2-vp"] and meta["searched_on"] == "gauss-d2-vp"
    # dpmpp_2m beats ddim at 5 evaluations: the searched row is our best, not our fixed best
    (row,) = [x for x in out["summary"] if x["task"] == "gauss-d2-vp" and x["nfe"] == 5]
    assert row["ours_method"] == "searched:mine" and row["fixed_method"] == "ddim"
    assert row["searched_cost"]["proxy_evaluations"] == 10
    assert "searched:mine" in searched_table(out["summary"])
    assert "10 proxy evaluations" in markdown_tables(out)
    assert "searched" in out["convention"]


def test_schedule_searched_on_the_bench_data_is_flagged_and_never_best(tmp_path):
    seen = "gauss-d2-vp: calibration priors seeds 0..3 (16 starts each); held out: seed 9"
    flagged = _schedule(tmp_path / "seen.json", data=seen)
    unknown = tmp_path / "unknown.json"
    p = get_process("ddpm-linear")
    Schedule.for_solver(p, make_grid(p, 4, "logsnr"), "dpmpp_2m").save(unknown)
    out = _run([str(flagged), str(unknown)])
    by = {r["method"]: r for r in out["records"] if r["task"] == "gauss-d2-vp"}
    assert by["searched:seen"]["searched"]["heldout"] is False
    assert "THIS BENCH'S DATA" in by["searched:seen"]["searched"]["note"]
    assert by["searched:unknown"]["searched"]["heldout"] is None
    assert by["searched:seen"]["rel_error"] < by["ddim"]["rel_error"]
    (row,) = [x for x in out["summary"] if x["task"] == "gauss-d2-vp"]
    assert row["ours_method"] == "ddim" and row["searched_method"] is None
    assert NOT_HELDOUT_MARK in markdown_tables(out)


def test_heldout_status_rules():
    p = get_process("ddpm-linear")
    g = make_grid(p, 4, "logsnr")

    def sch(**info):
        return Schedule.for_solver(p, g, "ddim", info=info)

    net = "digits: calibration 64 starts (seed 5000) against a 250-step solve; held out: seed 1"
    assert bs.heldout_status(sch(model="digits", data=net), "digits-unet", 0)["heldout"] is True
    # bench seed 4999 starts from seed 5000: the search's own starts
    assert bs.heldout_status(sch(model="digits", data=net), "digits-unet", 4999)["heldout"] is False
    # nor may it have seen the bench's FD starts (seed + 3)
    fd = "digits: FD-digits proxy, calibration 512 starts (seed 3); held out: seed 3"
    status = bs.heldout_status(sch(model="digits", data=fd), "digits-unet", 0)
    assert status["heldout"] is False and "3" in status["note"]
    # a schedule searched on another task never saw this one
    other = bs.heldout_status(sch(model="gmm-d64-vp", data="x seeds 0..9"), "gmm-d2-vp", 0)
    assert other["heldout"] is True and "transfer" in other["note"]
    val = "m: calibration priors seeds 1000..1015 (32 starts each), validation priors seeds 3000..3003; held out: prior seed 0"
    assert bs.heldout_status(sch(model="gmm-d2-vp", data=val), "gmm-d2-vp", 0)["heldout"] is True
    assert (
        bs.heldout_status(sch(model="gmm-d2-vp", data=val), "gmm-d2-vp", 3002)["heldout"] is False
    )
    assert bs.heldout_status(sch(model="gmm-d2-vp"), "gmm-d2-vp", 0)["heldout"] is None
    recorded = bs.search_cost(
        sch(cost={"proxy_evaluations": 7, "model_evaluations": 70, "seconds": 1.5}, budget=99)
    )
    assert recorded == {
        "proxy_evaluations": 7,
        "model_evaluations": 70,
        "seconds": 1.5,
        "note": None,
    }


def test_unknown_and_duplicate_schedules_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown schedule"):
        bs.load_searched(["no-such-schedule"])
    path = _schedule(tmp_path / "a.json")
    (tmp_path / "b").mkdir()
    twin = _schedule(tmp_path / "b" / "a.json")
    with pytest.raises(ValueError, match="two schedules"):
        bs.load_searched([str(path), str(twin)])
    assert bs.load_searched([]) == []


def test_summary_moonshot_and_fd_rows():
    searched = {"heldout": True, "cost": {"proxy_evaluations": 3}}
    recs = [
        dict(library="diffusolve", method="a", task="t", nfe=5, rel_error=0.2, fd_digits=4.0),
        dict(
            library="diffusolve", method="searched:s", task="t", nfe=5, rel_error=0.05,
            fd_digits=1.0, searched=searched,
        ),
        dict(library="diffusers", method="X", task="t", nfe=5, rel_error=0.1, fd_digits=2.0),
        dict(library="diffusers", method="X", task="t", nfe=10, rel_error=0.04, fd_digits=1.5),
    ]  # fmt: skip
    row = summarize(recs)[0]
    assert row["ours_method"] == "searched:s" and row["ratio"] == pytest.approx(0.5)
    assert row["fixed_method"] == "a" and row["fixed_ratio"] == pytest.approx(2.0)
    assert row["fd_fixed_method"] == "X" and row["fd_ratio"] == pytest.approx(0.5)
    assert "searched:s" in fd_summary_table(summarize(recs))
    (m,) = moonshot(recs)
    assert m["ours_method"] == "searched:s" and m["ratio"] == pytest.approx(0.05 / 0.04)
    assert "| t | searched:s | 5 |" in moonshot_table([m])
    assert moonshot([r for r in recs if r["nfe"] == 5]) == []


def test_fd_digits_on_the_network_task_plumbing(monkeypatch, tmp_path):
    """FD-digits jobs follow each final run on a network task, with the winner's setting on
    fd_samples other starts; here a Gaussian task stands in for the network and a stub for
    the metric (the real UNet task takes minutes)."""
    import diffusolve.models as models

    monkeypatch.setattr(bs, "_is_network", lambda name: name == "gauss-d2-vp")
    seen = []

    def fake_fd(x):
        seen.append(tuple(x.shape))
        return float(x.double().norm())

    monkeypatch.setattr(models, "fd_digits", fake_fd)
    monkeypatch.setattr(models, "fd_digits_noise_floor", lambda n: 0.25)
    path = _schedule(tmp_path / "s.json", model="gmm-d64-vp")
    out = _run([str(path)], fd_samples=12, records=tmp_path / "r.jsonl", fd_only=[])
    vp = [r for r in out["records"] if r["task"] == "gauss-d2-vp"]
    assert all(r["fd_samples"] == 12 and r["fd_digits"] > 0 for r in vp if r["rel_error"])
    assert seen and all(s == (12, 2) for s in seen)
    assert out["tasks"]["gauss-d2-vp"]["fd_floor"] == 0.25
    row = next(x for x in out["summary"] if x["task"] == "gauss-d2-vp")
    assert row["fd_searched_method"] == "searched:s" and row["fd_fixed"] is not None
    assert "FD-digits" in markdown_tables(out)
    assert all("fd_digits" not in r for r in out["records"] if r["task"] == "gauss-d2-rf")
    # resumed: nothing re-runs, the same result
    again = _run([str(path)], fd_samples=12, records=tmp_path / "r.jsonl", resume=True, fd_only=[])
    assert again["meta"]["records_run"] == 0 and again["records"] == out["records"]


def test_fd_only_samplers_plumbing(monkeypatch, tmp_path):
    """Stochastic solvers and DPM-OT run on the network task by FD-digits alone, with their
    memorisation figures; a stochastic solver joins the fixed-schedule baseline, DPM-OT
    only "ours, any method". A Gaussian task stands in for the network, its own data for
    the digits and a stub for the metric."""
    import diffusolve.bench.samplers_fd as sf
    import diffusolve.models as models

    monkeypatch.setattr(bs, "_is_network", lambda name: name == "gauss-d2-vp")
    monkeypatch.setattr(models, "fd_digits", lambda x: float(x.double().pow(2).mean()))
    monkeypatch.setattr(models, "fd_digits_noise_floor", lambda n: 0.25)
    monkeypatch.setattr(sf, "DPM_OT_FIT", {"iters": 30})
    monkeypatch.setattr(sf, "GUARD_SAMPLES", 16)
    data = build_task("gauss-d2-vp", 40).data.float()
    monkeypatch.setattr(sf._Memo, "data", lambda self: (data, 0.5))
    kw = dict(
        fd_samples=12, records=tmp_path / "r.jsonl", fd_only=["ddpm", "dpm_ot", "dpm_ot_ddpm"]
    )
    with pytest.raises(ValueError, match="unknown FD-only"):
        _run([], fd_samples=12, fd_only=["nope"])
    out = _run([], **kw)
    recs = {r["method"]: r for r in out["fd_only"]}
    assert recs["dpm_ot_ddpm"]["distinct_fraction"] == 1.0  # its own noise per sample
    assert recs["dpm_ot_ddpm"]["nfe_used"] == 5, recs["dpm_ot_ddpm"].get("note")
    assert recs["dpm_ot"]["distinct_fraction"] == recs["dpm_ot"]["distinct_targets"]
    recs.pop("dpm_ot_ddpm")
    assert set(recs) == {"ddpm", "dpm_ot"} and all(
        r["task"] == "gauss-d2-vp" for r in recs.values()
    )
    ddpm, ot = recs["ddpm"], recs["dpm_ot"]
    assert ddpm["kind"] == "stochastic solver" and ddpm["nfe_used"] == 5
    assert ddpm["fd_samples"] == 12 and ddpm["fd_digits"] > 0 and ddpm["rel_error"] is None
    assert ddpm["median_nn_train"] > 0 and ddpm["heldout_median_nn_train"] == 0.5
    assert 0 <= ddpm["frac_within_radius"] <= 1
    assert ot["kind"] == "trajectory sampler" and ot["nfe_used"] == 5, ot.get("note")
    chosen = [g for g in ot["guard"] if g["t_late"] == ot["t_late"]]
    assert len(chosen) == 1 and 0 < ot["distinct_fraction"] <= 1
    # the guard tries the latest level first and stops at the first that passes
    assert [g["passed"] for g in ot["guard"][:-1]] == [False] * (len(ot["guard"]) - 1)
    row = next(x for x in out["summary"] if x["task"] == "gauss-d2-vp")
    fds = {"ddim": None, **{m: r["fd_digits"] for m, r in recs.items()}}
    fds["ddim"] = next(
        r["fd_digits"]
        for r in out["records"]
        if r["task"] == "gauss-d2-vp" and r["library"] == "diffusolve"
    )
    fixed = min(v for m, v in fds.items() if m != "dpm_ot")
    assert row["fd_any"] == pytest.approx(min(fds.values()))
    assert row["fd_fixed"] <= fixed + 1e-12
    table = markdown_tables(out)
    assert "ddpm (stochastic solver; FD only)" in table and "dpm_ot (trajectory sampler" in table
    assert "ours, any method" in fd_summary_table(out["summary"])
    again = _run([], **{**kw, "resume": True})
    assert again["meta"]["records_run"] == 0 and again["fd_only"] == out["fd_only"]
