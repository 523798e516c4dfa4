"""Tests of ``diffusolve bench samplers`` / ``bench overhead`` plumbing (small and fast)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffusolve import sample
from diffusolve.bench import diffusers_runner as dr
from diffusolve.bench.report import markdown_tables, summarize, summary_table
from diffusolve.bench.samplers import build_task, run_bench
from diffusolve.metrics import rel_error

REQUIRED = {"library", "method", "setting", "task", "nfe", "nfe_used", "rel_error", "sw", "note"}


def _spec(name: str) -> dr.SchedulerSpec:
    return next(s for s in dr.SPECS if s.method == name)


@pytest.fixture(scope="module")
def task_vp():
    return build_task("gauss-d2-vp", 32)


def test_tiny_run_writes_valid_json(tmp_path):
    from diffusolve.bench.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    path = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            "samplers", "--tasks", "gauss-d2-vp,gauss-d2-rf", "--nfe", "5", "--n-samples", "16",
            "--methods", "ddim,euler", "--schedulers", "DDIM,FlowMatchEuler",
            "--schedules", "none",
            "--json", str(path), "--out", str(tmp_path / "out"), "--no-progress",
        ]
    )  # fmt: skip
    assert args.handler(args) == 0
    data = json.loads(path.read_text())
    assert data["bench"] == "samplers"
    assert "x_T" in data["convention"] and "t_max" in data["convention"]
    assert set(data["tasks"]) == {"gauss-d2-vp", "gauss-d2-rf"}
    for info in data["tasks"].values():
        assert info["sw_floor"] > 0 and info["reference_accuracy"] == 0.0
    recs = data["records"]
    # 2 tasks x 1 NFE x (2 ours + 2 diffusers); unsupported pairs are kept with a note
    assert len(recs) == 8
    for r in recs:
        assert REQUIRED <= set(r)
    by = {(r["task"], r["method"]): r for r in recs}
    for key in [
        ("gauss-d2-vp", "ddim"),
        ("gauss-d2-vp", "DDIM"),
        ("gauss-d2-rf", "FlowMatchEuler"),
    ]:
        r = by[key]
        assert r["rel_error"] is not None and 0 < r["rel_error"] < 1
        assert r["sw"] is not None and r["nfe_used"] <= r["nfe"]
        assert r["setting"]
    for key in [("gauss-d2-rf", "DDIM"), ("gauss-d2-vp", "FlowMatchEuler")]:
        assert by[key]["rel_error"] is None and by[key]["note"]
    assert "leading" in by[("gauss-d2-vp", "DDIM")]["note"]
    assert (tmp_path / "out" / "samplers_gauss-d2-vp.png").stat().st_size > 0
    assert (tmp_path / "out" / "samplers.md").read_text().count("| diffusolve |") == 4


def test_diffusers_ddim_equals_ours_on_matched_grid(task_vp):
    """Same grid (diffusers' trailing timesteps 999, 799, ..., 199, then its final step to
    alpha=1 == our final denoise at t=199): the two DDIMs must agree to round-off, which
    proves the plumbing (start state, time mapping, epsilon conversion, NFE count) is right."""
    import diffusers

    nfe = 5
    setting = {"timestep_spacing": "trailing"}
    out = dr.run_scheduler(_spec("DDIM"), setting, task_vp.model, task_vp.x_T, nfe, "vp")
    sched = diffusers.DDIMScheduler(**dr.DDPM_LINEAR, clip_sample=False, **setting)
    sched.set_timesteps(out["steps"])
    grid = sched.timesteps.to(torch.float64)
    assert grid.tolist() == [999.0, 799.0, 599.0, 399.0, 199.0]
    stats: dict = {}
    ours = sample(task_vp.model, task_vp.x_T, grid, "ddim", final="denoise", stats=stats)
    assert out["nfe_used"] == stats["nfe"] == nfe
    # diffusers keeps alphas_cumprod in float32 and takes its square roots there: its DDIM
    # coefficients carry ~1e-7 relative round-off even for float64 samples
    assert rel_error(out["x"], ours) < 2e-6
    assert rel_error(ours, task_vp.ref) > 1e-3  # a real (non-trivial) solve
    # a mismatched setting (clip_sample, another grid) would differ by far more
    other = sample(task_vp.model, task_vp.x_T, grid[:-1], "ddim", final="denoise")
    assert rel_error(out["x"], other) > 1e-3


def test_diffusers_flow_euler_equals_ours_ddim(task_vp):
    """On rectified flow, FlowMatchEuler on linspace(t_max, t_min) followed by its step to
    sigma=0 is our DDIM (= Euler in t for RF) on the same grid with a final denoise."""
    task = build_task("gauss-d2-rf", 16)
    out = dr.run_scheduler(
        _spec("FlowMatchEuler"), {"sigmas": "default"}, task.model, task.x_T, 6, "rf"
    )
    p = task.model.process
    grid = torch.linspace(p.t_max, p.t_min, out["steps"], dtype=torch.float64)
    ours = sample(task.model, task.x_T, grid, "ddim", final="denoise")
    # diffusers keeps sigmas in float32 and rounds the sample to float32 in step()
    assert rel_error(out["x"], ours) < 2e-6


def test_summary_ratio():
    recs = [
        dict(library="diffusolve", method="a", task="t", nfe=5, rel_error=0.2),
        dict(library="diffusolve", method="b", task="t", nfe=5, rel_error=0.05),
        dict(library="diffusolve", method="c", task="t", nfe=5, rel_error=None),
        dict(library="diffusers", method="X", task="t", nfe=5, rel_error=0.1),
        dict(library="diffusers", method="Y", task="t", nfe=5, rel_error=0.4),
        dict(library="diffusolve", method="a", task="t", nfe=10, rel_error=0.01),
        dict(library="diffusers", method="X", task="t", nfe=10, rel_error=None),
    ]
    s = summarize(recs)
    assert [(r["task"], r["nfe"]) for r in s] == [("t", 5), ("t", 10)]
    assert s[0]["ours_method"] == "b" and s[0]["diffusers_method"] == "X"
    assert s[0]["ratio"] == pytest.approx(0.5)
    assert s[1]["ratio"] is None and s[1]["diffusers_method"] is None
    assert "| t | 5 | b | 5.00e-02 | X | 1.00e-01 | 0.5 | b | 5.00e-02 | 0.5 |" in summary_table(s)
    assert s[0]["fixed_method"] == "b" and s[0]["searched_method"] is None


def test_bench_picks_best_setting_and_highlights(task_vp):
    out = run_bench(
        tasks=["gauss-d2-vp"], nfes=[6], n_samples=16, n_select=8, methods=["dpmpp_2m"],
        schedulers=["DPM-Solver++ 2M"], quick=True, progress=False, schedules=[],
    )  # fmt: skip
    ours, theirs = out["records"]
    assert ours["settings_tried"] == 18  # 3 ends x 2 grid kinds x 3 lower_order_final modes
    assert "grid=" in ours["setting"] and "lower_order_final=" in ours["setting"]
    assert "timestep_spacing=" in theirs["setting"] and theirs["nfe_used"] <= 6
    assert out["summary"][0]["ratio"] == pytest.approx(ours["rel_error"] / theirs["rel_error"])
    assert markdown_tables(out).count("**") == 4  # one best per library


def test_unsupported_and_infeasible_rows_are_kept():
    assert dr.unsupported_note(_spec("PNDM"), "rf")
    assert dr.unsupported_note(_spec("FlowMatchHeun"), "vp")
    assert dr.unsupported_note(_spec("UniPC"), "rf") is None
    task = build_task("gauss-d2-vp", 4)
    with pytest.raises(ValueError, match="evaluations"):
        dr.run_scheduler(_spec("PNDM"), {"skip_prk_steps": False}, task.model, task.x_T, 5, "vp")
    with pytest.raises(ValueError, match="t_max"):
        dr.run_scheduler(
            _spec("DDIM"), {"timestep_spacing": "leading"}, task.model, task.x_T, 5, "vp"
        )


def test_overhead_smoke():
    from diffusolve.bench.overhead import format_overhead, run_overhead

    r = run_overhead(steps=4, repeats=2, methods=("ddim",), force_profile=True)
    (row,) = r["results"]
    assert row["ours_us_per_step"] > 0 and row["ratio"] == pytest.approx(
        row["ours_us_per_step"] / row["diffusers_us_per_step"]
    )
    assert row["profile"] and "ours/diffusers" in format_overhead(r)


def test_our_settings_come_from_the_solver_declaration(monkeypatch):
    """Our settings = bench-level grid kind and end x what the solver declares searchable."""
    from diffusolve.bench import settings as bs

    class Declares:
        natural_grid = "karras"

        def search_space(self):
            return {"a": (1, 2), "b": ("x",)}

        def options(self):
            return {"a": 1, "b": "x", "lower_order_final": True}

    class Legacy:  # no search_space yet: the bench's former rule
        natural_grid = "logsnr"

        def options(self):
            return {"lower_order_final": True}

    assert bs.search_space(Declares()) == {"a": (1, 2), "b": ("x",)}
    assert bs.search_space(Legacy()) == {"lower_order_final": (True, "grid", False)}
    monkeypatch.setattr(bs, "get_solver", lambda name: Declares())
    got = bs.our_settings("anything", quick=True)
    assert got[0] == {"grid": "karras", "end": "t_min", "a": 1, "b": "x"}
    kinds = {s["grid"] for s in got}
    assert len(got) == len(bs.ENDS) * len(kinds) * 2 and "logsnr" in kinds
