"""k-diffusion-style functions: the same solve as ``diffusolve.sample`` on the EDM process,
the callback protocol, extra arguments passed through."""

from __future__ import annotations

import pytest
import torch

import diffusolve
from diffusolve import kdiff
from diffusolve.models import GaussianMixture
from diffusolve.process import edm, make_grid
from diffusolve.solvers import get_solver, list_solvers

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def gmm():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    covs = 0.05 + 0.2 * torch.rand(3, 4, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), means, covs, process=edm())


def _kdenoiser(prior, calls=None):
    def model(x, sigma, **extra):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        if calls is not None:
            calls.append(extra)
        return prior(x, sigma[0].to(torch.float64))

    return model


def test_one_function_per_deterministic_solver_with_its_docstring():
    names = kdiff.sampler_names()
    for n in list_solvers():
        assert (f"sample_{n}" in names) == (not get_solver(n).stochastic)
    assert "sample_lms" in names and "sample_euler_ancestral" not in names
    assert kdiff.sample_heun.__name__ == "sample_heun" and "Heun" in kdiff.sample_heun.__doc__
    assert set(names) <= set(kdiff.__all__)


@pytest.mark.parametrize(
    "solver",
    ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "dpm_solver_3s", "ipndm_v", "lms"],
)
@pytest.mark.parametrize("final", ["denoise", "zero"])
def test_agrees_with_diffusolve_sample_on_an_exact_gmm(gmm, solver, final):
    """Karras sigmas ending at 0: the same as ``diffusolve.sample`` over the positive sigmas
    with the final policy (float64, to 1e-12)."""
    grid = make_grid(gmm.process, 8, "karras")
    sigmas = torch.cat([grid, grid.new_zeros(1)])
    x = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = getattr(kdiff, f"sample_{solver}")(_kdenoiser(gmm), x, sigmas, disable=True, final=final)
    ref = diffusolve.sample(gmm, x, grid, solver, final=final)
    assert float((ours - ref).abs().max()) < 1e-12 * float(ref.abs().max())


def test_without_a_trailing_zero_the_state_at_the_last_sigma_is_returned(gmm):
    grid = make_grid(gmm.process, 6, "karras", t_end=0.5)
    x = 80.0 * torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = kdiff.sample_dpmpp_2m(_kdenoiser(gmm), x, grid, disable=True)
    torch.testing.assert_close(
        ours, diffusolve.sample(gmm, x, grid, "dpmpp_2m", final="none"), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_callback_protocol_and_extra_args(gmm, solver):
    """One callback per interval of sigmas (k-diffusion's count), with the state at
    ``sigmas[i]`` and the denoiser output there; extra_args reach every model call."""
    grid = make_grid(gmm.process, 5, "karras")
    sigmas = torch.cat([grid, grid.new_zeros(1)])
    x = 80.0 * torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen, calls = [], []
    out = getattr(kdiff, f"sample_{solver}")(
        _kdenoiser(gmm, calls),
        x,
        sigmas,
        extra_args={"cond": 7},
        callback=seen.append,
        disable=True,
    )
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 1))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert torch.equal(seen[0]["x"], x)
    for d in seen:
        assert float(d["sigma"]) == float(sigmas[d["i"]]) == float(d["sigma_hat"])
        torch.testing.assert_close(d["denoised"], gmm(d["x"], sigmas[d["i"]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=0, atol=0)  # final = denoise
    assert len(calls) == get_solver(solver).nfe(len(grid) - 1) + 1
    assert all(c == {"cond": 7} for c in calls)


def test_bad_sigmas_are_refused(gmm):
    with pytest.raises(ValueError, match="decreasing"):
        kdiff.sample_euler(_kdenoiser(gmm), torch.zeros(1, 4), torch.tensor([1.0, 2.0, 0.0]))
