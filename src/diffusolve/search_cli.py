"""``diffusolve search``: search a solver schedule for a model at an NFE budget.

``--model`` is an analytic bench task (``gmm-d64-vp``, ``gmm-d2-rf``, ... from
:data:`diffusolve.bench.tasks.TASKS`) or ``digits`` (the bundled UNet, unconditional, as the
bench's ``digits-unet`` task runs it).

What the search sees and what is reported are kept apart:

* analytic tasks: the proxy's calibration sets are ``--calib-priors`` mixtures of the task's
  kind drawn with seeds ``1000 + i`` (starts from seeds ``2000 + i``), each against its exact
  probability-flow endpoint. The held-out figures are the bench's own task (prior seed 0,
  starts from seed 1, the starts ``diffusolve bench samplers`` uses) and a second prior
  (seed 1, starts from seed 2), both against their exact endpoints.
* ``digits``: calibration starts from seed 5000 against a ``--ref-steps``-step
  ``dpmpp_3m`` solve (final denoise at ``t_min``, the bench's convention), computed once and
  cached (``--cache``); held out: the bench's ``digits-unet`` starts (seed 1) against its
  1000-step reference (also cached).
* ``--proxy fd`` (``digits`` only): the proxy is FD-digits instead, the Frechet distance
  of the outputs' classifier features to the *train* split's, on the calibration starts
  (seed 5000; validation: seed 6000); no reference solve. Held out: FD-digits as the bench
  measures it, on the bench's FD starts (seed 3, ``--heldout-samples``, at most 1,000)
  against the *held-out* split. Such a schedule is fitted to the data's statistics, not to
  the ODE's endpoint.

It prints the proxy before (the best starting schedule: standard grids and, for ``--usf``,
the UniPC / DPM-Solver++ decision presets) and after, and the held-out errors of both, and
writes the searched schedule (JSON, :class:`diffusolve.solvers.search.Schedule`). With
``--fit`` it then fits a non-stationary linear solver (``ns``,
:func:`diffusolve.solvers.search.fit`) from the searched schedule on the same calibration
and validation sets (``--budget 0 --start F``: from the best given schedule, no search),
reports its held-out errors too and writes the fitted schedule; its log is ``--log``'s name
with ``.fit`` before the suffix.
No heavy imports at module level.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_search"]

#: the bundled model the search knows besides the analytic bench tasks
NETWORK_MODELS = ("digits", "digits-unet")
CALIB_PRIOR_SEED, CALIB_NOISE_SEED, NETWORK_CALIB_SEED = 1000, 2000, 5000
VAL_PRIOR_SEED, VAL_NOISE_SEED, NETWORK_VAL_SEED = 3000, 4000, 6000
HELDOUT_PRIOR_SEEDS = (0, 1)
#: the starts ``diffusolve bench samplers`` measures FD-digits on (its seed + 3)
FD_HELDOUT_SEED = 3
BENCH_REFERENCE_STEPS = 1000


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search",
        help="search a solver schedule (timesteps, per-step decisions) at an NFE budget",
        description=(
            "Search the timesteps of a solver (--solver) or timesteps and per-step USF "
            "decisions (--usf, default) on calibration data, then report the error on "
            "held-out noise and priors. Writes the schedule as JSON."
        ),
    )
    p.add_argument("--model", required=True, help="a bench task (gmm-d64-vp, ...) or digits")
    p.add_argument("--nfe", type=int, default=5, help="model evaluations (default 5)")
    p.add_argument("--budget", type=int, default=400, help="proxy evaluations (default 400)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--solver", help="search this deterministic solver's timesteps only")
    how.add_argument(
        "--usf", action="store_true", help="search timesteps and per-step decisions (default)"
    )
    p.add_argument("--out", required=True, help="the schedule file to write (.json)")
    p.add_argument("--log", help="JSONL log of every evaluated candidate")
    p.add_argument(
        "--start",
        action="append",
        default=[],
        help="a schedule file to start from (repeatable; --usf: a usf schedule)",
    )
    p.add_argument("--resume", action="store_true", help="continue the search in --log")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
    p.add_argument(
        "--calib-priors", type=int, default=16, help="calibration mixtures (analytic tasks)"
    )
    p.add_argument("--calib-samples", type=int, default=32, help="starts per calibration set")
    p.add_argument(
        "--val-priors",
        type=int,
        default=4,
        help="validation mixtures (analytic tasks; digits: one set of other starts) that pick "
        "the result among the leading plans; 0: the lowest proxy wins",
    )
    p.add_argument(
        "--heldout-samples", type=int, default=512, help="starts per held-out set (bench: 512)"
    )
    p.add_argument(
        "--ref-steps", type=int, default=250, help="steps of the digits calibration reference"
    )
    p.add_argument(
        "--cache",
        help="folder for cached references (digits: always cached, by default in "
        "~/.cache/diffusolve/search; analytic tasks: only with --cache)",
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="then fit a non-stationary linear solver (ns) from the result: every "
        "coefficient and the times, by autograd on the calibration sets, picked and stopped "
        "on the validation sets",
    )
    p.add_argument(
        "--fit-iterations", type=int, default=30, help="outer L-BFGS iterations (default 30)"
    )
    p.add_argument(
        "--fit-fixed-times", action="store_true", help="fit the coefficients only (keep times)"
    )
    p.add_argument(
        "--proxy",
        choices=("ref", "fd"),
        default="ref",
        help="ref: relative error to a reference solve (default); fd: FD-digits against the "
        "train split (digits only; held out: the bench's FD starts against the held-out "
        "split)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_search)
    return p


def _check_args(args: argparse.Namespace) -> None:
    from .bench.tasks import TASKS
    from .solvers.search.schedule import FORMAT  # noqa: F401  (fails early if missing)

    analytic = [k for k, v in TASKS.items() if v["prior"] in ("gmm", "gaussian")]
    if args.model not in analytic and args.model not in NETWORK_MODELS:
        raise ValueError(
            f"unknown --model {args.model!r}; choose a bench task ({', '.join(analytic)}) or digits"
        )
    if args.nfe < 2:
        raise ValueError(f"--nfe must be at least 2, got {args.nfe}")
    if args.budget < 0 or (args.budget == 0 and not (args.fit and args.start)):
        raise ValueError(
            f"--budget must be at least 1 (0 only with --fit and --start: fit from the best "
            f"start without a search), got {args.budget}"
        )
    if args.fit_iterations < 0:
        raise ValueError(f"--fit-iterations must be at least 0, got {args.fit_iterations}")
    if (args.fit_iterations != 30 or args.fit_fixed_times) and not args.fit:
        raise ValueError("--fit-iterations and --fit-fixed-times need --fit")
    for flag in ("calib_priors", "calib_samples", "heldout_samples", "ref_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.val_priors < 0:
        raise ValueError("--val-priors must be at least 0")
    if args.proxy == "fd" and args.model not in NETWORK_MODELS:
        raise ValueError(
            f"--proxy fd scores FD-digits and needs --model digits, not {args.model!r}"
        )
    if args.proxy == "fd" and args.calib_samples < 2:
        raise ValueError("--proxy fd needs --calib-samples of at least 2 (a covariance)")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {out} must be a .json file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'sch.json'}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it or choose another --out")
    if args.resume and not args.log:
        raise ValueError("--resume needs --log (the log to continue)")
    for log in (args.log, _fit_log(args)):
        if log and Path(log).exists() and Path(log).stat().st_size and not args.resume:
            raise FileExistsError(f"{log} exists; pass --resume to continue it")
    if args.solver:
        from .solvers import get_solver

        s = get_solver(args.solver)
        if s.stochastic:
            raise ValueError(f"--solver {args.solver} is stochastic; choose a deterministic one")
        from .solvers import steps_for_nfe

        steps_for_nfe(s, args.nfe, "denoise")


def _analytic_sets(
    name: str, seeds: list[tuple[int, int]], n: int, cache: Path | None = None
) -> list[Any]:
    """``(model, x_T, exact endpoint)`` per ``(prior seed, noise seed)``; with ``cache``
    the endpoints are stored there, keyed by a hash of the starts and the prior."""
    import torch

    from .bench.tasks import TASKS, prior_for
    from .models.analytic.reference import gaussian_endpoint_zero

    out = []
    for prior_seed, noise_seed in seeds:
        model = prior_for(name, prior_seed)
        p = model.process
        d = int(TASKS[name]["dim"])
        g = torch.Generator().manual_seed(noise_seed)
        x = p.prior_sample((n, d), g, dtype=torch.float64)
        path = None
        if cache is not None:
            h = hashlib.sha1(x.numpy().tobytes())
            h.update(f"{name}/{prior_seed}/{p.name}".encode())
            for t in vars(model).values():
                if isinstance(t, torch.Tensor):
                    h.update(t.detach().cpu().contiguous().double().numpy().tobytes())
            path = cache / f"endpoint-{h.hexdigest()[:20]}.pt"
            if path.exists():
                out.append((model, x, torch.load(path)))
                continue
        if TASKS[name]["prior"] == "gaussian":
            ref = gaussian_endpoint_zero(model, x, p.t_max)
        else:
            ref = model.reference_zero(x, p.t_max)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref, path)
        out.append((model, x, ref))
    return out


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache:
        return Path(args.cache)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusolve" / "search"


def _network_reference(model: Any, x: Any, steps: int, cache: Path) -> Any:
    """A ``steps``-step dpmpp_3m solve on a logSNR grid with a final denoise, cached by
    the starts, the step count and the network's weights."""
    import torch

    from .process import make_grid
    from .solvers import sample

    h = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"dpmpp_3m/{steps}/logsnr/denoise/{model.process.name}".encode())
    for t in model.state_dict().values() if hasattr(model, "state_dict") else ():
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    path = cache / f"ref-{h.hexdigest()[:20]}.pt"
    if path.exists():
        return torch.load(path)
    with torch.no_grad():
        ref = sample(model, x, make_grid(model.process, steps, "logsnr"), "dpmpp_3m")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def _network_sets(args: argparse.Namespace) -> tuple[list[Any], list[Any], list[Any], str]:
    import torch

    from .bench.tasks import N_SAMPLES_NETWORK
    from .models import load

    model = load("digits", dtype=torch.float32)
    p = model.process
    cache = _cache_dir(args)

    def starts(seed: int, n: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        return p.prior_sample((n, 1, 16, 16), g, dtype=torch.float64)

    xc = starts(NETWORK_CALIB_SEED, args.calib_samples)
    cal = [(model, xc, _network_reference(model, xc, args.ref_steps, cache))]
    val = []
    if args.val_priors:
        xv = starts(NETWORK_VAL_SEED, args.calib_samples)
        val = [(model, xv, _network_reference(model, xv, args.ref_steps, cache))]
    xh = starts(1, min(args.heldout_samples, N_SAMPLES_NETWORK))
    held = [(model, xh, _network_reference(model, xh, BENCH_REFERENCE_STEPS, cache))]
    what = (
        f"digits: calibration {args.calib_samples} starts (seed {NETWORK_CALIB_SEED}) against "
        f"a {args.ref_steps}-step dpmpp_3m solve"
        + (f" (validation: seed {NETWORK_VAL_SEED})" if val else "")
        + f"; held out: the bench's digits-unet starts ({xh.shape[0]}, seed 1) against its "
        f"{BENCH_REFERENCE_STEPS}-step reference"
    )
    return cal, val, held, what


def _network_fd_proxies(args: argparse.Namespace) -> tuple[Any, Any, list[Any], str]:
    """FD-digits proxies: calibration and validation starts against the train split's
    features; held out: the bench's FD starts against the held-out split's."""
    import torch

    from .bench.samplers import FD_SAMPLES
    from .models import digits_features, load
    from .models.bundled import load_classifier
    from .models.data import load_digits
    from .solvers.search import FDProxy

    model = load("digits", dtype=torch.float32)
    p = model.process
    clf = load_classifier()

    def feats(x: Any) -> Any:
        return digits_features(x, classifier=clf, grad=True)

    def starts(seed: int, n: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        return p.prior_sample((n, 1, 16, 16), g, dtype=torch.float64)

    train = digits_features(load_digits("train")[0], classifier=clf)
    heldout = digits_features(load_digits("heldout")[0], classifier=clf)
    name = "fd-digits"
    cal = FDProxy(model, starts(NETWORK_CALIB_SEED, args.calib_samples), feats, train, name=name)
    val = None
    if args.val_priors:
        xv = starts(NETWORK_VAL_SEED, args.calib_samples)
        val = FDProxy(model, xv, feats, train, name=name)
    n_held = min(args.heldout_samples, FD_SAMPLES)
    held = [FDProxy(model, starts(FD_HELDOUT_SEED, n_held), feats, heldout, name=name)]
    what = (
        f"digits: FD-digits proxy, calibration {args.calib_samples} starts (seed "
        f"{NETWORK_CALIB_SEED}) against the train split's features"
        + (f" (validation: seed {NETWORK_VAL_SEED})" if val is not None else "")
        + f"; held out: FD-digits of the bench's FD starts ({n_held}, seed "
        f"{FD_HELDOUT_SEED}) against the held-out split"
    )
    return cal, val, held, what


def _fit_log(args: argparse.Namespace) -> str | None:
    """The fit's own log next to ``--log`` (``X.jsonl`` -> ``X.fit.jsonl``)."""
    if not (args.fit and args.log):
        return None
    p = Path(args.log)
    return str(p.with_name(p.stem + ".fit" + (p.suffix or ".jsonl")))


def run_search(args: argparse.Namespace) -> int:
    _check_args(args)
    from .solvers.search import Proxy, Schedule, SearchResult, fit, search

    start = time.perf_counter()
    if args.proxy == "fd":
        proxy, vproxy, held_proxies, what = _network_fd_proxies(args)
    elif args.model in NETWORK_MODELS:
        cal, val, held, what = _network_sets(args)
    else:
        seeds = [(CALIB_PRIOR_SEED + i, CALIB_NOISE_SEED + i) for i in range(args.calib_priors)]
        cache = Path(args.cache) if args.cache else None
        cal = _analytic_sets(args.model, seeds, args.calib_samples, cache)
        vseeds = [(VAL_PRIOR_SEED + i, VAL_NOISE_SEED + i) for i in range(args.val_priors)]
        val = _analytic_sets(args.model, vseeds, args.calib_samples, cache)
        held = _analytic_sets(
            args.model, [(s, s + 1) for s in HELDOUT_PRIOR_SEEDS], args.heldout_samples, cache
        )
        what = (
            f"{args.model}: calibration priors seeds {seeds[0][0]}..{seeds[-1][0]} "
            f"({args.calib_samples} starts each)"
            + (f", validation priors seeds {vseeds[0][0]}..{vseeds[-1][0]}" if vseeds else "")
            + "; held out: prior seed 0 with the bench's "
            f"starts (seed 1) and prior seed 1 (starts seed 2), {args.heldout_samples} each"
        )
    print(what, file=sys.stderr)
    if args.proxy != "fd":
        proxy = Proxy(cal)
        vproxy = Proxy(val) if val else None
        held_proxies = [Proxy([s]) for s in held]
    info = {"model": args.model, "data": what, "proxy_kind": args.proxy}
    progress = False if args.no_progress else None
    seeds = [Schedule.load(f) for f in args.start]
    if args.budget == 0:  # --fit from the best --start, no search
        for f, s in zip(args.start, seeds, strict=True):
            if s.nfe != args.nfe:
                raise ValueError(f"--start {f} is a schedule of NFE {s.nfe}, not --nfe {args.nfe}")
        scored = [(proxy.schedule_error(s), s) for s in seeds]
        best = min(scored, key=lambda v: v[0])
        res = SearchResult(best[1], best[1], best[0], best[0], len(seeds), len(seeds))
    else:
        res = search(
            proxy,
            args.nfe,
            solver=args.solver,
            budget=args.budget,
            seed=args.seed,
            log=args.log,
            resume=args.resume,
            progress=progress,
            info=info,
            validation=vproxy,
            seeds=seeds,
        )
    # what the search cost (references and the held-out report below excluded)
    search_seconds = time.perf_counter() - start
    results = [("start", res.start, res.proxy_before), ("searched", res.schedule, res.proxy_after)]
    cost: dict[str, Any] = {
        "proxy_evaluations": res.evaluations,
        "new_proxy_evaluations": res.fresh,
        "seconds": round(search_seconds, 1),
    }
    if args.fit:
        fitted = fit(
            proxy,
            res.schedule,
            validation=vproxy,
            iterations=args.fit_iterations,
            times=not args.fit_fixed_times,
            log=_fit_log(args),
            resume=args.resume,
            progress=progress,
            info=info,
        )
        results.append(("fitted", fitted.schedule, fitted.proxy_after))
        cost["fit_iterations"] = fitted.iterations
        cost["fit_seconds"] = round(fitted.seconds, 1)
        cost["search_seconds"] = cost["seconds"]
        cost["seconds"] = round(search_seconds + fitted.seconds, 1)
        if args.budget == 0 and isinstance(res.start.info.get("cost"), dict):
            cost["start_cost"] = res.start.info["cost"]  # the search that found the start
    rows = []
    for label, sch, value in results:
        errs = [hp.schedule_error(sch) for hp in held_proxies]
        rows.append((label, sch, value, errs))
    sch = rows[-1][1]
    sch.info["heldout"] = rows[-1][3]
    sch.info["heldout_start"] = rows[0][3]
    sch.info["start"] = res.start.to_dict()
    if args.fit:
        sch.info["heldout_searched"] = rows[1][3]
        sch.info["searched"] = res.schedule.to_dict()
    sch.info["cost"] = cost
    if args.fit:
        sch.info["mode"] = "ns-fit"
    sch.save(args.out, force=args.force)
    names = "  ".join(f"held-out {i}" for i in range(len(held_proxies)))
    print(f"{'':9s}  proxy      {names}")
    for label, s, value, errs in rows:
        cols = "  ".join(f"{e:.4e}" for e in errs)
        print(f"{label:9s}  {value:.4e} {cols}   {s.describe()}")
    fit_txt = (
        f" + fit: {cost['fit_iterations']} iterations in {cost['fit_seconds']:.1f} s"
        if args.fit
        else ""
    )
    print(
        f"{res.evaluations} proxy evaluations ({res.fresh} new){fit_txt}; "
        f"{time.perf_counter() - start:.1f} s in all; schedule written to {args.out}"
    )
    return 0
