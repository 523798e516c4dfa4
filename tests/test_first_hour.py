"""A new user's first hour (issue 7): each test reproduces one defect found one step off the
README path, and checks the fix."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

import diffusolve
from diffusolve.cli import build_parser, main
from diffusolve.guidance import ClassifierFreeGuidance, classifier_free
from diffusolve.models import LabelConditioned, from_callable, load
from diffusolve.models.bundled import asset_dir
from diffusolve.process import ddpm, make_grid, rectified_flow
from diffusolve.sample_cli import divergence_warning, generate, parse_solver_options

ROOT = Path(__file__).resolve().parents[1]


def _sample_args(*extra: str) -> argparse.Namespace:
    """The namespace of ``diffusolve sample ...`` (for :func:`generate`)."""
    return build_parser(bench=False).parse_args(["sample", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- 1. reproducible CLI seeds


@pytest.mark.parametrize("solver", ["ddpm", "sde_dpmpp_2m"])
def test_cli_stochastic_samples_are_reproducible(tmp_path, solver):
    outs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # the global RNG must not matter
        out = tmp_path / f"r{i}.png"
        args = ["sample", "--solver", solver, "--steps", "10", "--n", "8", "--seed", "0"]
        assert main(args + ["--out", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_cli_sample_depends_on_its_seed_only():
    """Sample i of ``--n 8 --seed 0`` is sample 0 of ``--n 1 --seed i`` (same label)."""
    torch.manual_seed(1)
    many, _ = generate(_sample_args("--solver", "ddpm", "--steps", "6", "--n", "4", "--label", "5"))
    torch.manual_seed(2)
    one, _ = generate(
        _sample_args("--solver", "ddpm", "--steps", "6", "--n", "1", "--label", "5", "--seed", "3")
    )
    assert torch.allclose(many[3], one[0], atol=1e-5)
    assert not torch.allclose(many[2], one[0], atol=1e-2)


# ---------------------------------------------------------------- 2. any nn.Module


class Net(nn.Module):
    """An ordinary network: forward(x, t), float32 parameters, t embedded per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t):
        self.seen.append(t)
        return self.lin(torch.cat([x, t[:, None] / 1000], dim=1))


def test_from_callable_takes_an_ordinary_module():
    net = Net()
    model = from_callable(net, ddpm(), "epsilon")
    x = torch.randn(5, 2, dtype=torch.float64)  # solver state in float64, network in float32
    out = diffusolve.sample(model, x, 4, "ddim")
    assert out.dtype == torch.float64 and out.shape == x.shape
    t = net.seen[0]
    assert t.shape == (5,) and t.dtype == torch.float32 and t.device == x.device
    with pytest.raises(ValueError, match="takes no cond"):
        model(x, 500.0, torch.tensor([1]))


def test_from_callable_binds_cond_only_where_it_belongs():
    got = {}

    def net(x, t, scale=1.0):  # a parameter with a default is not the condition
        got["scale"] = scale
        return torch.zeros_like(x)

    model = from_callable(net, ddpm(), "epsilon")
    model(torch.ones(2, 2), 10.0)
    assert got["scale"] == 1.0
    with pytest.raises(ValueError, match="takes no cond"):
        model(torch.ones(2, 2), 10.0, 3)

    class CondNet(nn.Module):
        def forward(self, x, t, y):
            return x * y[:, None]

    class KeywordNet(nn.Module):
        def forward(self, x, t, cond=None, extra=0.0):
            return x * (1.0 if cond is None else 2.0)

    y = torch.tensor([2.0, 3.0])
    x = torch.ones(2, 2)
    assert torch.equal(from_callable(CondNet(), ddpm(), "x0")(x, 5.0, y)[:, 0], y)
    keyword = from_callable(KeywordNet(), ddpm(), "x0")
    assert float(keyword(x, 5.0).max()) == 1.0 and float(keyword(x, 5.0, "c").max()) == 2.0


def test_plain_functions_keep_the_time_the_solver_gives():
    seen = []

    def fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    from_callable(fn, rectified_flow(), "velocity")(torch.ones(3, 2), 0.5)
    assert seen[0].ndim == 0 and seen[0].dtype == torch.float32


# ---------------------------------------------------------------- 3. a trained model folder


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("my") / "my-digits"
    args = ["train", "digits", "--steps", "1", "--batch-size", "4", "--quiet"]
    assert main(args + ["--out", str(out)]) == 0
    return out


def test_a_trained_folder_behaves_like_the_bundled_model(trained_folder, tmp_path, capsys):
    model = load(trained_folder)
    assert isinstance(model, LabelConditioned) and model.num_classes == 10
    base = ["sample", "--model", str(trained_folder), "--steps", "3", "--n", "4"]
    assert main(base + ["--label", "3", "--guidance", "2.0", "--out", str(tmp_path / "a.png")]) == 0
    assert main(base + ["--out", str(tmp_path / "b.png")]) == 0
    assert "labels 0, 1, ..." in capsys.readouterr().out
    _, info = generate(_sample_args("--model", str(trained_folder), "--steps", "3", "--n", "12"))
    assert info["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


# ---------------------------------------------------------------- 4. one guidance convention


def test_guidance_scale_convention():
    """s = 0: unconditional (null class); s = 1: conditional; between: the straight line."""
    plain = load("digits")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        cond, uncond = plain(x, 600.0, labels), plain(x, 600.0, None)
        for s, expect in ((0.0, uncond), (1.0, cond), (0.5, 0.5 * (cond + uncond))):
            guided = diffusolve.load("digits", guidance=s)(x, 600.0, labels)
            assert torch.allclose(guided, expect, atol=1e-5), s
        two = classifier_free(plain, 2.0)(x, 600.0, labels)
        assert torch.allclose(two, uncond + 2.0 * (cond - uncond), atol=1e-5)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_guidance_scale_is_validated(bad, capsys):
    with pytest.raises(ValueError, match="finite number >= 0"):
        diffusolve.load("digits", guidance=bad)
    with pytest.raises(ValueError, match="finite number >= 0"):
        ClassifierFreeGuidance(load("digits"), bad, null_cond=torch.tensor([10]))
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--guidance", str(bad), "--out", "never.png"])
    assert exit_info.value.code == 2
    assert "--guidance: must be a finite number >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. one default grid


def test_cli_grid_is_the_library_default_grid():
    args = _sample_args("--solver", "euler", "--steps", "5", "--n", "3", "--label", "2")
    cli, info = generate(args)
    assert info["grid"] == "karras"
    model = load("digits")
    xT = model.process.prior_sample((3, 1, 16, 16), noise=0)
    with torch.no_grad():
        lib = diffusolve.sample(model, xT, 5, "euler", cond=2)
        explicit = diffusolve.sample(
            model, xT, make_grid(model.process, 5, "karras"), "euler", cond=2
        )
    assert torch.equal(lib, explicit) and torch.allclose(cli, lib, atol=1e-6)


# ---------------------------------------------------------------- 6. divergence is flagged


def test_divergence_warning(monkeypatch, tmp_path, capsys):
    assert divergence_warning(torch.tensor([0.0, -1.2, 3.0])) is None
    assert "diverged" in divergence_warning(torch.tensor([0.0, 5e3]))
    import diffusolve.solvers

    monkeypatch.setattr(
        diffusolve.solvers, "sample", lambda m, x, *a, **k: 1e4 * torch.ones_like(x)
    )
    assert main(["sample", "--steps", "3", "--n", "2", "--out", str(tmp_path / "d.png")]) == 0
    err = capsys.readouterr().err
    assert "|x| = 1e+04" in err and "diverged" in err


# ---------------------------------------------------------------- errors are one line


def test_a_corrupt_weights_file_is_one_line(tmp_path, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(asset_dir("digits"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x8f" * 1000)
    args = ["sample", "--model", str(folder), "--n", "2", "--steps", "2"]
    assert main(args + ["--out", str(tmp_path / "x.png")]) == 2
    err = _one_line_error(capsys)
    assert "cannot load the UNet weights" in err and "corrupt" in err
    (folder / "classifier.safetensors").write_bytes(b"junk")
    from diffusolve.models.classifier import load_classifier_from

    with pytest.raises(ValueError, match="cannot read the classifier weights"):
        load_classifier_from(folder)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--n", "0"], "--n must be at least 1"),
        (["--label", "3", "--model", "{flow}"], "--label needs a class-conditional model"),
        (["--solver-option", "nonsense=1"], "bad --solver-option for ddim"),
        (["--solver-option", "eta"], "--solver-option takes KEY=VALUE"),
        (["--model", "cifar"], "unknown bundled model"),
    ],
)
def test_sample_bad_input_is_one_line(tmp_path, capsys, extra, message):
    flow = tmp_path / "flow"
    _tiny_unconditional_folder(flow)
    extra = [e.replace("{flow}", str(flow)) for e in extra]
    args = ["sample", "--solver", "ddim", "--steps", "2", "--n", "2"]
    assert main(args + extra + ["--out", str(tmp_path / "g.png")]) == 2
    assert message in _one_line_error(capsys)


def _tiny_unconditional_folder(path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(path / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(path / "scheduler")


def test_out_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    import diffusolve.loading

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(diffusolve.loading, "load", never)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path, "is a folder"),
        (tmp_path / "grid", "has no extension"),
        (a_file / "grid.png", "is a file, not a folder"),
    ]
    for out, message in cases:
        assert main(["sample", "--out", str(out)]) == 2
        assert message in _one_line_error(capsys)
    assert main(["demo", "--quick", "--out", str(a_file)]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert main(["train", "digits", "--out", str(a_file / "model")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["train", "digits", "--steps", "0", "--out", str(tmp_path / "m")]) == 2
    assert "--steps must be at least 1" in _one_line_error(capsys)


def test_a_group_without_a_sub_command_fails(capsys):
    assert main(["bench"]) == 2
    assert "a sub-command is required" in capsys.readouterr().err
    assert main(["train"]) == 2


# ---------------------------------------------------------------- solver options and dtype


def test_solver_options_and_dtype_reach_the_solver():
    assert parse_solver_options(["eta=0", "lower_order_final=False", "variant=bh1"]) == {
        "eta": 0,
        "lower_order_final": False,
        "variant": "bh1",
    }
    common = ["--steps", "4", "--n", "2", "--label", "1"]
    ddpm_eta0, info = generate(
        _sample_args("--solver", "ddpm", "--solver-option", "eta=0", *common)
    )
    ddim, _ = generate(_sample_args("--solver", "ddim", *common))
    assert torch.equal(ddpm_eta0, ddim)
    stochastic, _ = generate(_sample_args("--solver", "ddpm", *common))
    assert not torch.allclose(stochastic, ddim, atol=1e-3)
    x64, _ = generate(_sample_args("--solver", "ddim", "--dtype", "float64", *common))
    assert x64.dtype == torch.float64 and torch.allclose(x64.float(), ddim, atol=1e-3)


# ---------------------------------------------------------------- set-up and README


def _make_dry_run(*variables: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cmd = ["make", "-n", "-B", "-C", str(ROOT), ".venv/.diffusolve-installed", *variables]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_makefile_torch_source_is_a_variable():
    default = [l.strip() for l in _make_dry_run().splitlines() if "torch==" in l]
    assert default == [".venv/bin/python -m pip install --quiet torch==2.13.0"]
    index = "https://download.pytorch.org/whl/cpu"
    chosen = [l for l in _make_dry_run(f"TORCH_INDEX={index}").splitlines() if "torch==" in l]
    assert chosen and chosen[0].strip().endswith(f"torch==2.13.0 --index-url {index}")
    assert "TORCH_INDEX" in (ROOT / "README.md").read_text()


def test_the_library_does_not_pin_torch():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = [d for d in deps if d.replace(" ", "").startswith("torch")]
    assert torch_dep and "==" not in torch_dep[0] and ">=" in torch_dep[0]


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom diffusolve.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TORCH False" in out.stdout
    assert "sample" in out.stdout and "bench" in out.stdout


def test_model_loading_prints_no_library_warnings(capfd):
    load("digits")
    diffusolve.load("digits", guidance=2.0)
    captured = capfd.readouterr()
    assert "accelerate" not in captured.err + captured.out


def test_solvers_table_fits_a_terminal():
    from diffusolve.solvers.table import solver_table

    text = solver_table(markdown=False, width=100)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "dpmpp_2m" in text and "Lu et al. 2022" in text
    assert "--markdown" in text


def test_readme_links_exist_and_the_slow_claim_is_true():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "docs/architecture.md" in readme
    if "marked `slow`" in readme:
        marked = [p for p in (ROOT / "tests").glob("test_*.py") if "mark.slow" in p.read_text()]
        assert marked, "the README says long tests are marked slow, but none is"
