"""``diffusolve bench accel``: a trimmed run through the runner (records, tables, goals, the
speed-up against the baseline of the same timing job, the missing-weights path), the NFE
bookkeeping, the peak-memory probe, and the table's rules on hand-made records."""

from __future__ import annotations

import argparse

import pytest
import torch

from diffusolve.bench import accel
from diffusolve.bench import accel_methods as am
from diffusolve.bench.runner import RecordStore, run_jobs

pytestmark = pytest.mark.usefixtures("single_thread")
NFES = (5, 10)

TINY = {"n_fd": 20, "n_agree": 10, "n_select": 10, "batch": 2, "repeats": 3}
TINY |= {"n_traj": 8, "n_cal": 64, "recon_iters": 2}


@pytest.fixture(scope="module")
def trimmed():
    """One trimmed quick run: the baseline, the teacher (selection + NFE 5/10/50), W8A8
    uniform, DeepCache 2 and a few-step model whose weights do not exist (the teacher at
    NFE 5 and 10 only)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(accel, "QUICK", TINY)
    mp.setattr(am, "TEACHER_NFES", NFES)
    mp.setattr(am, "fewstep_names", lambda: ("digits-never-trained",))
    torch.set_num_threads(1)
    try:
        store = RecordStore(None, bench=accel.BENCH, key_fields=accel.KEY_FIELDS)
        only = {"float", "teacher", "w8a8-uniform", "deepcache-2", "digits-never-trained"}
        n_run, n_skipped = run_jobs(accel.jobs(True, 0, store, only=only), store)
    finally:
        mp.undo()
    return store, n_run, n_skipped


def test_trimmed_run_records(trimmed):
    from diffusolve.models import fd_digits_noise_floor

    store, n_run, n_skipped = trimmed
    recs = store.records
    # floor + 3 selections + float + 2 teacher + w8a8 + deepcache + 3 few-step + speed
    assert (n_run, n_skipped) == (1 + 3 + 1 + 2 + 1 + 1 + 3 + 1, 0)
    floor = recs[0]
    assert floor["method"] == "fd-floor" and floor["fd"] == round(fd_digits_noise_floor(20, 0), 6)
    by = {(r["method"], r["setting"]): r for r in recs if r["phase"] == "method"}
    assert by[("float", "dpmpp_2m/20")]["nfe"] == 21  # 20 steps + the final denoising call
    chosen = accel.chosen_solver(recs)
    sel = [r for r in recs if r["phase"] == "select"]
    assert chosen == min(sel, key=lambda r: r["fd"])["solver"]
    assert all(r["nfe"] == accel.SELECT_NFE for r in sel)
    for nfe in NFES:  # the chosen solver, really nfe network calls
        r = by[("teacher", f"nfe={nfe}")]
        assert (r["solver"], r["nfe"]) == (chosen, nfe)
    # the same solve under a cache or quantized: same network calls, the guided one too
    for name in ("w8a8-uniform", "deepcache-2"):
        r = by[(name, "dpmpp_2m/20")]
        assert r["status"] == "ok" and r["nfe"] == r["nfe_guided"] == 21
        for a, n in (("agree", 10), ("cond_agree", 20)):  # fractions of n samples
            for c in ("bundled", "judge"):
                assert 0 <= r[f"{a}_{c}"] <= 1 and round(r[f"{a}_{c}"] * n, 4) % 1 == 0
        assert r["fd"] > 0
    # sizes: the W8 weights are int8 (about a quarter of the float32 UNet, whose first and
    # last convolutions and time embedding stay float); a cache changes no weight
    f32 = by[("float", "dpmpp_2m/20")]["disk_bytes"]
    assert by[("deepcache-2", "dpmpp_2m/20")]["disk_bytes"] == f32
    assert 0.2 < by[("w8a8-uniform", "dpmpp_2m/20")]["disk_bytes"] / f32 < 0.35
    missing = [r for r in recs if r["method"] == "digits-never-trained"]
    assert [r["setting"] for r in missing] == ["nfe=1", "nfe=2", "nfe=4"]
    assert all(r["status"] == "missing" and "fd" not in r for r in missing)
    assert all("digits-never-trained" in r["message"] for r in missing)


def test_speedup_is_against_the_baseline_of_the_same_timing_job(trimmed):
    store, _, _ = trimmed
    recs = store.records
    speed = [r for r in recs if r["phase"] == "speed"]
    assert len(speed) == 1 and speed[0]["repeats"] == 3
    timing = speed[0]["timing"]["methods"]
    base = timing["float|dpmpp_2m/20"]
    rows = {(r["method"], r["setting"]): r for r in accel.rows(recs)}
    assert rows[("float", "dpmpp_2m/20")]["speedup"] == 1.0
    for key, t in timing.items():
        name, setting = key.split("|")
        if t.get("status") == "missing":
            assert rows[(name, setting)]["speedup"] is None
            continue
        assert len(t["repeats"]) == 3 and t["cpu_s_per_sample"] == sorted(t["repeats"])[1]
        assert t["peak_rss_growth"] == sorted(t["rss_repeats"])[1]
        assert rows[(name, setting)]["speedup"] == base["cpu_s_per_sample"] / t["cpu_s_per_sample"]
        assert t["peak_rss_growth"] >= 0 and t["model_bytes"] > 0
    # the timed solves are the reported ones (same network calls)
    for (name, setting), r in rows.items():
        if r["status"] == "ok":
            assert timing[f"{name}|{setting}"]["nfe"] == r["nfe"]


def test_tables_goals_and_plot_from_the_records(trimmed, tmp_path):
    store, _, _ = trimmed
    recs = store.records
    (title, table), (sel_title, sel) = accel.tables(recs)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 1 + 2 + 1 + 1 + 3  # header + methods
    assert all(ln.count("|") == 11 for ln in lines)  # 10 columns, no stray pipes
    assert "| float dpmpp_2m 20 steps (baseline) | 21 |" in table
    assert table.count("| missing |") == 3 and "weights missing" in table
    assert accel.chosen_solver(recs) + " |" in sel and "yes" in sel
    goals = accel.goals(recs)
    assert [g for g, _, _ in goals] == list(accel.GOALS)
    (_, met3, fig3) = goals[2]
    assert met3 is False and "digits-never-trained: weights missing" in fig3
    assert accel.plots(recs, tmp_path)[0].is_file()


def _rec(method, family, fd, nfe=21, setting="dpmpp_2m/20", **kw):
    r = {"phase": "method", "method": method, "setting": setting, "family": family}
    r |= {"status": "ok", "fd": fd, "nfe": nfe, "n": 100, "label": method}
    return r | kw


def _speed(times):
    return {"phase": "speed", "batch": 8, "repeats": 3, "timing": {"methods": times}}


def test_rules_on_hand_made_records():
    recs = [
        {"phase": "floor", "method": "fd-floor", "n": 100, "fd": 0.5},
        _rec("float", "float", 1.0),
        _rec("teacher", "float", 1.2, nfe=10, setting="nfe=10", solver="dpm_solver_3m"),
        _rec("w8a8-uniform", "quant", 1.1),  # 10 % worse: met (<=)
        _rec("w8a8-tdac", "quant", 1.3),
        _rec("deepcache-3", "cache", 1.05),
        _rec("deepcache-nonuniform-3", "cache", 1.1),  # slower than deepcache-3, worse FD
        _rec("encprop", "cache", 1.2),  # 1.6x but FD 20 % worse
        _rec("digits-lcm", "fewstep", 1.2, nfe=2, setting="nfe=2"),  # = teacher NFE 10: met
    ]
    t = {  # CPU s per sample; speed-up = 3 / t
        "float|dpmpp_2m/20": 3.0,
        "teacher|nfe=10": 1.5,
        "w8a8-uniform|dpmpp_2m/20": 3.75,
        "w8a8-tdac|dpmpp_2m/20": 3.75,
        "deepcache-3|dpmpp_2m/20": 3.0 / 1.49,
        "deepcache-nonuniform-3|dpmpp_2m/20": 3.0 / 1.4,
        "encprop|dpmpp_2m/20": 1.875,
        "digits-lcm|nfe=2": 0.25,
    }
    recs.append(_speed({k: {"cpu_s_per_sample": v} for k, v in t.items()}))
    rows = {r["method"]: r for r in accel.rows(recs)}
    assert rows["float"]["fd_ratio"] == 1.0 and rows["float"]["floor"] == 0.5
    assert rows["float"]["speedup"] == 1.0 and rows["encprop"]["speedup"] == 3.0 / 1.875
    # the note names the fastest simpler method at least as fast with an FD no worse
    assert rows["w8a8-uniform"]["note"].startswith("loses to float: 1.00x at FD 1.000")
    assert rows["w8a8-tdac"]["note"].startswith("loses to teacher: 2.00x")
    assert rows["deepcache-nonuniform-3"]["note"].startswith("loses to deepcache-3: 1.49x")
    assert rows["encprop"]["note"].startswith("loses to teacher")  # 2x at the same FD
    assert rows["deepcache-3"]["note"] == ""  # faster than float, better FD than teacher
    assert rows["teacher"]["note"] == "" and rows["digits-lcm"]["note"] == ""
    g = {text: (met, fig) for text, met, fig in accel.goals(recs)}
    assert g[accel.GOALS[0]][0] is True and "w8a8-uniform 1.100 (+10.00 %)" in g[accel.GOALS[0]][1]
    assert g[accel.GOALS[1]][0] is False  # 1.49x at FD +5 %; 1.6x at FD +20 %
    assert g[accel.GOALS[2]][0] is True
    # across the thresholds: W8A8 11 % worse, a cache at exactly 1.5x and +10 %, LCM worse
    recs[3]["fd"], recs[5]["fd"], recs[8]["fd"] = 1.11, 1.1, 1.21
    t["deepcache-3|dpmpp_2m/20"] = 2.0
    recs[-1] = _speed({k: {"cpu_s_per_sample": v} for k, v in t.items()})
    assert [m for _, m, _ in accel.goals(recs)] == [False, True, False]


def test_teacher_steps_give_exactly_the_nfe():
    for solver in am.TEACHER_SOLVERS:
        for nfe in (*am.TEACHER_NFES, accel.SELECT_NFE):
            assert am.count_nfe(solver, am.steps_for_nfe(solver, nfe)) == nfe
    assert am.count_nfe(am.SOLVER, am.STEPS) == 21
    with pytest.raises(ValueError, match="exactly 1 network"):
        am.steps_for_nfe("dpmpp_2m", 1)


def test_peak_memory_probe_sees_a_known_allocation():
    if not am._reset_peak():
        pytest.skip("no /proc/self/clear_refs here")
    before = am._status()["VmRSS"]
    x = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
    grown = am._status()["VmHWM"] - before
    del x
    assert 16 * 2**20 <= grown < 24 * 2**20


def test_methods_catalogue_and_cli():
    ms = am.methods("dpm_solver_3m")
    names = [m.name for m in ms]
    assert names[0] == "float" and names.count("teacher") == 3
    assert {"w8a8-uniform", "w8a8-ptq4dm", "w8a8-tdac", "w4a8-ptq4dm", "int8-dynamic"} <= set(names)
    assert "w8a8-edadm" in names
    # the compiled int8 program only in the full run (minutes of compilation per shape)
    assert am.REAL_INT8 not in names
    assert am.REAL_INT8 in [m.name for m in am.methods("dpm_solver_3m", real_int8=True)]
    assert not accel.settings(True, 0)["real_int8"] and accel.settings(False, 0)["real_int8"]
    assert accel.check_methods([am.REAL_INT8]) == ["float", am.REAL_INT8]
    assert {
        "deepcache-2",
        "deepcache-3",
        "deepcache-nonuniform-3",
        "encprop",
        "encprop-noise",
    } <= set(names)
    few = [m for m in ms if m.family == "fewstep"]
    assert [m.steps for m in few] == [1, 2, 4] * len(am.fewstep_names())
    assert all(m.solver == am.SOLVER and m.steps == am.STEPS for m in ms if m.family == "cache")
    from diffusolve.bench.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["accel", "--quick", "--out", "x", "--seed", "3", "--resume"])
    assert (args.quick, args.out, args.seed, args.resume) == (True, "x", 3, True)
    assert args.handler.__name__ == "accel_main" and args.methods is None
    args = parser.parse_args(["accel", "--methods", "fewstep,w8a8-tdac"])
    # the baseline always runs (every ratio is against it in the same run), catalogue order
    assert accel.check_methods(args.methods) == ["float", "w8a8-tdac", *am.fewstep_names()]
    assert accel.check_methods(["teacher"]) == ["float", "teacher"]
    assert accel.check_methods(None) is None
    with pytest.raises(ValueError, match="unknown method 'lcm'; choose from teacher, quant"):
        accel.check_methods(["lcm"])


@pytest.mark.slow
def test_quick_bench_through_the_cli(tmp_path):
    import json

    from diffusolve.bench.cli import accel_main

    parser = argparse.ArgumentParser()
    from diffusolve.bench.cli import register

    register(parser.add_subparsers())
    args = parser.parse_args(["accel", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert accel_main(args) == 0
    summary = json.loads((tmp_path / "accel.json").read_text())
    assert summary["rows"][0]["method"] == "float" and summary["rows"][0]["speedup"] == 1.0
    assert (tmp_path / "accel.md").is_file() and (tmp_path / "accel_quality_speed.png").is_file()


def test_fewstep_method_counts_real_calls_and_keeps_the_recipes_samples(tmp_path):
    """A few-step folder (the digits UNet with a 2-call DDIM recipe): the bench's NFE is
    the UNet calls counted by its hook (guidance: one call of a doubled batch), its samples
    are ``sample_fewstep``'s with sample ``i`` seeded ``seed + 1 + i``, and its size is the
    folder's bytes."""
    import shutil

    from diffusolve.models.bundled import asset_dir
    from diffusolve.models.fewstep import FewStepRecipe, sample_fewstep

    folder = tmp_path / "digits-ddim"
    shutil.copytree(asset_dir("digits") / "unet", folder / "unet")
    shutil.copytree(asset_dir("digits") / "scheduler", folder / "scheduler")
    FewStepRecipe("digits-ddim", "digits", "ddim", None, "denoise", (1, 2), 1, ()).save(folder)
    m = am.Method("digits-ddim", "nfe=2", "fewstep", "", 2, str(folder))
    labels = torch.tensor([3, 8, 1])
    try:
        x, nfe = am.sample_batch(m, 0, 3, labels, 5, {}, None)
        _, nfe_guided = am.sample_batch(m, 0, 3, labels, 5, {}, 2.0)
    finally:
        am._fewstep_model.cache_clear()
    assert (nfe, nfe_guided) == (2, 2)
    assert torch.equal(x, sample_fewstep(str(folder), 3, 2, labels, seed=6))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert am.disk_bytes(m, {}) == (size, "model folder (all files)")


def test_model_bytes_counts_any_network_module():
    """The compiled int8 path replaces the UNet by another module (Int8Network): its state
    is still counted (parameters and buffers, bytes by element size)."""

    class Wrapped(torch.nn.Module):  # stands in for Int8Network: not a diffusers UNet
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(3, 5)  # 15 weights + 5 biases, float32
            self.register_buffer("obs", torch.zeros(4, dtype=torch.float64))

    class Denoiser:
        unet = Wrapped()

    assert am.model_bytes(Denoiser()) == (15 + 5) * 4 + 4 * 8
