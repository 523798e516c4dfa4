"""The feature-set options of the MMD fine-tuning (:mod:`diffusolve.train.mmd`): each set's
MMD is the unbiased double sum, the multi-set loss is the weighted sum of the per-set losses
and equals one MMD under the summed kernel, and the defaults are the shipped loss exactly."""

from __future__ import annotations

import pytest
import torch

from diffusolve.models.clean_classifier import CleanClassifier
from diffusolve.train.mmd import (
    MMDConfig,
    class_mmd2,
    feature_sets,
    guide_features,
    guide_stage_features,
    mmd2_unbiased,
    weighted_mmd2,
)


def _double_sum_with(kernel, x: torch.Tensor, y: torch.Tensor) -> float:
    """Gretton et al. (2012, Lemma 6) written out, for any kernel ``kernel(a, b)``."""
    m, n = len(x), len(y)
    sxx = sum(kernel(i, j, "xx") for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(kernel(i, j, "yy") for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(kernel(i, j, "xy") for i in range(m) for j in range(n)) / (m * n)
    return float(sxx + syy - 2 * sxy)


def _net() -> CleanClassifier:
    torch.manual_seed(0)
    return CleanClassifier(width=4).double().eval().requires_grad_(False)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, list]]:
    """Generated images with labels 0, 0, 0, 1, 1, 10, 10 and per-group real images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 10, 10])
    x_gen = torch.rand(7, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    x_real = [torch.rand(k, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for k in (3, 4, 2)]
    return x_gen, labels, x_real


def test_feature_sets_are_the_guide_stages_and_the_pixels() -> None:
    net = _net()
    x, _, _ = _batch(0)
    f = feature_sets(net, x, ["guide", "pixel", "stage1", "stage2"])
    # the default set is exactly the shipped features (same operations, bit for bit)
    assert torch.equal(f["guide"], guide_features(net, x))
    assert torch.equal(f["pixel"], x.reshape(7, 256))
    h1 = net.stages[0](net.stem(x))
    h2 = net.stages[1](h1)
    assert torch.allclose(f["stage1"], h1.mean(dim=(2, 3)), rtol=0, atol=1e-14)
    assert torch.allclose(f["stage2"], h2.mean(dim=(2, 3)), rtol=0, atol=1e-14)
    assert [t.shape[1] for t in guide_stage_features(net, x)] == [4, 8, 16]
    with pytest.raises(ValueError, match="unknown feature sets"):
        feature_sets(net, x, ["inception"])


def test_one_feature_set_mmd_is_its_double_sum() -> None:
    """The pixel set's MMD (cubic kernel on the 256 pixels / d) is the double sum."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64) + 0.2
    fx, fy = (feature_sets(_net(), t, ["pixel"])["pixel"] for t in (x, y))
    sets = {"xx": (fx, fx), "yy": (fy, fy), "xy": (fx, fy)}

    def k(i: int, j: int, which: str) -> torch.Tensor:
        a, b = sets[which]
        return (a[i] @ b[j] / 256 + 1) ** 3

    assert float(mmd2_unbiased(fx, fy)) == pytest.approx(_double_sum_with(k, fx, fy), rel=1e-12)


def test_weighted_loss_is_the_weighted_sum_and_the_summed_kernel_mmd() -> None:
    """sum_k w_k MMD_k is the MMD of the kernel sum_k w_k k_k (the MMD is linear in the
    kernel), per label group, then averaged over the groups."""
    net = _net()
    x_gen, labels, x_real = _batch(2)
    weights = {"guide": 0.7, "pixel": 2.0, "stage1": 0.3, "stage2": 0.3}
    f_gen = feature_sets(net, x_gen, weights)
    reals = [feature_sets(net, x, weights) for x in x_real]
    f_real = {k: [r[k] for r in reals] for k in weights}
    got = float(weighted_mmd2(f_gen, labels, f_real, weights))
    by_set = sum(w * float(class_mmd2(f_gen[k], labels, f_real[k])) for k, w in weights.items())
    assert got == pytest.approx(by_set, rel=1e-12)
    groups = []
    for gi, g in enumerate((0, 1, 10)):
        a = {k: f_gen[k][labels == g] for k in weights}
        b = {k: f_real[k][gi] for k in weights}
        sets = {"xx": (a, a), "yy": (b, b), "xy": (a, b)}

        def k_sum(i: int, j: int, which: str, sets=sets) -> float:
            u, v = sets[which]
            return sum(
                w * float((u[s][i] @ v[s][j] / u[s].shape[1] + 1) ** 3) for s, w in weights.items()
            )

        groups.append(_double_sum_with(k_sum, a["guide"], b["guide"]))
    assert got == pytest.approx(sum(groups) / 3, rel=1e-12)


def test_default_loss_is_the_shipped_loss_bit_for_bit() -> None:
    cfg = MMDConfig()
    assert cfg.weights() == {"guide": 1.0}
    net = _net()
    x_gen, labels, x_real = _batch(3)
    f_gen = feature_sets(net, x_gen, cfg.weights())
    f_real = {"guide": [guide_features(net, x) for x in x_real]}
    old = class_mmd2(guide_features(net, x_gen), labels, f_real["guide"])
    assert torch.equal(weighted_mmd2(f_gen, labels, f_real, cfg.weights()), old)
    # a weight scales its term; a zero weight drops the set
    w = MMDConfig(guide_weight=2.5, pixel_weight=0.0, stage_weight=1.0).weights()
    assert w == {"guide": 2.5, "stage1": 1.0, "stage2": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_weight": -1.0}, "pixel_weight"),
        ({"stage_weight": float("nan")}, "stage_weight"),
        ({"guide_weight": float("inf")}, "guide_weight"),
        ({"guide_weight": 0.0}, "all 0"),
    ],
)
def test_config_rejects_bad_weights(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MMDConfig(**kwargs)


def test_cli_passes_the_weights(tmp_path, monkeypatch) -> None:
    import diffusolve.train.mmd as mmd
    from diffusolve.train.cli import main

    seen = {}

    def fake(cfg, out, progress=True):
        seen["cfg"], seen["out"] = cfg, out
        return {"config": {}}

    monkeypatch.setattr(mmd, "train_mmd", fake)
    out = str(tmp_path / "m")
    argv = ["train", "digits-mmd", "--init", "digits-lcm", "--out", out, "--batch-size", "120"]
    main([*argv, "--pixel-weight", "1", "--stage-weight", "0.5", "--lr", "2e-5"])
    cfg = seen["cfg"]
    assert (cfg.init, cfg.batch_size, cfg.lr) == ("digits-lcm", 120, 2e-5)
    assert cfg.weights() == {"guide": 1.0, "pixel": 1.0, "stage1": 0.5, "stage2": 0.5}
    main(argv)
    assert seen["cfg"].weights() == {"guide": 1.0}
    with pytest.raises(ValueError, match="pixel_weight"):
        main([*argv, "--pixel-weight", "-1"])
