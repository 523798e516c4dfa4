"""Bad bench input is one line on stderr, a non-zero exit and no work; outputs are never
overwritten without --force; diverged results are flagged; plots are per family."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusolve.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err: str, *words: str) -> None:
    assert rc not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--tasks", "foo"], ["--tasks", "'foo'", "gmm-d2-vp"]),
        (["--tasks", "gauss-d2-vp,bar,baz"], ["'bar'", "'baz'"]),
        (["--n-samples", "0"], ["--n-samples", "positive", "0"]),
        (["--nfe", "0"], ["--nfe", "positive", "0"]),
        (["--nfe", "5,-1"], ["--nfe", "-1"]),
        (["--methods", "nope"], ["--methods", "'nope'", "ddim"]),
        (["--schedulers", "Nope"], ["--schedulers", "'Nope'", "UniPC"]),
        (["--resume", "--force"], ["--resume", "--force"]),
        (["--schedules", "no-such-schedule"], ["--schedules", "'no-such-schedule'"]),
        (["--schedules", "missing.json"], ["--schedules", "missing.json"]),
        (["--fd-samples", "-1"], ["--fd-samples", "-1"]),
    ],
)
def test_samplers_bad_arguments_are_one_line(capsys, tmp_path, argv, words):
    rc, out, err = _run(
        capsys, "bench", "samplers", *argv, "--out", str(tmp_path / "o"), "--no-progress"
    )
    _one_line_error(rc, err, *words)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_overhead_bad_repeats_and_steps(capsys):
    _one_line_error(*_run(capsys, "bench", "overhead", "--repeats", "0")[::2], "--repeats")
    _one_line_error(*_run(capsys, "bench", "overhead", "--steps", "-3")[::2], "--steps", "-3")
    from diffusolve.bench.overhead import run_overhead

    with pytest.raises(ValueError, match="repeats"):
        run_overhead(repeats=0)


def test_output_paths_checked_before_work(capsys, tmp_path):
    existing = tmp_path / "user.json"
    existing.write_text("{}")
    rc, _, err = _run(capsys, "bench", "overhead", "--json", str(existing))
    _one_line_error(rc, err, "already exists", "--force")
    assert existing.read_text() == "{}"
    tiny = ["bench", "samplers", "--tasks", "gauss-d2-vp", "--nfe", "5", "--out", str(tmp_path)]
    rc, _, err = _run(capsys, *tiny, "--json", str(existing))
    _one_line_error(rc, err, "already exists", "--force")
    rc, _, err = _run(capsys, *tiny, "--json", str(tmp_path))
    _one_line_error(rc, err, "is a directory")
    rc, _, err = _run(capsys, *tiny, "--json", str(existing / "x.json"))
    _one_line_error(rc, err, "is a file")
    rc, _, err = _run(capsys, *tiny, "--records", str(existing / "x.jsonl"))
    _one_line_error(rc, err, "is a file")
    rc, _, err = _run(capsys, "bench", "samplers", "--tasks", "gauss-d2-vp", "--out", str(existing))
    _one_line_error(rc, err, "--out", "is a file")
    records = tmp_path / "r.jsonl"
    records.write_text("")
    rc, _, err = _run(capsys, *tiny, "--records", str(records))
    _one_line_error(rc, err, "already exists", "--resume", "--force")
    assert existing.read_text() == "{}" and records.read_text() == ""


def test_force_overwrites_and_default_records_next_to_json(capsys, tmp_path):
    js = tmp_path / "b.json"
    js.write_text("old")
    argv = [
        "bench", "samplers", "--tasks", "gauss-d2-vp", "--nfe", "5", "--n-samples", "8",
        "--methods", "ddim", "--schedulers", "DDIM", "--quick", "--no-progress",
        "--out", str(tmp_path / "out"), "--json", str(js),
    ]  # fmt: skip
    rc, out, err = _run(capsys, *argv, "--force")
    assert rc == 0, err
    assert js.read_text().startswith("{") and (tmp_path / "b.jsonl").exists()
    # the finished run can be resumed (nothing left to run) and re-writes its own --json
    rc, out, err = _run(capsys, *argv, "--resume")
    assert rc == 0, err
    assert "0 runs" in out


def test_bench_without_subcommand_fails_with_its_help():
    r = subprocess.run(
        [sys.executable, "-m", "diffusolve", "bench"], capture_output=True, text=True
    )
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "samplers" in text and "overhead" in text and "Traceback" not in text


def test_diverged_result_is_flagged_not_ranked():
    from diffusolve.bench.report import DIVERGED_MARK, markdown_tables, summarize
    from diffusolve.bench.samplers import run_bench

    # pndm's fixed coefficients blow up on rectified flow at this budget (a known case)
    out = run_bench(
        tasks=["gauss-d2-rf"], nfes=[10], n_samples=8, n_select=8, methods=["pndm", "ddim"],
        schedulers=[], quick=True, progress=False,
    )  # fmt: skip
    by = {r["method"]: r for r in out["records"]}
    assert by["pndm"]["diverged"] is True and by["pndm"]["scale_ratio"] > 10
    assert "diverged" in by["pndm"]["note"]
    assert by["ddim"]["diverged"] is False and by["ddim"]["scale_ratio"] < 2
    table = markdown_tables(out)
    row = next(line for line in table.splitlines() if "| pndm |" in line)
    assert DIVERGED_MARK in row
    # even when a diverged result has the lowest error it is never a best
    recs = [dict(by["pndm"], rel_error=1e-9), by["ddim"]]
    assert summarize(recs)[0]["ours_method"] == "ddim"


def test_plot_groups_methods_by_family(tmp_path):
    from diffusolve.bench.report import family, plot_errors

    assert family("dpmpp_3m") == family("DPM-Solver++ 2M") == family("dpm_solver_2s")
    assert family("unipc_bh1_2") == family("UniPC")
    assert family("euler") == family("FlowMatchHeun") == family("ddim") == family("DDIM")
    assert family("ipndm") == family("PNDM") == family("plms")
    recs = [
        dict(task="t", library=lib, method=m, nfe=n, rel_error=e / n, diverged=m == "pndm")
        for lib, ms in (("diffusolve", ["ddim", "dpmpp_2m", "unipc_bh2_2", "pndm", "foo"]),
                        ("diffusers", ["DDIM", "UniPC"]))
        for m in ms
        for n, e in ((5, 1.0), (10, 0.5))
    ]  # fmt: skip
    (path,) = plot_errors({"tasks": {"t": {}}, "records": recs}, tmp_path)
    assert path.stat().st_size > 10_000
