"""Registry-driven: every solver on every process on a Gaussian mixture."""

import math

import pytest
import torch

from diffusolve import get_solver, list_solvers, sample
from diffusolve.models.analytic import GaussianMixture
from diffusolve.process import PROCESSES, get_process, make_grid

pytestmark = pytest.mark.usefixtures("single_thread")


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


#: measured on this mixture (40 -> 80 steps, each solver's natural grid): the error falls by
#: 2^0.99 for every first-order solver, 2^1.85 .. 2^2.12 for second order, 2^2.68 .. 2^3.12
#: for third order, 2^3.21 (ipndm_v) and 2^4.69 (UniPC-3) for fourth order. The bound
#: 2^-(min(order, 3) - 0.5) keeps at least 0.18 (in log2) on the passing side and rejects a
#: solver of order <= 3 that loses one order (it would sit 0.5 or more beyond the bound).
#: Fourth-order solvers are not distinguished from third order in this pre-asymptotic range
#: (ipndm_v reaches only 3.21): their order is pinned by tests/test_convergence.py.
ORDER_CAP = 3
LOG2_MARGIN = 0.5

_REFERENCES: dict[tuple[float, float], torch.Tensor] = {}


def _reference(gmm, xT, t0, t1):
    """The exact endpoint from ``xT`` (the same mixture and start for every solver): the
    PF-ODE reference is most of the cost, and every natural grid spans the same interval."""
    key = (float(t0), float(t1))
    if key not in _REFERENCES:
        _REFERENCES[key] = gmm.reference(xT, t0, t1, final="denoise")
    return _REFERENCES[key]


@pytest.mark.parametrize("name", [n for n in list_solvers() if not get_solver(n).stochastic])
def test_deterministic_solvers_approach_the_exact_endpoint(name):
    """On a Gaussian mixture (exact PF-ODE reference) every deterministic solver lands close
    to the exact endpoint at 40 steps and gets closer at its order when the steps double."""
    proc = get_process("ddpm-linear")
    gmm = _gmm(proc)
    xT = proc.prior_sample((64, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = get_solver(name)
    errs = []
    for n in (40, 80):
        grid = make_grid(proc, n, solver.natural_grid)
        ref = _reference(gmm, xT, grid[0], grid[-1])
        out = sample(gmm, xT, grid, solver)
        errs.append(float(((out - ref).norm(dim=1) / ref.norm(dim=1)).mean()))
    # at 40 steps: measured 5.3e-2 at most (euler), 2x margin
    assert errs[0] < 0.1, (name, errs)
    rate = math.log2(errs[0] / errs[1])
    want = min(solver.order, ORDER_CAP) - LOG2_MARGIN
    assert rate >= want, f"{name}: error ratio 2^-{rate:.2f} over one doubling, expected 2^-{want}"
