"""The command line: thin, but every sub-command works and bad input gets a clear error."""

import pytest
from PIL import Image

from diffusolve.cli import main


def test_version_and_solvers(capsys):
    assert main(["--version"]) == 0
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert "dpmpp_2m" in out and "unipc_bh2_2" in out


def test_sample_writes_a_grid_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", "digits", "--solver", "ddim", "--steps", "3", "--n", "4"]
    assert main(args + ["--label", "3", "--guidance", "2.0", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    before = out.read_bytes()
    assert main(args + ["--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args + ["--out", str(out), "--force"]) == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--label", "12"], "--label must be in"),
        (["--solver", "nope"], "unknown solver"),
        (["--n", "0"], "--n must be"),
    ],
)
def test_sample_bad_input(tmp_path, capsys, extra, message):
    args = [
        "sample",
        "--model",
        "digits",
        "--steps",
        "3",
        "--n",
        "2",
        "--out",
        str(tmp_path / "g.png"),
    ]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_train_refuses_to_overwrite_the_shipped_weights(capsys):
    from diffusolve.models.bundled import asset_dir

    assert main(["train", "digits", "--out", str(asset_dir()), "--steps", "1"]) == 2
    assert "--force" in capsys.readouterr().err


def test_demo_refuses_to_replace_a_report(tmp_path, capsys):
    """An earlier report is never replaced without --force, and the check comes first."""
    out = tmp_path / "userdir"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "my notes"
    assert list(out.iterdir()) == [out / "report.md"]


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    """The whole demo in its quick form (about 2 minutes on 2 idle cores, more when shared)."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "FD-digits" in report and "Exact reference" in report
    assert "Guidance and composition" in report and "3 AND 8" in report
    assert (out / "guidance.png").is_file() and (out / "compose.png").is_file()
    assert "Few-step models" in report and (out / "fewstep.png").is_file()
    assert len(list(out.glob("*.png"))) >= 12
    captured = capsys.readouterr()
    assert "report.md" in captured.out
    # without a terminal: one line per stage on stderr
    stages = [line for line in captured.err.splitlines() if line.startswith("[demo")]
    assert len(stages) >= 6 and any("FD-digits" in line for line in stages)
    # a second run needs --force (the panels and the report are the demo's own files)
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
