"""Registry-driven: every solver on every process on a Gaussian mixture."""

import pytest
import torch

from diffusolve import get_solver, list_solvers, sample
from diffusolve.models.analytic import GaussianMixture
from diffusolve.process import PROCESSES, get_process, make_grid


def _gmm(process):
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.5]])
    covs = torch.tensor([[0.05, 0.2], [0.3, 0.02], [0.1, 0.1]])
    return GaussianMixture(weights, means, covs, process=process)


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_every_solver_every_process_is_finite(process_name):
    proc = get_process(process_name)
    gmm = _gmm(proc)
    xT = proc.prior_sample((16, 2), torch.Generator().manual_seed(0))
    for name in list_solvers():
        solver = get_solver(name)
        n = max(4, solver.min_steps)
        for kind in ("logsnr", solver.natural_grid):
            out = sample(gmm, xT, make_grid(proc, n, kind), solver, noise=0)
            assert out.shape == xT.shape and out.dtype == xT.dtype
            assert torch.all(torch.isfinite(out)), (name, process_name, kind)


@pytest.mark.parametrize("name", [n for n in list_solvers() if not get_solver(n).stochastic])
def test_deterministic_solvers_approach_the_exact_endpoint(name):
    """On a Gaussian mixture (exact PF-ODE reference) every deterministic solver lands close
    to the exact endpoint at 40 steps and gets closer when the steps double."""
    proc = get_process("ddpm-linear")
    gmm = _gmm(proc)
    xT = proc.prior_sample((64, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = get_solver(name)
    errs = []
    for n in (40, 80):
        grid = make_grid(proc, n, solver.natural_grid)
        ref = gmm.reference(xT, grid[0], grid[-1], final="denoise")
        out = sample(gmm, xT, grid, solver)
        errs.append(float(((out - ref).norm(dim=1) / ref.norm(dim=1)).mean()))
    assert errs[0] < 0.1, (name, errs)
    # at least first-order convergence: halving the step cuts the error by ~2 or more
    assert errs[1] < 0.6 * errs[0], (name, errs)
