"""``diffusolve restore``: outputs, measurements, errors and the demo's restoration panel.

Few steps everywhere: these check the command, not the quality of the samplers (the
samplers' own tests do that).
"""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusolve.cli import main
from diffusolve.inverse.samplers import SAMPLERS
from diffusolve.inverse.tasks import IMAGE_TASKS, make_task

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    """A held-out digit as a 16x16 greyscale PNG, and the [-1, 1] image the command reads."""
    from diffusolve.models.data import load_digits

    x, _ = load_digits("heldout")
    arr = ((x[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("input") / "digit.png"
    Image.fromarray(arr, "L").save(path)
    return path, torch.from_numpy(arr.astype(np.float64))[None, None] / 127.5 - 1.0


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.int16)


def test_run_writes_the_png_and_never_overwrites(tmp_path, capsys, digit):
    out = tmp_path / "r.png"
    args = ["restore", "--task", "inpaint-box", "--method", "pigdm", "--input", str(digit[0])]
    args += ["--sigma-y", "0.05", "--seed", "0", "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    assert Image.open(out).size == (16, 16)
    summary = capsys.readouterr().out
    for word in ("pigdm", "inpaint-box", "3 steps", "3 NFE", "PSNR", " s,"):
        assert word in summary, summary
    before = out.read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args + ["--force"]) == 0


@pytest.mark.parametrize("task", sorted(IMAGE_TASKS))
def test_noiseless_measurement_is_the_task_operator(tmp_path, digit, task):
    """With --sigma-y 0 the saved y is exactly make_task(task, shape)(x)."""
    y_path = tmp_path / "y.npy"
    argv = ["restore", "--task", task, "--method", "ddnm", "--input", str(digit[0])]
    argv += ["--sigma-y", "0", "--steps", "1", "--out", str(tmp_path / "r.png")]
    assert main(argv + ["--save-measurement", str(y_path), "--no-progress"]) == 0
    y = torch.from_numpy(np.load(y_path))
    expected = make_task(task, (1, 16, 16))(digit[1])
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_ddnm_keeps_the_observed_pixels(tmp_path, digit):
    """Noiseless box inpainting with a projection method: the observed pixels come back
    (up to the 8-bit quantisation of the PNG)."""
    out = tmp_path / "r.png"
    argv = ["restore", "--task", "inpaint-box", "--method", "ddnm", "--input", str(digit[0])]
    assert main(argv + ["--sigma-y", "0", "--steps", "8", "--out", str(out)]) == 0
    mask = make_task("inpaint-box", (1, 16, 16)).A(torch.ones(1, 1, 16, 16))[0, 0].bool().numpy()
    assert 0 < mask.sum() < 256
    diff = np.abs(_png(out) - _png(digit[0]))
    assert diff[mask].max() <= 1
    assert diff[~mask].max() > 1  # the hidden box was filled in, not copied


def test_measurement_file_round_trip_and_wrong_shape(tmp_path, capsys, digit):
    y_path = tmp_path / "y.pt"
    common = ["restore", "--task", "sr4", "--method", "ddrm", "--steps", "2", "--seed", "3"]
    first = tmp_path / "a.png"
    argv = common + ["--input", str(digit[0]), "--out", str(first)]
    assert main(argv + ["--save-measurement", str(y_path)]) == 0
    y = torch.load(y_path)
    assert y.shape == (1, 1, 4, 4)
    # the same y, without the batch dimension and without --input: the same restoration
    np.save(tmp_path / "y.npy", y[0].numpy())
    second = tmp_path / "b.png"
    assert main(common + ["--measurement", str(tmp_path / "y.npy"), "--out", str(second)]) == 0
    assert "PSNR" not in capsys.readouterr().out.splitlines()[-1]
    assert np.array_equal(_png(first), _png(second))
    # a measurement of the wrong shape: one line naming the expected shape
    np.save(tmp_path / "bad.npy", np.zeros((16, 16), dtype=np.float32))
    bad = common + ["--measurement", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "c.png")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "(16, 16)" in err and "(1, 4, 4)" in err and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_a_method_that_cannot_use_the_operator_exits_2(tmp_path, capsys, monkeypatch, digit):
    """The sampler's own message (what the operator lacks), exit status 2, no traceback."""
    from diffusolve.inverse import CompressedSensing

    monkeypatch.setattr(CompressedSensing, "has_svd", False)
    monkeypatch.setattr(CompressedSensing, "has_pinv", False)
    out = tmp_path / "r.png"
    argv = ["restore", "--task", "cs25", "--method", "ddrm", "--input", str(digit[0])]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ddrm needs an SVD" in err and "CompressedSensing" in err and "cs25" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif("repaint" not in SAMPLERS, reason="repaint is not registered")
def test_repaint_refuses_a_task_that_is_not_inpainting(tmp_path, capsys, digit):
    argv = ["restore", "--task", "sr4", "--method", "repaint", "--input", str(digit[0])]
    assert main(argv + ["--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "repaint" in err and "Traceback" not in err


def test_list_names_every_sampler_and_task(capsys):
    assert main(["restore", "--list"]) == 0
    out = capsys.readouterr().out
    for name, cls in SAMPLERS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert all(need in line for need in cls.needs), line
    for task, (description, _) in IMAGE_TASKS.items():
        assert task in out and description in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "nope"], "choose from " + ", ".join(sorted(SAMPLERS))),
        (["--task", "nope"], "choose from " + ", ".join(sorted(IMAGE_TASKS))),
        (["--option", "nope=1"], "its options are"),
        (["--option", "eta"], "KEY=VALUE"),
        (["--steps", "0"], "--steps must be"),
        (["--input", "missing.png"], "no such file"),
    ],
)
def test_bad_input(tmp_path, capsys, digit, extra, message):
    argv = ["restore", "--method", "pigdm", "--input", str(digit[0])]
    assert main(argv + ["--out", str(tmp_path / "r.png")] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_input_and_bad_sigma(tmp_path, capsys):
    assert main(["restore", "--out", str(tmp_path / "r.png")]) == 2
    assert "--input" in capsys.readouterr().err
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(SystemExit) as exc:
            main(["restore", "--sigma-y", bad, "--input", "x.png"])
        assert exc.value.code == 2
        assert "--sigma-y" in capsys.readouterr().err


def test_a_larger_input_is_resized_with_a_note(tmp_path, capsys, digit):
    big = tmp_path / "big.png"
    Image.open(digit[0]).resize((40, 32)).save(big)
    argv = ["restore", "--input", str(big), "--steps", "1", "--samples", "2"]
    assert main(argv + ["--out", str(tmp_path / "r.png")]) == 0
    assert "resized --input big.png from 40x32 to the model's 16x16" in capsys.readouterr().err
    assert Image.open(tmp_path / "r.png").size == (35, 18)  # two samples, 1-pixel padding


def test_demo_restoration_section(tmp_path, monkeypatch):
    """The demo's restoration panel alone, in its quick form cut to one digit and 2 steps
    (the whole quick demo is the slow test in test_cli.py)."""
    from diffusolve import demo

    monkeypatch.setattr(demo, "DEMO_RESTORE_CLASSES", (3,))
    monkeypatch.setattr(demo, "DEMO_RESTORE_STEPS", (2, 2))
    md, tables = demo._restoration_section(tmp_path, True, False, time.time())
    methods = demo._restoration_methods(
        [make_task(t, (1, 16, 16)) for t in demo.DEMO_RESTORE_TASKS]
    )
    assert len(methods) == 3
    assert "![restoration panel](restoration.png)" in md and "PSNR" in tables[0]
    for task in demo.DEMO_RESTORE_TASKS:
        for name in methods:
            assert f"| {task} | {name} | 2 |" in tables[0]
    # one row (one digit): per task the measurement and the methods, then the ground truth
    columns = len(demo.DEMO_RESTORE_TASKS) * (1 + len(methods)) + 1
    assert Image.open(tmp_path / "restoration.png").size == (3 * (columns * 17 + 1), 3 * 18)


def test_list_says_what_repaint_needs(capsys):
    """A sampler without capability flags still says in --list what it asks of the operator."""
    from diffusolve.restore_cli import list_text

    lines = {line.split()[0]: line for line in list_text().splitlines() if line.startswith("  ")}
    for name, cls in SAMPLERS.items():
        assert "needs -" not in lines[name] or not (cls.needs or cls.requires), lines[name]
    if "repaint" in SAMPLERS:
        assert "needs a binary inpainting mask" in lines["repaint"]
