"""Classifier-free guidance on an exact class-conditional Gaussian model.

Each class ``c`` is a Gaussian ``N(mu_c, C)``; its exact denoiser is the hand formula
``mu_c + C (C + r^2 I)^{-1} (x / alpha - mu_c)`` (``r = sigma / alpha``). Guidance must give
``x0_u + s (x0_c - x0_u)`` per sample, for mixed labels in one batch, at every scale
(``0``: the unconditional model, ``1``: the conditional one), in one call of the network
per evaluation; and the guided solve must equal the solve of the hand-guided denoiser.
"""

from __future__ import annotations

import pytest
import torch

import diffusolve
from diffusolve.guidance import ClassifierFreeGuidance, concat_cond
from diffusolve.process import get_process, make_grid

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
MEANS = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, 0.0]], dtype=F64)  # class 2: the null
COV = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=F64)


def hand_denoiser(process, x, t, labels):
    a, s = float(process.alpha(t)), float(process.sigma(t))
    m = COV @ torch.linalg.inv(COV + (s / a) ** 2 * torch.eye(2, dtype=F64))
    mu = MEANS[labels]
    return mu + (x / a - mu) @ m.T


class ClassGaussians:
    """The exact conditional denoiser; counts its calls and the batch sizes it sees."""

    def __init__(self, process):
        self.process = process
        self.calls: list[int] = []

    def __call__(self, x, t, cond=None):
        self.calls.append(x.shape[0])
        labels = cond["label"] if isinstance(cond, dict) else cond
        return hand_denoiser(self.process, x, t, labels.long())


def _x(n=6, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 3.0])
def test_guided_estimate_is_the_hand_formula(scale):
    p = get_process("vp-cosine")
    model = ClassGaussians(p)
    cfg = ClassifierFreeGuidance(model, scale, null_cond=torch.tensor([2]))
    x, t = _x(), 0.4
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    want = hand_denoiser(p, x, t, torch.full((6,), 2)) + scale * (
        hand_denoiser(p, x, t, labels) - hand_denoiser(p, x, t, torch.full((6,), 2))
    )
    torch.testing.assert_close(cfg(x, t, labels), want, rtol=1e-12, atol=1e-12)
    # one network call per evaluation: a doubled batch, or the plain batch at scale 1
    assert model.calls == ([6] if scale == 1.0 else [12])


def test_scale_zero_and_one_are_the_two_branches():
    p = get_process("edm")
    model = ClassGaussians(p)
    x, t = _x(seed=1), 2.0
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    null = torch.tensor([2])
    torch.testing.assert_close(
        ClassifierFreeGuidance(model, 1.0, null_cond=null)(x, t, labels),
        hand_denoiser(p, x, t, labels),
    )
    torch.testing.assert_close(
        ClassifierFreeGuidance(model, 0.0, null_cond=null)(x, t, labels),
        hand_denoiser(p, x, t, torch.full((6,), 2)),
    )


def test_dict_conditions_and_broadcast_null():
    p = get_process("ddpm-linear")
    model = ClassGaussians(p)
    x, t = _x(4, 2), 300.0
    labels = torch.tensor([0, 1, 0, 1])
    cfg = ClassifierFreeGuidance(model, 2.5, null_cond={"label": torch.tensor([2])})
    u = hand_denoiser(p, x, t, torch.full((4,), 2))
    want = u + 2.5 * (hand_denoiser(p, x, t, labels) - u)
    torch.testing.assert_close(cfg(x, t, {"label": labels}), want, rtol=1e-12, atol=1e-12)
    stacked = concat_cond({"label": labels}, {"label": torch.tensor([2])}, 4)
    assert stacked["label"].tolist() == [0, 1, 0, 1, 2, 2, 2, 2]  # conditional half first


def test_guided_solve_equals_the_solve_of_the_hand_guided_denoiser():
    p = get_process("ddpm-linear")
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    scale = 2.0

    class HandGuided:
        process = p

        def __call__(self, x, t, cond=None):
            u = hand_denoiser(p, x, t, torch.full((x.shape[0],), 2))
            return u + scale * (hand_denoiser(p, x, t, cond) - u)

    x = p.prior_sample((6, 2), torch.Generator().manual_seed(3), dtype=F64)
    grid = make_grid(p, 12, "logsnr")
    cfg = ClassifierFreeGuidance(ClassGaussians(p), scale, null_cond=torch.tensor([2]))
    for solver in ("dpmpp_2m", "ddpm"):
        got = diffusolve.sample(cfg, x, grid, solver, cond=labels, noise=4)
        want = diffusolve.sample(HandGuided(), x, grid, solver, cond=labels, noise=4)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
