"""DPM-OT (diffusolve.sampling.dpm_ot): the fitted cells carry the target weights, the map
is cheaper than a random assignment (and matches POT's discrete OT), files round-trip
bit-exactly, sampling counts its evaluations; the memorisation table."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from diffusolve.models import GaussianMixture
from diffusolve.process import vp_linear
from diffusolve.sampling import (
    OTMap,
    dpm_ot_sample,
    fit_dpm_ot,
    format_memorisation_table,
    memorisation_table,
    nn_distances,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = vp_linear()
N = 12


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, OTMap]:
    # a module fixture is set up before the function-scoped single_thread fixture: set the
    # thread count here too (the fit is many small steps; a second thread only waits)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_problem()
    finally:
        torch.set_num_threads(before)


def _fit_problem() -> tuple[torch.Tensor, torch.Tensor, OTMap]:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(N, 2, generator=g) * 1.5
    weights = torch.rand(N, generator=g) + 0.2
    labels = torch.arange(N) % 3
    fitted = fit_dpm_ot(
        PROCESS,
        points,
        0.3,
        weights=weights,
        labels=labels,
        iters=1500,
        seed=0,
        eval_samples=20_000,
    )
    return points, weights / weights.sum(), fitted


def _source(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return float(PROCESS.sigma(PROCESS.t_max)) * torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_cells_carry_the_target_weights(problem) -> None:
    _, w, fitted = problem
    m = 200_000
    frac = torch.bincount(fitted.assign(_source(m, 123)), minlength=N).double() / m
    # Monte-Carlo sd of a cell's fraction: sqrt(w (1 - w) / m) <= 0.35 % of the smallest weight
    # here; 6 % of w leaves room for the fit's own error and cannot hide a wrong map
    rel = ((frac - w.double()).abs() / w.double()).max()
    assert float(rel) < 0.06, float(rel)
    # the tolerance can fail: the unfitted map (psi = 0, Voronoi cells) misses the weights
    voronoi = OTMap(fitted.targets, torch.zeros(N, dtype=torch.float64), fitted.weights, 0.3, 1.0)
    frac0 = torch.bincount(voronoi.assign(_source(m, 123)), minlength=N).double() / m
    assert float(((frac0 - w.double()).abs() / w.double()).max()) > 0.3


def test_transport_cost_is_optimal(problem) -> None:
    _, w, fitted = problem
    x = _source(4000, 7)
    y = fitted.targets.double()
    cost = float(((x - y[fitted.assign(x)]) ** 2).sum(1).mean())
    g = torch.Generator().manual_seed(8)
    random = y[torch.multinomial(w.double(), 4000, replacement=True, generator=g)]
    assert cost < 0.5 * float(((x - random) ** 2).sum(1).mean())
    # the power-cell assignment is an optimal coupling of the sample and its image: POT's
    # exact discrete OT with the induced target fractions has the same cost
    idx = fitted.assign(x)
    frac = (torch.bincount(idx, minlength=N).double() / 4000).numpy()
    keep = frac > 0
    m = ot.dist(x.numpy(), y.numpy()[keep])
    emd_induced = ot.emd2(np.full(4000, 1 / 4000), frac[keep] / frac[keep].sum(), m)
    assert abs(cost - emd_induced) < 1e-9 * emd_induced, (cost, emd_induced)
    # and with the target weights themselves (sampling error of 4000 source points only)
    emd = ot.emd2(np.full(4000, 1 / 4000), fitted.weights.numpy(), ot.dist(x.numpy(), y.numpy()))
    assert abs(cost - emd) < 0.06 * emd, (cost, emd)


def test_save_load_round_trip(problem, tmp_path) -> None:
    _, _, fitted = problem
    path = tmp_path / "map.safetensors"
    fitted.save(path)
    back = OTMap.load(path)
    for name in ("targets", "psi", "weights", "labels"):
        a, b = getattr(fitted, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.t_late == fitted.t_late and back.t_source == fitted.t_source
    assert back.info == fitted.info
    with pytest.raises(FileExistsError, match="force"):
        fitted.save(path)
    fitted.save(path, force=True)
    with pytest.raises(ValueError, match="safetensors"):
        fitted.save(tmp_path / "map.pt")


class Recorder:
    def __init__(self, model) -> None:
        self.model, self.process, self.rows, self.conds = model, model.process, 0, []

    def __call__(self, x, t, cond=None):
        self.rows += x.shape[0]
        self.conds.append(cond)
        return self.model(x, t)


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_sampling_counts_and_is_finite(problem, steps) -> None:
    points, w, fitted = problem
    gmm = GaussianMixture(w, points, torch.full((N,), 0.01), process=PROCESS)
    rec = Recorder(gmm)
    st: dict = {}
    out = dpm_ot_sample(rec, fitted, 50, steps=steps, noise=0, stats=st)
    assert out.shape == (50, 2) and torch.isfinite(out).all()
    assert st["nfe"] == steps + 1 == rec.rows / 50
    assert torch.equal(rec.conds[0], fitted.labels[st["index"]])  # each sample's own label
    # deterministic for a seed; the outputs are near the targets' data points
    again = dpm_ot_sample(gmm, fitted, 50, steps=steps, noise=0)
    assert torch.equal(out, again)
    assert float(nn_distances(out, points).median()) < 0.5


def test_source_mismatch_is_refused(problem) -> None:
    _, _, fitted = problem
    other = GaussianMixture(
        torch.ones(1), torch.zeros(1, 2), torch.ones(1), process=vp_linear(t_max=0.5)
    )
    with pytest.raises(ValueError, match="t_max"):
        dpm_ot_sample(other, fitted, 4)


def test_memorisation_table() -> None:
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    fresh = torch.randn(100, 8, generator=g)
    rows = memorisation_table({"copies": train[:100] + 1e-3, "fresh": fresh}, train, held)
    assert [r.method for r in rows] == ["heldout", "copies", "fresh"]
    assert rows[1].frac_within_radius == 1.0 and rows[1].median_nn_train < 0.01
    assert rows[2].frac_within_radius < 0.1
    assert abs(rows[2].median_nn_train - rows[0].median_nn_train) < 0.3 * rows[0].median_nn_train
    assert "| copies | 100 |" in format_memorisation_table(rows)


def test_select_t_late_takes_the_latest_level_that_passes_the_guard() -> None:
    """At a late level the samples are the data points again (the guard fails); the choice
    is the first level, latest first, whose samples are as far from the data as the data's
    own leave-one-out neighbours, else the earliest; maps are cached between calls."""
    from diffusolve.models import Gaussian
    from diffusolve.sampling import distinct_fraction, select_t_late

    g = torch.Generator().manual_seed(3)
    data = torch.randn(40, 4, generator=g, dtype=torch.float64)
    # a model three times wider than the data: from an early level its samples are new
    # points, farther from the data than the data's own neighbours (the guard passes)
    eye = torch.eye(4, dtype=torch.float64)
    prior = Gaussian(torch.zeros(4, dtype=torch.float64), 9 * eye, process=PROCESS)
    maps: dict = {}
    lines: list[str] = []
    fit = {"iters": 200, "eval_samples": 5000}
    kw = dict(n=64, seed=1, fit_options=fit, maps=maps, log=lines.append)
    m, rows = select_t_late(prior, data, 3, fractions=(0.05, 0.97), **kw)
    guard = float(nn_distances(data, data, exclude_self=True).median())
    assert [r["fraction"] for r in rows][0] == 0.97 and len(lines) == len(rows)
    late = rows[0]
    assert not late["passed"] and late["median_nn"] < 0.3 * guard  # copies of the data
    assert all(r["guard"] == pytest.approx(guard) for r in rows)
    assert rows[-1]["passed"] and m.t_late == rows[-1]["t_late"] and len(rows) == 2
    assert len(maps) == len(rows)
    cached = dict(maps)
    m2, rows2 = select_t_late(prior, data, 3, fractions=(0.05, 0.97), **kw)
    assert all(maps[k] is cached[k] for k in cached) and rows2 == rows
    assert torch.equal(m2.psi, m.psi)
    # only failing levels: the earliest is returned
    m3, rows3 = select_t_late(prior, data, 3, fractions=(0.97, 0.98), **kw)
    assert not any(r["passed"] for r in rows3) and m3.t_late == rows3[-1]["t_late"]
    with pytest.raises(ValueError, match="fractions"):
        select_t_late(prior, data, 3, fractions=(1.5,))
    assert distinct_fraction(torch.tensor([0, 1, 1, 2])) == 0.75
