"""``diffusolve bench inverse``: the GMM problems follow the MCGdiff set-up, the noise floor
comes from two independent exact sets, tuning never touches the reported problems, and a
tiny end-to-end run writes records, report and plots and resumes without redoing jobs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusolve.bench import inverse as inv
from diffusolve.bench.inverse_tasks import (
    GMM_DIMS,
    GMM_DYS,
    exact_samples,
    grid_means,
    make_problem,
    problem_seed,
)
from diffusolve.cli import main
from diffusolve.inverse.matrix import MatrixOperator
from diffusolve.inverse.samplers import SAMPLERS, get_sampler
from diffusolve.metrics.sliced import sliced_wasserstein


@pytest.mark.parametrize(("d", "dy"), [(8, 1), (8, 4), (80, 2)])
def test_problem_follows_the_mcgdiff_setup(d, dy):
    p = make_problem(d, dy, 3)
    r = range(-2, 3)
    grid = {(-8.0 * i, -8.0 * j) for i in r for j in r}
    means = p.prior.means
    assert means.shape == (25, d)
    assert {tuple(m[:2].tolist()) for m in means} == grid
    for k in range(0, d, 2):  # the 2-D grid tiled d/2 times
        assert torch.equal(means[:, k : k + 2], means[:, :2])
    assert torch.equal(grid_means(d), means)
    assert p.prior.evecs is None and torch.all(p.prior.evals == 1.0)  # identity covariances
    g = torch.Generator().manual_seed(p.seed)
    w = torch.randn(25, generator=g, dtype=torch.float64) ** 2
    assert torch.allclose(p.prior.weights, w / w.sum())
    s = torch.linalg.svdvals(p.matrix)
    assert p.matrix.shape == (dy, d)
    assert torch.allclose(s, p.s, atol=1e-12)
    assert torch.all(p.s[:-1] >= p.s[1:]) and torch.all((p.s > 0) & (p.s < 1))
    assert 0 < p.sigma_y < float(p.s.max())
    assert p.y.shape == (dy,) and p.x_true.shape == (d,)
    assert p.prior.process.name == "ddpm-linear"
    assert isinstance(p.operator, MatrixOperator)
    q = make_problem(d, dy, 3)
    assert torch.equal(q.y, p.y) and torch.equal(q.matrix, p.matrix)  # reproducible
    assert not torch.equal(make_problem(d, dy, 4).matrix, p.matrix)


def test_seeds_are_unique_and_tuning_seeds_never_reported():
    reported = [problem_seed(d, dy, i) for d in GMM_DIMS for dy in GMM_DYS for i in range(20)]
    tuning = [
        problem_seed(d, dy, j, tuning=True) for d in GMM_DIMS for dy in GMM_DYS for j in range(3)
    ]
    assert len(set(reported)) == len(reported) and len(set(tuning)) == len(tuning)
    assert not set(reported) & set(tuning)
    with pytest.raises(ValueError):
        problem_seed(8, 1, 5000)
    with pytest.raises(ValueError):
        problem_seed(10, 1, 0)


def test_floor_is_the_distance_between_two_independent_exact_sets():
    p = make_problem(8, 1, 0)
    a, b = exact_samples(p, 200, 0), exact_samples(p, 200, 1)
    assert not torch.equal(a, b)
    assert torch.equal(a, exact_samples(p, 200, 0))
    store = inv.RecordStore(None, bench=inv.BENCH, key_fields=inv.KEY_FIELDS)
    cfg = {"n_samples": 200, "tune_samples": 100, "n_projections": 300}
    job = inv._floor_job(cfg, inv._Problems(), 8, 1, 0, False)
    rec = job.run(store)
    assert rec["sw_floor"] == pytest.approx(sliced_wasserstein(b, a, 300, seed=p.seed))
    assert rec["sw_floor"] > 0 and rec["seed"] == p.seed


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_candidates_change_one_option_at_a_time(name):
    space = get_sampler(name).search_space()
    full = inv.candidates(name, "one-at-a-time", cap=100)
    near = inv.candidates(name, "neighbours", cap=100)
    assert inv.candidates(name, "defaults") == full[:1]
    if not space:
        assert full == [{}]
        return
    default = full[0]
    assert set(default) == set(space)
    for c in full[1:]:
        assert sum(c[k] != default[k] for k in c) == 1
    assert all(c in full or c == default for c in near)
    assert len(inv.candidates(name, "one-at-a-time", cap=2)) <= 2


def test_tuning_uses_only_tuning_problems(monkeypatch, tmp_path):
    calls = []
    real = inv._run_gmm

    def spy(method, setting, p, n, steps):
        calls.append((p.tuning, p.seed, dict(setting)))
        return real(method, setting, p, n, steps)

    monkeypatch.setattr(inv, "_run_gmm", spy)
    out = inv.run_inverse(
        methods=["dps"],
        dims=[8],
        dys=[1],
        steps=[4],
        problems=2,
        n_samples=48,
        n_projections=100,
        tune_problems=2,
        tune_samples=32,
        strategy="neighbours",
        image_tasks=[],
        records=tmp_path / "t.jsonl",
        progress=False,
    )
    tuned = {s for t, s, _ in calls if t}
    reported = {s for t, s, _ in calls if not t}
    assert tuned == {problem_seed(8, 1, j, tuning=True) for j in range(2)}
    assert reported == {problem_seed(8, 1, i) for i in range(2)}
    n_cands = len(inv.candidates("dps", "neighbours"))
    assert [t for t, _, _ in calls] == [True] * (2 * n_cands) + [False] * 2  # tuning first
    # the reported runs use the candidate with the lowest mean sw/floor on the tuning problems
    lines = (tmp_path / "t.jsonl").read_text().splitlines()[1:]
    tune = [json.loads(x) for x in lines if json.loads(x)["phase"] == "tune"]
    assert all(str(r["problem"]).startswith("tune-") for r in tune)
    score: dict[str, list[float]] = {}
    for r in tune:
        score.setdefault(json.dumps(r["setting"]), []).append(r["sw"] / r["sw_floor"])
    best = min(score, key=lambda k: sum(score[k]) / len(score[k]))
    recs = out["gmm"]
    assert {json.dumps(r["setting"]) for r in recs} == {best}
    assert all(r["tuned"] and r["candidates"] == n_cands for r in recs)
    assert all(r["sw"] > 0 and r["sw_floor"] > 0 and r["nfe"] == 4 for r in recs)


def _refusing_sampler() -> str | None:
    op = MatrixOperator(torch.zeros(1, 8), (8,))
    for name in SAMPLERS:
        try:
            get_sampler(name).check(op)
        except NotImplementedError:
            return name
    return None


def test_end_to_end_records_report_plots_and_resume(tmp_path, capsys):
    out = tmp_path / "out"
    methods = ["ddrm", "dps"]
    refusing = _refusing_sampler()
    if refusing is not None:
        methods.append(refusing)
    argv = [
        "bench", "inverse", "--quick", "--methods", ",".join(methods), "--dims", "8",
        "--steps", "4", "--problems", "2", "--n-samples", "48", "--image-tasks", "sr4",
        "--n-images", "2", "--out", str(out), "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr()
    assert "| d | dy | steps | floor | " in text.out
    assert "[1/" in text.err  # progress lines
    report = (out / "inverse.md").read_text()
    assert "Tuning protocol" in report and "| sr4 | 4 | ddrm |" in report
    assert (out / "inverse_gmm_sw.png").stat().st_size > 0
    assert (out / "inverse_panel_sr4.png").stat().st_size > 0
    records = tmp_path / "r.jsonl"
    lines = records.read_text().splitlines()
    assert json.loads(lines[0])["header"]["bench"] == "inverse"
    recs = [json.loads(x) for x in lines[1:]]
    gmm = [r for r in recs if r["phase"] == "gmm"]
    assert len(gmm) == 2 * 2  # 2 methods x 2 problems
    for r in gmm:
        assert {"method", "task", "nfe", "sw", "sw_floor", "d", "dy", "steps", "problem"} <= set(r)
        assert r["task"] == "gmm-d8-dy1" and math.isfinite(r["sw"]) and r["sw_floor"] > 0
        assert isinstance(r["setting"], dict)
    images = [r for r in recs if r["phase"] == "image"]
    assert {r["method"] for r in images} == {"ddrm", "dps"}
    for r in images:
        assert {"psnr", "ssim", "fd", "class_agreement", "nfe"} <= set(r)
        assert r["timing"]["seconds_per_image"] > 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert all(r["seconds"] > 0 for r in result["images"])
    if refusing is not None:
        assert {s["method"] for s in result["skipped"]} == {refusing}
        assert "n/a¹" in report
    # an existing report is not overwritten without --force / --resume
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    # --resume skips every recorded job
    assert main([*argv, "--resume", "--no-progress"]) == 0
    assert "0 jobs run" in capsys.readouterr().out
    assert records.read_text().splitlines() == lines


def test_dims_none_runs_the_image_part_alone(tmp_path, capsys):
    out = tmp_path / "img"
    argv = [
        "bench", "inverse", "--quick", "--methods", "ddrm", "--dims", "none", "--steps", "4",
        "--image-tasks", "sr4", "--n-images", "2", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    recs = [json.loads(x) for x in (out / "inverse.jsonl").read_text().splitlines()[1:]]
    assert recs and {r["phase"] for r in recs} <= {"image", "image-task", "image-tune"}
    assert not any(r["task"].startswith("gmm") for r in recs)
    assert not (out / "inverse_gmm_sw.png").exists()
    assert (out / "inverse_panel_sr4.png").stat().st_size > 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--dims", "7"], ["--dims", "7"]),
        (["--dims", ""], ["--dims", "empty"]),
        (["--dy", "3"], ["--dy", "3"]),
        (["--methods", "nope"], ["--methods", "'nope'"]),
        (["--image-tasks", "foo"], ["--image-tasks", "'foo'"]),
        (["--problems", "0"], ["--problems", "0"]),
        (["--resume", "--force"], ["--resume", "--force"]),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, words):
    rc = main(["bench", "inverse", "--quick", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "o").exists()


def test_runs_split_by_method_and_problems_merge_into_the_one_run(tmp_path, capsys):
    """Two runs split by method (one of them with fewer problems) give, merged, the records
    one run writes; --report-only reads them without running anything and marks the cell
    with fewer problems; a run of other sample sizes is refused."""
    base = [
        "bench", "inverse", "--quick", "--dims", "8", "--steps", "4", "--n-samples", "48",
        "--image-tasks", "none", "--no-progress",
    ]  # fmt: skip

    def run(name, *extra):
        argv = [*base, "--out", str(tmp_path / name), *extra]
        assert main(argv) == 0, capsys.readouterr().err
        return tmp_path / name / "inverse.jsonl"

    a = run("a", "--methods", "ddrm", "--problems", "2")
    b = run("b", "--methods", "dps", "--problems", "1")
    one = run("one", "--methods", "ddrm,dps", "--problems", "2")
    capsys.readouterr()

    def gmm(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()[1:]]
        return sorted((r["method"], r["problem"], r["sw"]) for r in recs if r["phase"] == "gmm")

    # the report of the two parts: dps has 1 of 2 problems, and nothing ran
    part = [*base, "--methods", "ddrm,dps", "--problems", "2", "--out", str(tmp_path / "m")]
    assert main([*part, "--report-only", "--merge", f"{a},{b}"]) == 0
    out = capsys.readouterr().out
    assert "[1/2]" in out and "no job run" in out
    assert not (tmp_path / "m" / "inverse.jsonl").exists()  # report only: no records written
    # merged into a records file, the resumed run runs only the missing dps problem
    assert main([*part, "--merge", f"{a},{b}", "--force"]) == 0
    cap = capsys.readouterr()
    assert "merged 8 finished jobs" in cap.err and "merged 4 finished jobs" in cap.err
    assert "; 1 jobs run, 12 resumed" in cap.out  # dps on problem 1 (its floor came from a)
    assert gmm(tmp_path / "m" / "inverse.jsonl") == gmm(one)
    # other sample sizes change the records' values: refused, one line
    other = run("c", "--methods", "ddrm", "--problems", "1", "--n-samples", "40")
    rc = main([*part, "--out", str(tmp_path / "d"), "--report-only", "--merge", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "n_samples=40" in err[0]


def test_rows_run_in_pieces_give_the_same_samples(monkeypatch):
    """Samplers with independent rows run a problem's samples in pieces (bounded memory at
    d = 800) with the pieces' own per-sample seeds: the same rows, bit for bit. Pooled
    filters (TDS's default) are never split."""
    p = make_problem(8, 2, 0, tuning=True)
    assert get_sampler("mcgdiff").rows_independent and not get_sampler("tds").rows_independent
    whole, _ = inv._run_gmm("mcgdiff", {"particles": 8}, p, 40, 4)
    monkeypatch.setattr(inv, "ROW_BUDGET", 8 * 8 * 7)  # pieces of 7 rows
    pieces, _ = inv._run_gmm("mcgdiff", {"particles": 8}, p, 40, 4)
    assert torch.equal(whole, pieces)


def test_a_cell_with_two_settings_reports_the_one_tuned_from_more_candidates():
    old = {"setting": {"a": 1}, "candidates": 7, "tune_ratio": 2.0, "problem": 0, "sw": 4.0}
    new = {"setting": {"a": 2}, "candidates": 8, "tune_ratio": 3.0, "problem": 0, "sw": 1.0}
    assert inv._current_setting([old, dict(new, problem=1), new]) == [dict(new, problem=1), new]
    assert inv._current_setting([old]) == [old]


def test_the_report_takes_the_setting_the_current_search_space_picks():
    """Records merged from runs tuned over different grids: the report re-picks the cell's
    setting from the tuning records of today's candidates, even when an older, smaller
    run's records are the ones it picks (a count of candidates alone would prefer the run
    in between)."""
    from diffusolve.bench.runner import RecordStore

    meta = {"strategy": "one-at-a-time", "image_tune": "one-at-a-time", "max_candidates": 16}
    meta["tune_problems"] = 2
    cands = inv._cands(meta, "dps", "gmm")
    store = RecordStore(None, bench=inv.BENCH, key_fields=inv.KEY_FIELDS)
    best = cands[2]
    for c in cands:
        for j in range(2):
            ratio = 1.0 if c == best else 5.0 + j
            key = inv._key("tune", "gmm-d8-dy1", "dps", 20, inv._problem_id(j, True), c)
            store.append({**key, "ratio": ratio}, write=False)
    assert inv._tuned_setting(store, meta, "gmm-d8-dy1", "dps", 20, "gmm") == best
    assert inv._tuned_setting(store, meta, "gmm-d8-dy2", "dps", 20, "gmm") is None  # untuned
    old = {"setting": best, "candidates": 5, "problem": 0, "sw": 4.0}
    mid = {"setting": cands[1], "candidates": 6, "problem": 0, "sw": 1.0}
    assert inv._current_setting([old, mid], best) == [old]
    assert inv._current_setting([old, mid], None) == [mid]
    for c in inv._cands(meta, "dps", "image"):
        key = inv._key("image-tune", "sr4", "dps", 20, "train", c)
        store.append({**key, "psnr": 30.0 if c == best else 20.0}, write=False)
    assert inv._tuned_setting(store, meta, "sr4", "dps", 20, "image") == best
