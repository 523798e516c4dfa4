"""The off-the-shelf clean digits classifiers: shipped guide and judge, training, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffusolve.guidance import softplus_relu
from diffusolve.models.clean_classifier import (
    CleanClassifier,
    load_clean_classifier,
    load_clean_classifier_from,
    load_judge_classifier,
)
from diffusolve.models.data import load_digits

pytestmark = pytest.mark.usefixtures("single_thread")


def test_architecture_has_relu_modules_that_softplus_replaces():
    net = CleanClassifier(width=4)
    n_relu = sum(isinstance(m, nn.ReLU) for m in net.modules())
    soft = softplus_relu(net, 3.0)
    assert n_relu == 7
    assert not any(isinstance(m, nn.ReLU) for m in soft.modules())
    assert sum(isinstance(m, nn.Softplus) for m in soft.modules()) == n_relu
    x = torch.randn(3, 1, 16, 16)
    # softplus(beta) -> relu as beta -> infinity: the swapped net approaches the original
    assert torch.allclose(softplus_relu(net, 1e4)(x), net(x), atol=1e-2)


@pytest.mark.parametrize("loader", [load_clean_classifier, load_judge_classifier])
def test_shipped_classifiers_are_accurate_frozen_and_small(loader):
    from diffusolve.models.bundled import asset_dir

    net = loader("digits")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x, y = load_digits("heldout")
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    assert acc >= 0.97
    stem = "clean_classifier" if loader is load_clean_classifier else "judge_classifier"
    assert (asset_dir("digits") / f"{stem}.safetensors").stat().st_size < 1_000_000
    cfg = json.loads((asset_dir("digits") / f"{stem}_config.json").read_text())
    assert cfg["heldout_accuracy"] == pytest.approx(acc, abs=1e-4)


def test_guide_and_judge_are_independent_networks():
    guide, judge = load_clean_classifier(), load_judge_classifier()
    assert guide.width != judge.width
    from diffusolve.models.bundled import asset_dir

    seeds = [
        json.loads((asset_dir("digits") / f"{s}_config.json").read_text())["train"]["seed"]
        for s in ("clean_classifier", "judge_classifier")
    ]
    assert seeds[0] != seeds[1]


def test_training_is_deterministic_for_a_seed(tmp_path):
    from diffusolve.train.clean_classifier import CleanClassifierConfig, train_clean_classifier

    cfg = CleanClassifierConfig(steps=3, batch_size=16, width=4, seed=7)
    a = train_clean_classifier(cfg, tmp_path / "a", progress=False)
    b = train_clean_classifier(cfg, tmp_path / "b", progress=False)
    assert a["final_loss"] == b["final_loss"]
    na = load_clean_classifier_from(tmp_path / "a")
    nb = load_clean_classifier_from(tmp_path / "b")
    for (k, va), vb in zip(na.state_dict().items(), nb.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    from diffusolve.train.cli import main

    args = ["train", "digits-clean-classifier", "--steps", "2", "--batch-size", "8"]
    args += ["--width", "4", "--role", "judge", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "judge_classifier.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        main(args)
    assert main(args + ["--force"]) == 0
    with pytest.raises(FileNotFoundError, match="train digits-clean-classifier"):
        load_clean_classifier_from(tmp_path)  # the guide was never written there
