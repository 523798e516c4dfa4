"""The bundled digits model, its classifier and FD-digits: real behaviour of shipped weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusolve
from diffusolve.metrics import frechet_distance
from diffusolve.models import Denoiser, fd_digits, load
from diffusolve.models.bundled import asset_dir, load_classifier
from diffusolve.models.data import load_digits, split
from diffusolve.process import DiscreteVP, from_scheduler_config
from diffusolve.train.digits import sample_digits

ASSETS = asset_dir("digits")
CARD = json.loads((ASSETS / "metrics.json").read_text())
TEST = CARD["test_check"]  # the card's figure for exactly the configuration used below


@pytest.fixture(scope="module")
def guided_samples() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(TEST["n"]) % 10
    model = diffusolve.load("digits", guidance=TEST["guidance"])
    return sample_digits(model, labels, TEST["steps"], TEST["solver"], seed=TEST["seed"]), labels


def test_shipped_files_are_small_diffusers_folders() -> None:
    weights = ASSETS / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 6_000_000
    assert (ASSETS / "classifier.safetensors").stat().st_size < 1_000_000
    cfg = json.loads((ASSETS / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDPMScheduler"
    process = from_scheduler_config(cfg)
    assert isinstance(process, DiscreteVP) and process.t_max == 999.0
    unet_cfg = json.loads((ASSETS / "unet" / "config.json").read_text())
    assert unet_cfg["num_class_embeds"] == 11 and unet_cfg["sample_size"] == 16


@pytest.mark.usefixtures("single_thread")
def test_load_gives_a_denoiser_with_label_checks() -> None:
    model = load("digits")
    assert isinstance(model, Denoiser)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        a = model(x, 500.0, torch.tensor([1, 2, 3]))
        b = model(x, 500.0, [1, 2, 3])
    assert a.shape == x.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="labels must be in"):
        model(x, 500.0, 11)
    with pytest.raises(TypeError, match="integers"):
        model(x, 500.0, torch.ones(3))
    with pytest.raises(ValueError, match="unknown bundled model"):
        load("cifar")


def test_split_is_fixed_stratified_and_disjoint() -> None:
    _, y = load_digits("all")
    tr, ho = split(y)
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0 and len(tr) + len(ho) == len(y)
    counts = torch.bincount(y[ho], minlength=10).float() / torch.bincount(y, minlength=10)
    assert torch.all((counts - 0.2).abs() < 0.02)
    assert torch.equal(split(y)[1], ho)


def test_classifier_accuracy_at_t_min() -> None:
    x, y = load_digits("heldout")
    with torch.no_grad():
        acc = (load_classifier()(x, torch.tensor(0.0)).argmax(1) == y).float().mean()
    assert acc > 0.95


def test_frechet_distance_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g) + 1.0
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # equal covariances: FD is the squared mean difference
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2a: sqrt(C 4C) = 2C, so FD = |mu|^2 + tr(C)
    a64 = a.double().numpy()
    expect = float(a64.mean(0) @ a64.mean(0) + np.trace(np.cov(a64, rowvar=False)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expect, rel=1e-6)
    assert frechet_distance(2 * a, a) == pytest.approx(expect, rel=1e-6)


def test_guided_samples_have_the_requested_class(guided_samples) -> None:
    xs, labels = guided_samples
    with torch.no_grad():
        pred = load_classifier()(xs, torch.tensor(0.0)).argmax(1)
    per_class = torch.stack([(pred[labels == c] == c).float().mean() for c in range(10)])
    assert (pred == labels).float().mean() >= 0.8, per_class
    assert per_class.min() >= 0.5, per_class
    assert xs.min() >= -1.0 and xs.max() <= 1.0


def test_fd_digits_matches_the_model_card(guided_samples) -> None:
    xs, _ = guided_samples
    fd = fd_digits(xs)
    assert fd <= 2.0 * TEST["fd_digits"], (fd, TEST)
    # and the metric separates: pure noise is far from digits
    noise = torch.rand(TEST["n"], 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fd_digits(noise) > 5.0 * fd


@pytest.mark.usefixtures("single_thread")
def test_train_cli_registers_and_runs_tiny(tmp_path: Path) -> None:
    from diffusolve.models.diffusers_adapter import load_diffusers
    from diffusolve.train.classifier import load_classifier_from
    from diffusolve.train.cli import register

    parser = argparse.ArgumentParser(prog="diffusolve train")
    register(parser.add_subparsers(dest="train_command"))
    args = parser.parse_args(
        ["digits", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path), "--quiet"]
    )
    assert args.func(args) == 0
    model = load_diffusers(tmp_path)
    assert model.prediction == "v" and isinstance(model.process, DiscreteVP)
    args = parser.parse_args(
        ["digits-classifier", "--steps", "2", "--out", str(tmp_path), "--quiet"]
    )
    assert args.func(args) == 0
    net = load_classifier_from(tmp_path)
    assert net(torch.zeros(2, 1, 16, 16), torch.tensor(3.0)).shape == (2, 10)


@pytest.mark.usefixtures("single_thread")
def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from diffusolve.train.digits import DigitsConfig, train_digits

    for name in ("a", "b"):
        train_digits(DigitsConfig(steps=2, batch_size=4, seed=3), tmp_path / name, progress=False)
    wa = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
