"""The guidance bench's assembly: phases from several modules on one resumable records file."""

from __future__ import annotations

import types

import pytest

from diffusolve.bench import guidance as bench
from diffusolve.bench.runner import Job


def _fake(name: str, phases: tuple[str, ...], calls: list) -> types.SimpleNamespace:
    def jobs(quick: bool, seed: int):
        for phase in phases:
            for i in range(2):
                key = {
                    "bench": "guidance",
                    "phase": phase,
                    "task": "t",
                    "method": f"m{i}",
                    "setting": "s",
                }

                def run(store, i=i, phase=phase):
                    calls.append((name, phase, i))
                    return {"value": i + seed, "quick": quick}

                yield Job(key, run)

    def tables(records):
        return [
            (
                f"{name} table",
                "| m | v |\n|---|---|\n"
                + "".join(f"| {r['method']} | {r['value']} |\n" for r in records),
            )
        ]

    def goals(records):
        return [(f"{name} goal", all(r["value"] >= 0 for r in records), f"{len(records)} rows")]

    return types.SimpleNamespace(
        PHASES=phases, jobs=jobs, tables=tables, goals=goals, plots=lambda records, out: []
    )


@pytest.fixture
def fake_modules(monkeypatch):
    calls: list = []
    mods = {"a": _fake("a", ("p1", "p2"), calls), "b": _fake("b", ("p3",), calls)}
    monkeypatch.setattr(bench, "MODULES", ("a", "b"))
    monkeypatch.setattr(bench, "_module", lambda name: mods[name])
    return calls


def test_runs_selected_phases_and_reports(fake_modules, tmp_path):
    out = bench.run_guidance(
        phases=["p3", "p1"], seed=1, records=tmp_path / "g.jsonl", progress=False
    )
    assert [(r["phase"], r["method"]) for r in out["records"]] == [
        ("p1", "m0"),
        ("p1", "m1"),
        ("p3", "m0"),
        ("p3", "m1"),
    ]
    assert [g["goal"] for g in out["goals"]] == ["a goal", "b goal"]
    text = bench.markdown_report(out)
    assert "| a goal | yes | 2 rows |" in text and "## b table" in text


def test_resume_runs_nothing_twice(fake_modules, tmp_path):
    rec = tmp_path / "g.jsonl"
    first = bench.run_guidance(records=rec, progress=False)
    n = len(fake_modules)
    again = bench.run_guidance(records=rec, resume=True, progress=False)
    assert len(fake_modules) == n  # every job was skipped
    strip = [{k: v for k, v in r.items() if k != "timing"} for r in first["records"]]
    assert [{k: v for k, v in r.items() if k != "timing"} for r in again["records"]] == strip
    with pytest.raises(FileExistsError, match="--resume"):
        bench.run_guidance(records=rec, progress=False)


def test_unknown_phase_names_the_known_ones(fake_modules):
    with pytest.raises(ValueError, match="choose from p1, p2, p3"):
        bench.check_phases(["nope"])


def test_cli_refuses_bad_phase_before_work(tmp_path, capsys):
    from diffusolve.cli import main

    rc = main(["bench", "guidance", "--phases", "nope", "--out", str(tmp_path)])
    assert rc == 2
    assert "unknown phase 'nope'" in capsys.readouterr().err
