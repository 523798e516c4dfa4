"""The non-stationary linear solver (``ns``): every linear schedule is one of its points
(linearize reproduces it), it runs through the loop and the push interface alike, and its
fit lowers the proxy, recovers an exactly representable solution, never loses to its start
on the validation data and resumes from its log."""

import json

import pytest
import torch

from diffusolve.cli import main
from diffusolve.models import Gaussian
from diffusolve.models.analytic import GaussianMixture
from diffusolve.process import make_grid, rectified_flow, vp_linear
from diffusolve.solvers import sample
from diffusolve.solvers.search import (
    NS,
    USF,
    Decision,
    Proxy,
    Schedule,
    fit,
    linearize,
)

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _set(seed, n=32, process=None, d=4):
    m = GaussianMixture.random(d, 6, process=process or vp_linear(), seed=seed)
    x = m.process.prior_sample((n, d), torch.Generator().manual_seed(seed + 100), dtype=F64)
    return m, x, m.reference_zero(x, m.process.t_max)


def _usf(process, final):
    plan = (Decision("data", 2, 2, "bh1", 0.8), Decision("noise", 3, 1), Decision("data", 1))
    return Schedule.for_solver(process, make_grid(process, 3), USF(decisions=plan), final)


@pytest.mark.parametrize("process", [vp_linear(), rectified_flow()], ids=["vp", "rf"])
@pytest.mark.parametrize(
    "solver, final",
    [
        ("ddim", "denoise"),
        ("dpmpp_2m", "zero"),
        ("dpmpp_3m", "denoise"),
        ("unipc_bh2_2", "zero"),
        ("deis_tab3", "denoise"),
        ("ipndm", "denoise"),
        ("usf", "zero"),
    ],
)
def test_linearize_reproduces_the_schedule(process, solver, final):
    m, x, _ = _set(0, process=process)
    if solver == "usf":
        sch = _usf(process, final)
    else:
        sch = Schedule.for_solver(process, make_grid(process, 5), solver, final)
    ns = linearize(sch, process)
    assert ns.solver == "ns" and ns.nfe == sch.nfe and ns.final == "denoise"
    a, b = ns.sample(m, x), sch.sample(m, x)
    assert torch.allclose(a, b, rtol=0, atol=1e-11 * float(b.abs().max())), (a - b).abs().max()
    # the JSON round trip keeps it
    assert Schedule.from_dict(json.loads(json.dumps(ns.to_dict()))) == ns


def test_ns_without_coefficients_is_ddim():
    m, x, _ = _set(1)
    grid = make_grid(m.process, 7)
    for final in ("denoise", "zero", "none"):
        a = sample(m, x, grid, "ns", final=final)
        b = sample(m, x, grid, "ddim", final=final)
        assert torch.allclose(a, b, rtol=0, atol=1e-12), final


def test_ns_refuses_what_it_cannot_run():
    rows = ((1.0, 0.0), (0.5, 0.1, 0.2), (0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="row 1 must hold 3"):
        NS(coefficients=((1.0, 0.0), (0.5, 0.1)))
    with pytest.raises(ValueError, match="finite"):
        NS(coefficients=((1.0, float("nan")), (0.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="at least two rows"):
        NS(coefficients=((1.0, 0.0),))
    m, x, _ = _set(2)
    ns = NS(coefficients=rows)
    with pytest.raises(ValueError, match="grid of 2 steps"):
        sample(m, x, make_grid(m.process, 3), ns)
    with pytest.raises(ValueError, match="final='denoise'"):
        sample(m, x, make_grid(m.process, 2), ns, final="zero")
    p = m.process
    with pytest.raises(ValueError, match="strictly decreasing"):
        linearize(Schedule.for_solver(p, make_grid(p, 3), "heun"), p)
    with pytest.raises(ValueError, match="final='denoise' or 'zero'"):
        linearize(Schedule.for_solver(p, make_grid(p, 3), "ddim", "none"), p)
    with pytest.raises(ValueError, match="stochastic"):
        linearize(Schedule.for_solver(p, make_grid(p, 3), "ddpm"), p)


def test_ns_through_the_push_interface_matches_the_loop():
    from diffusolve.interop.replay import PushSolve, evaluation_times

    m, x, _ = _set(3)
    p = m.process
    ns = linearize(_usf(p, "zero"), p)
    solve = PushSolve(ns.solver_object(), p, ns.grid_tensor(), x, "denoise")
    calls = 0
    while not solve.done:
        xq, tq = solve.query
        solve.feed(m(xq, tq))
        calls += 1
    assert calls == ns.nfe
    assert torch.allclose(solve.result, ns.sample(m, x), rtol=0, atol=1e-12)
    assert evaluation_times(ns.solver_object(), p, ns.grid_tensor(), "denoise") == list(ns.grid)


def test_fit_recovers_an_exactly_representable_solution():
    """An isotropic Gaussian: every output is a multiple of x_T, and so is the exact endpoint;
    the last row alone can give it, so the fit must reach it (rounding-level error)."""
    p = vp_linear()
    prior = Gaussian(torch.zeros(3, dtype=F64), 0.3 * torch.eye(3, dtype=F64), process=p)
    x = p.prior_sample((16, 3), torch.Generator().manual_seed(0), dtype=F64)
    ref = prior.ode_solution(x, p.t_max, 0.0)
    start = Schedule.for_solver(p, make_grid(p, 2), "ddim")
    res = fit(Proxy([(prior, x, ref)]), start, iterations=6, times=False, progress=False)
    assert res.proxy_before > 1e-3
    assert res.proxy_after < 1e-7, res.proxy_after
    # the reported proxy is the schedule's own error through the sampling loop
    assert res.proxy_after == pytest.approx(Proxy([(prior, x, ref)]).schedule_error(res.schedule))


def test_fit_lowers_the_proxy_and_keeps_its_validation_promise(tmp_path):
    cal = [_set(s) for s in (1, 2, 3)]
    val = [_set(7)]
    held = _set(11, n=64)
    p = cal[0][0].process
    start = Schedule.for_solver(p, make_grid(p, 3), "dpmpp_2m", "denoise")
    log = tmp_path / "fit.jsonl"
    kw = dict(validation=Proxy(val), progress=False, log=log)
    part = fit(Proxy(cal), start, iterations=2, **kw)
    assert part.iterations == 2 and len(log.read_text().splitlines()) == 3
    res = fit(Proxy(cal), start, iterations=5, resume=True, **kw)
    assert res.iterations == 5 and len(log.read_text().splitlines()) == 6
    assert res.validation_after <= res.validation_before
    assert res.proxy_after < 0.8 * res.proxy_before
    assert res.schedule.solver == "ns" and res.schedule.nfe == start.nfe
    assert res.schedule.grid[0] == p.t_max and res.schedule.info["fit"]["times"]
    # it carries to a mixture and noise the fit never saw
    before, after = Proxy([held]).schedule_error(start), Proxy([held]).schedule_error(res.schedule)
    assert after < before, (before, after)
    with pytest.raises(FileExistsError, match="resume"):
        fit(Proxy(cal), start, iterations=1, validation=Proxy(val), progress=False, log=log)
    with pytest.raises(ValueError, match="another fit"):
        fit(Proxy(cal[:1]), start, iterations=6, resume=True, **kw)


def test_cli_search_fit_from_a_start(tmp_path, capsys):
    from diffusolve.process import get_process

    p = get_process("ddpm-linear")
    start = tmp_path / "start.json"
    Schedule.for_solver(p, make_grid(p, 3), "dpmpp_2m").save(start)
    out = tmp_path / "ns.json"
    argv = ["search", "--model", "gmm-d2-vp", "--nfe", "4", "--budget", "0", "--fit"]
    small = ["--calib-priors", "2", "--calib-samples", "8", "--heldout-samples", "8"]
    small += ["--val-priors", "1", "--fit-iterations", "2", "--no-progress"]
    assert main([*argv, "--start", str(start), "--out", str(out), *small]) == 0
    text = capsys.readouterr().out
    assert "fitted" in text and "fit: 2 iterations" in text
    sch = Schedule.load(out)
    assert sch.solver == "ns" and sch.nfe == 4 and len(sch.info["heldout"]) == 2
    cost = sch.info["cost"]
    assert cost["fit_iterations"] == 2 and sch.info["mode"] == "ns-fit"
    assert cost["seconds"] == pytest.approx(cost["search_seconds"] + cost["fit_seconds"], abs=0.2)
    from diffusolve.bench.samplers import search_cost

    assert "ns fit of 2 L-BFGS iterations" in search_cost(sch)["note"]
    # --budget 0 needs --fit and --start
    bad = ["search", "--model", "gmm-d2-vp", "--budget", "0", "--out", str(tmp_path / "b.json")]
    assert main(bad) == 2
    assert "--budget must be at least 1" in capsys.readouterr().err
    other = ["search", "--model", "gmm-d2-vp", "--nfe", "5", "--budget", "0", "--fit"]
    assert main([*other, "--start", str(start), "--out", str(tmp_path / "c.json"), *small]) == 2
    assert "NFE 4" in capsys.readouterr().err


def test_fit_on_an_fd_proxy_moves_the_samples_toward_the_data():
    """An FD proxy (identity features, exact data samples as the reference): the fit lowers
    the calibration FD, never loses to its start on validation starts, and lowers the FD of
    other starts against other data samples; the proxy's value equals its loss on the
    schedule's outputs."""
    from diffusolve.solvers.search import FDProxy

    p = vp_linear()
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    prior = Gaussian(torch.tensor([1.0, -1.0], dtype=F64), cov, process=p)

    def starts(seed, n=256):
        return p.prior_sample((n, 2), torch.Generator().manual_seed(seed), dtype=F64)

    def data(seed, n=2000):
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
        return prior.mean + z @ torch.linalg.cholesky(cov).T

    def ident(x):
        return x

    cal = FDProxy(prior, starts(1), ident, data(2))
    val = FDProxy(prior, starts(3), ident, data(4))
    held = FDProxy(prior, starts(5, 512), ident, data(6))
    start = Schedule.for_solver(p, make_grid(p, 2), "ddim")
    out = start.sample(prior, starts(1), dtype=F64)
    assert cal.schedule_error(start) == pytest.approx(float(cal.loss([out])), rel=1e-12)
    res = fit(cal, start, validation=val, iterations=6, progress=False)
    assert res.proxy_after < 0.5 * res.proxy_before, (res.proxy_before, res.proxy_after)
    assert res.validation_after <= res.validation_before
    assert held.schedule_error(res.schedule) < 0.5 * held.schedule_error(start)
    assert cal.fingerprint() != FDProxy(prior, starts(1), ident, data(7)).fingerprint()
    with pytest.raises(ValueError, match="at least 2 starts"):
        FDProxy(prior, starts(1, 1), ident, data(2))


def test_cli_fd_proxy_needs_the_digits_model(tmp_path, capsys):
    argv = ["search", "--model", "gmm-d2-vp", "--proxy", "fd", "--out", str(tmp_path / "a.json")]
    assert main(argv) == 2
    assert "--proxy fd" in capsys.readouterr().err


def test_cli_fd_proxy_fit_on_the_bundled_model(tmp_path, capsys):
    """--proxy fd end to end on the bundled model (a tiny fit): the schedule records its
    proxy kind and the held-out FD-digits of the bench's FD starts."""
    from diffusolve.process import get_process

    p = get_process("ddpm-linear")
    start = tmp_path / "start.json"
    Schedule.for_solver(p, make_grid(p, 2), "ddim").save(start)
    out = tmp_path / "fd.json"
    argv = ["search", "--model", "digits", "--nfe", "3", "--proxy", "fd", "--budget", "0"]
    argv += ["--fit", "--start", str(start), "--out", str(out), "--fit-iterations", "1"]
    argv += ["--calib-samples", "16", "--heldout-samples", "16", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fitted" in text
    sch = Schedule.load(out)
    assert sch.solver == "ns" and sch.info["proxy_kind"] == "fd"
    assert len(sch.info["heldout"]) == 1 and sch.info["heldout"][0] > 0
    assert "seed 5000" in sch.info["data"] and "held-out split" in sch.info["data"]
