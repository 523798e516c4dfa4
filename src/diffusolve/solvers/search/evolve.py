"""Schedule searches: evolution over timesteps (and USF decisions), then finite-difference
descent on the timesteps, scored by an honest proxy, logged and resumable.

**Proxy.** :class:`Proxy` holds calibration sets ``(model, x_T, reference)``; a candidate's
proxy is the mean over the sets of the mean relative L2 distance
(:func:`~diffusolve.metrics.rel_error`) of its NFE-``n`` output to the reference. For an
analytic prior the reference is the exact probability-flow endpoint; for a network a
many-step solve (the caller builds it). Report the final error on other noise (and, for
analytic priors, other priors): the search only ever sees the calibration sets.
:class:`FDProxy` scores the output distribution instead: the Frechet distance of a feature
map of the outputs (FD-digits' classifier features for the bundled model) to reference
features of real data, with no trajectory reference at all; report its final figure on
other noise and against other real data (the bundled model: fitted against the train
split, reported against the held-out split).

**Timesteps.** The grid starts at ``t_max`` (where ``x_T`` lives); its ``n`` other times
are parametrised in ``lambda = log(alpha / sigma)`` by ``n`` log-increments ``z``:
``u = cumsum(exp([z, 0]))[:n] / sum(exp([z, 0]))`` and ``lambda_i = lambda(t_max) + u_i
(lambda(t_min) - lambda(t_max))``. Every ``z`` is a strictly decreasing grid inside
``[t_min, t_max]`` (the last increment, the gap left before ``t_min``, lets the grid end
early: a large final jump, as diffusers' ``final_sigmas_type="zero"``), on any process.

**Search** (:func:`search`): starting candidates (standard grids, and for USF the decision
presets of UniPC / DPM-Solver++ with and without a lower-order final step; their best
proxy is the "before" figure), then an AutoDiffusion / S3-style evolution
(:data:`EVOLVE_SHARE` of the budget; the best ``population // 2`` are parents; children by
Gaussian mutation of ``z``, per-decision resampling with probability 0.3, a flip of the
final policy, and uniform per-step crossover), then descent on all continuous parameters
(``z`` and the relaxation scales) of the best candidate of each of the
:data:`REFINE_TOP` best plans ("families": the discrete choices), budget shared among
them, then of the next plans while budget is left.

The descent is L-BFGS-B with central finite-difference gradients (step ``FD_STEP``): the
proxy is a deterministic function of the grid, so this is gradient descent through the
sampler, with differences instead of autograd (the solvers' coefficients are float64
Python numbers, which autograd does not see). With ``validation=`` (other calibration
data), the result is the leader (best candidate of one of the :data:`SELECT_TOP` best
families) with the lowest validation error, which keeps plans that fit the calibration
sets' quirks (relaxation scales far from 1) from winning on the proxy alone. The budget
counts proxy evaluations (each one NFE-``n`` solve of every calibration set); repeated
candidates are free, validation solves are not counted.

**Log.** With ``log=``, a JSONL file: a header (the proxy's fingerprint: a hash of the
calibration data and references, the NFE and the search settings), then one line per
evaluated candidate (key, candidate, grid, proxy), each flushed and fsynced. ``resume=True``
reads the log and never re-evaluates a candidate found there; the search is deterministic
for a seed, so a resumed search retraces the interrupted one and ends with the same result.

Example:
    >>> import torch
    >>> from diffusolve.models import Gaussian
    >>> from diffusolve.process import vp_linear
    >>> from diffusolve.solvers.search import Proxy, search
    >>> prior = Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
    ...                  process=vp_linear())
    >>> xT = prior.process.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> proxy = Proxy([(prior, xT, prior.ode_solution(xT, prior.process.t_max, 0.0))])
    >>> res = search(proxy, 4, solver="ddim", budget=12, progress=False)
    >>> res.proxy_after <= res.proxy_before
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...metrics import FrechetTarget, rel_error
from ...process import Process, make_grid
from ..base import Solver, get_solver
from ..loop import sample, steps_for_nfe
from .schedule import Schedule
from .usf import CORRECTORS, ORDERS, USF, Decision

__all__ = [
    "Proxy",
    "FDProxy",
    "GridParam",
    "Candidate",
    "SearchResult",
    "search",
    "usf_presets",
    "FD_STEP",
]

#: the central-difference step of the refinement (in ``z`` and in the scales)
FD_STEP = 0.02
#: the relaxation scales are kept in ``[SCALE_MIN, SCALE_MAX]``
SCALE_MIN, SCALE_MAX = -4.0, 8.0
#: the value the refinement sees for a failed solve
PENALTY = 1e3
#: ``z`` is kept in ``[-Z_MAX, Z_MAX]`` (increments within a factor e^16 of each other)
Z_MAX = 8.0
#: the gap before ``t_min`` a standard grid that ends at ``t_min`` is encoded with
MIN_GAP = 1e-4
#: per-decision mutation probability (S3's)
P_DECISION = 0.3
#: per-coordinate mutation probability of ``z`` and its standard deviation
P_Z, SIGMA_Z = 0.5, 0.3
#: probability that a child flips the final policy
P_FINAL = 0.1
#: share of the budget spent by the evolution (the rest refines the leaders)
EVOLVE_SHARE = 0.6
#: plans refined at a time and leaders compared on the validation data
REFINE_TOP, SELECT_TOP = 2, 6
#: the grids the search starts from (``"early"``: one more interval, the last one dropped)
START_GRIDS = (("logsnr", "early"), ("time_quadratic", "early"), ("logsnr", "t_min"))
LOG_FORMAT = "diffusolve-search-log/1"


# ---------------------------------------------------------------------------- proxy
class Proxy:
    """Mean relative L2 error of a schedule's output to references on calibration sets.

    Args:
        sets: ``(model, x_T, reference)`` triples (``x_T`` at the process's ``t_max``); the
            models must share one process.
        dtype: the solver's compute dtype (default float64).
    """

    def __init__(self, sets: Sequence[tuple[Any, Tensor, Tensor]], dtype=torch.float64) -> None:
        if not sets:
            raise ValueError("a proxy needs at least one calibration set")
        self.sets = [(m, x, r) for m, x, r in sets]
        self.process: Process = self.sets[0][0].process
        names = {m.process.name for m, _, _ in self.sets}
        if len(names) > 1:
            raise ValueError(f"calibration models use different processes: {sorted(names)}")
        self.dtype = dtype

    def fingerprint(self) -> str:
        """A hash of the calibration starts and references (what a log is valid for)."""
        h = hashlib.sha1(self.process.name.encode())
        for _, x, r in self.sets:
            for t in (x, r):
                h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __call__(self, grid: Tensor, solver: Solver, final: str) -> float:
        """The proxy of running ``solver`` on ``grid`` with ``final`` (``inf`` on failure)."""
        errs = []
        for model, x, ref in self.sets:
            try:
                with torch.no_grad():
                    out = sample(
                        model, x, grid, solver, final=final, dtype=self.dtype, progress=False
                    )
            except (FloatingPointError, ValueError):
                return math.inf
            e = rel_error(out, ref)
            if not math.isfinite(e):
                return math.inf
            errs.append(e)
        return sum(errs) / len(errs)

    def schedule_error(self, schedule: Schedule) -> float:
        """The proxy of a :class:`Schedule` (held-out sets: build another proxy)."""
        schedule.check_process(self.process)
        return self(schedule.grid_tensor(), schedule.solver_object(), schedule.final)

    def loss(self, outs: Sequence[Tensor]) -> Tensor:
        """The proxy of the outputs ``outs`` (one per set, in order) as a differentiable
        tensor: what :func:`~diffusolve.solvers.search.fit` minimises."""
        total = outs[0].new_zeros(())
        for out, (_, _, ref) in zip(outs, self.sets, strict=True):
            r = ref.to(out.dtype)
            diff = (out - r).flatten(1).norm(dim=1)
            total = total + (diff / r.flatten(1).norm(dim=1)).mean()
        return total / len(outs)


class FDProxy(Proxy):
    """Frechet distance of a schedule's outputs to real data in a feature space.

    The proxy of a candidate is ``FD(features(out), reference)`` (a
    :class:`~diffusolve.metrics.fd.FrechetTarget`), for the outputs of one calibration set
    of starts ``x_T``: a distribution-level score with no trajectory reference, so a
    schedule fitted on it may leave the probability-flow ODE's endpoint (its ``rel_error``
    to that endpoint can grow) to bring the samples' statistics nearer the data's. Like
    every FD it is biased upward at small sizes: use a few hundred starts, and report the
    result on other starts against other real data.

    Args:
        model: the denoiser sampled.
        x_T: ``[N, ...]`` calibration starts at the process's ``t_max`` (``N >= 2``).
        features: ``x -> [N, D]``, differentiable in ``x`` (autograd) when the proxy is
            fitted (:func:`~diffusolve.solvers.search.fit`).
        reference: ``[M, D]`` features of real data (fixed).
        dtype: the solver's compute dtype (default float64).
        name: what the features are (recorded in the fingerprint).
    """

    def __init__(
        self,
        model: Any,
        x_T: Tensor,
        features: Callable[[Tensor], Tensor],
        reference: Tensor,
        *,
        dtype=torch.float64,
        name: str = "fd",
    ) -> None:
        if x_T.shape[0] < 2:
            raise ValueError(f"an FD proxy needs at least 2 starts, got {x_T.shape[0]}")
        self.sets = [(model, x_T, None)]
        self.process = model.process
        self.dtype = dtype
        self.features = features
        self.target = FrechetTarget(reference)
        self.name = str(name)

    def fingerprint(self) -> str:
        h = hashlib.sha1(f"{self.process.name}/{self.name}".encode())
        h.update(self.sets[0][1].detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        for t in (self.target.mu, self.target.root):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __call__(self, grid: Tensor, solver: Solver, final: str) -> float:
        model, x, _ = self.sets[0]
        try:
            with torch.no_grad():
                out = sample(model, x, grid, solver, final=final, dtype=self.dtype, progress=False)
                if not bool(torch.isfinite(out).all()):
                    return math.inf
                value = float(self.target(self.features(out)))
        except (FloatingPointError, ValueError):
            return math.inf
        return value if math.isfinite(value) else math.inf

    def loss(self, outs: Sequence[Tensor]) -> Tensor:
        if len(outs) != 1:
            raise ValueError(f"an FD proxy has one set of outputs, got {len(outs)}")
        return self.target(self.features(outs[0]))


# ---------------------------------------------------------------------------- grid
class GridParam:
    """The ``z`` <-> grid map of the module docstring, for ``n`` steps on ``process``."""

    def __init__(self, process: Process, n: int) -> None:
        self.process, self.n = process, int(n)
        self.l0 = float(process.lam(process.t_max))
        self.l1 = float(process.lam(process.t_min))

    def times(self, z: Sequence[float]) -> Tensor:
        """The grid (``n + 1`` decreasing times from ``t_max``) of ``z``."""
        if len(z) != self.n:
            raise ValueError(f"need {self.n} parameters, got {len(z)}")
        return self.times_tensor(torch.tensor([float(v) for v in z], dtype=torch.float64))

    def times_tensor(self, z: Tensor) -> Tensor:
        """:meth:`times` of a float64 tensor ``z``, differentiable in ``z``."""
        e = torch.exp(torch.cat([z, z.new_zeros(1)]))
        u = torch.cumsum(e, 0)[: self.n] / e.sum()
        lam = self.l0 + u * (self.l1 - self.l0)
        t = self.process.t_of_lambda(lam)
        p = self.process
        return torch.cat([t.new_tensor([p.t_max]), t.clamp(p.t_min, p.t_max)])

    def encode(self, grid: Tensor) -> tuple[float, ...]:
        """The ``z`` of a grid starting at ``t_max`` (a grid ending at ``t_min`` is given the
        gap :data:`MIN_GAP` of the range)."""
        lam = self.process.lam(grid[1:]).tolist()
        pts = [self.l0, *lam]
        inc = [b - a for a, b in zip(pts, pts[1:], strict=False)]
        gap = max(self.l1 - lam[-1], MIN_GAP * (self.l1 - self.l0))
        return tuple(_clip(math.log(max(v, 1e-300) / gap)) for v in inc)


def _clip(v: float) -> float:
    return max(-Z_MAX, min(Z_MAX, v))


def _clip_scale(v: float) -> float:
    return max(SCALE_MIN, min(SCALE_MAX, v))


# ---------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """A point of the search space: grid parameters, per-step decisions (USF) or ``None``
    (timestep-only), and the final policy."""

    z: tuple[float, ...]
    decisions: tuple[Decision, ...] | None
    final: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "z": list(self.z),
            "decisions": None if self.decisions is None else [d.to_dict() for d in self.decisions],
            "final": self.final,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        dec = d.get("decisions")
        return cls(
            tuple(float(v) for v in d["z"]),
            None if dec is None else tuple(Decision(**x) for x in dec),
            str(d["final"]),
        )

    def key(self) -> str:
        """A canonical string (floats by their exact repr)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def usf_presets(n: int) -> list[tuple[str, tuple[Decision, ...]]]:
    """Decision plans of known solvers on ``n`` steps: UniPC (bh1/bh2, predictor 2 and
    corrector), DPM-Solver++ 2M and 3M (bh2, no corrector), each also with the lower-order
    final step (order 1 on the last step, at most 2 on the one before)."""

    def plan(order: int, corr: bool, variant: str, lof: bool) -> tuple[Decision, ...]:
        out = []
        for i in range(n):
            q = min(order, n - i) if lof else order
            out.append(Decision("data", q, q if corr else 0, variant))
        return tuple(out)

    named = []
    for tag, order, corr, variant in (
        ("unipc_bh1_2", 2, True, "bh1"),
        ("unipc_bh2_2", 2, True, "bh2"),
        ("dpmpp_2m", 2, False, "bh2"),
        ("dpmpp_3m", 3, False, "bh2"),
    ):
        for lof in (True, False):
            named.append((tag + ("+lof" if lof else ""), plan(order, corr, variant, lof)))
    return named


# ---------------------------------------------------------------------------- evaluator
class _Budget(Exception):
    pass


class _Evaluator:
    """Scores candidates once each: cache (from the log when resuming), budget, log, bar."""

    def __init__(
        self,
        proxy: Proxy,
        param: GridParam,
        base: Solver,
        budget: int,
        header: dict[str, Any],
        log: str | os.PathLike | None,
        resume: bool,
        progress: bool | None,
    ) -> None:
        self.proxy, self.param, self.base, self.budget = proxy, param, base, int(budget)
        self.known: dict[str, float] = {}
        self.scores: dict[str, float] = {}
        self.cands: dict[str, Candidate] = {}
        self.fresh = 0
        self.file = None
        if log is not None:
            self.file = _open_log(Path(log), header, resume, self.known)
        show = progress if progress is not None else os.isatty(2)
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.budget, desc="search", unit="eval", leave=False)

    @property
    def left(self) -> int:
        return self.budget - len(self.scores)

    def solver(self, c: Candidate) -> Solver:
        return self.base if c.decisions is None else USF(decisions=c.decisions)

    def __call__(self, c: Candidate) -> float:
        k = c.key()
        if k in self.scores:
            return self.scores[k]
        if self.left <= 0:
            raise _Budget
        grid = self.param.times(c.z)
        if k in self.known:
            value = self.known[k]
        else:
            value = self.proxy(grid, self.solver(c), c.final)
            self.fresh += 1
            if self.file is not None:
                rec = {
                    "kind": "eval",
                    "key": k,
                    "candidate": c.to_dict(),
                    "grid": grid.tolist(),
                    "proxy": value if math.isfinite(value) else None,
                }
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
                os.fsync(self.file.fileno())
        self.scores[k] = value
        self.cands[k] = c
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{min(self.scores.values()):.4g}")
        return value

    def ranked(self) -> list[tuple[float, Candidate]]:
        """Every scored candidate, best first (ties: first evaluated)."""
        order = {k: i for i, k in enumerate(self.scores)}
        ks = sorted(self.scores, key=lambda k: (self.scores[k], order[k]))
        return [(self.scores[k], self.cands[k]) for k in ks]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _open_log(path: Path, header: dict[str, Any], resume: bool, known: dict[str, float]):
    head = {"kind": "header", "format": LOG_FORMAT, **header}
    if path.exists() and path.stat().st_size > 0:
        if not resume:
            raise FileExistsError(f"{path} exists; pass resume=True (--resume) to continue it")
        lines = path.read_text().splitlines()
        first = json.loads(lines[0])
        for key in ("format", "proxy", "nfe", "mode", "solver"):
            if first.get(key) != head.get(key):
                raise ValueError(
                    f"{path} was written by another search ({key}: {first.get(key)!r}, this "
                    f"one {head.get(key)!r}); use another --log"
                )
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if rec.get("kind") == "eval":
                v = rec.get("proxy")
                known[rec["key"]] = math.inf if v is None else float(v)
        f = path.open("a")
        if not path.read_text().endswith("\n"):
            f.write("\n")
        return f
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("w")
    f.write(json.dumps(head) + "\n")
    f.flush()
    os.fsync(f.fileno())
    return f


# ---------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """The best schedule found, the best starting schedule and their proxies."""

    schedule: Schedule
    start: Schedule
    proxy_before: float
    proxy_after: float
    evaluations: int
    fresh: int
    trace: list[float] = field(default_factory=list)


def _mutate(rng: random.Random, c: Candidate, finals: tuple[str, ...]) -> Candidate:
    z = tuple(_clip(v + rng.gauss(0.0, SIGMA_Z)) if rng.random() < P_Z else v for v in c.z)
    dec = c.decisions
    if dec is not None:
        new = []
        for d in dec:
            opts = d.to_dict()
            if rng.random() < P_DECISION:
                opts["prediction"] = rng.choice(("data", "noise"))
            if rng.random() < P_DECISION:
                opts["order"] = rng.choice(ORDERS)
            if rng.random() < P_DECISION:
                opts["corrector"] = rng.choice(CORRECTORS)
            if rng.random() < P_DECISION:
                opts["variant"] = rng.choice(("bh1", "bh2"))
            if rng.random() < P_DECISION:
                opts["scale"] = _clip_scale(opts["scale"] + rng.gauss(0.0, SIGMA_Z))
            new.append(Decision(**opts))
        dec = tuple(new)
    final = rng.choice(finals) if rng.random() < P_FINAL else c.final
    return Candidate(z, dec, final)


def _cross(rng: random.Random, a: Candidate, b: Candidate) -> Candidate:
    pick = [rng.random() < 0.5 for _ in a.z]
    z = tuple(u if p else v for p, u, v in zip(pick, a.z, b.z, strict=False))
    dec = None
    if a.decisions is not None and b.decisions is not None:
        dec = tuple(u if p else v for p, u, v in zip(pick, a.decisions, b.decisions, strict=False))
    return Candidate(z, dec, a.final if rng.random() < 0.5 else b.final)


def _family(c: Candidate) -> str:
    """A candidate's discrete choices (decisions without their scales, final policy): the
    refinement moves only the continuous parameters inside one family."""
    dec = None
    if c.decisions is not None:
        dec = [(d.prediction, d.order, d.corrector, d.variant) for d in c.decisions]
    return json.dumps([dec, c.final])


def _vector(c: Candidate, scales: bool = True) -> list[float]:
    """The continuous parameters of a candidate: ``z`` and, for USF with ``scales``, the
    relaxation scales of steps 1.. (step 0 has no derivative term)."""
    if c.decisions is None or not scales:
        return list(c.z)
    return [*c.z, *(d.scale for d in c.decisions[1:])]


def _from_vector(c: Candidate, v: Sequence[float]) -> Candidate:
    n = len(c.z)
    z = tuple(_clip(float(x)) for x in v[:n])
    dec = c.decisions
    if dec is not None and len(v) > n:
        scales = [dec[0].scale] + [_clip_scale(float(x)) for x in v[n:]]
        dec = tuple(dataclasses.replace(d, scale=s) for d, s in zip(dec, scales, strict=False))
    return Candidate(z, dec, c.final)


class _Cap(Exception):
    pass


def _refine(
    ev: _Evaluator,
    best: Candidate,
    trace: list[float],
    *,
    scales: bool = True,
    cap: int | None = None,
) -> None:
    """L-BFGS-B (scipy) on the continuous parameters of ``best`` (``z``, and the relaxation
    scales when ``scales``; decisions and final fixed), with central finite-difference
    gradients; stops after ``cap`` new proxy evaluations or when the budget ends."""
    from scipy.optimize import minimize

    v0 = _vector(best, scales)
    n = len(best.z)
    bounds = [(-Z_MAX, Z_MAX)] * n + [(SCALE_MIN, SCALE_MAX)] * (len(v0) - n)
    stop = len(ev.scores) + (ev.left if cap is None else min(cap, ev.left))

    def score(c: Candidate) -> float:
        if c.key() not in ev.scores and len(ev.scores) >= stop:
            raise _Cap
        return ev(c)

    def fun(v):
        f = score(_from_vector(best, v))
        if not math.isfinite(f):
            return PENALTY, [0.0] * len(v)
        grad = []
        for j in range(len(v)):
            up, dn = list(v), list(v)
            up[j] += FD_STEP
            dn[j] -= FD_STEP
            fu, fd = score(_from_vector(best, up)), score(_from_vector(best, dn))
            ok = math.isfinite(fu) and math.isfinite(fd)
            grad.append((fu - fd) / (2 * FD_STEP) if ok else 0.0)
        trace.append(min(f, trace[-1]) if trace else f)
        return f, grad

    try:
        minimize(fun, v0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 10_000})
    except _Cap:
        pass


def _candidate_of(sch: Schedule, param: GridParam, mode: str, base: Solver) -> Candidate:
    """The search candidate of a seed schedule (refuses one of another kind)."""
    sch.check_process(param.process)
    if len(sch.grid) != param.n + 1 or sch.final not in ("denoise", "zero"):
        raise ValueError(
            f"a seed schedule needs {param.n} steps and final 'denoise' or 'zero' here, "
            f"got {len(sch.grid) - 1} steps and final {sch.final!r}"
        )
    if mode == "usf":
        if sch.solver != "usf" or not sch.decisions:
            raise ValueError("a USF search's seed must be a usf schedule with decisions")
        return Candidate(param.encode(sch.grid_tensor()), tuple(sch.decisions), sch.final)
    if sch.solver_object() != base:
        raise ValueError(f"a timestep search of {base.name} needs seeds of that solver")
    return Candidate(param.encode(sch.grid_tensor()), None, sch.final)


def _leaders(ev: _Evaluator, k: int, skip: set[str] = frozenset()) -> list[Candidate]:
    """The best candidate of each of the ``k`` best families (finite proxies only)."""
    out: list[Candidate] = []
    seen = set(skip)
    for v, c in ev.ranked():
        if not math.isfinite(v) or len(out) >= k:
            break
        f = _family(c)
        if f not in seen:
            seen.add(f)
            out.append(c)
    return out


def search(
    proxy: Proxy,
    nfe: int,
    *,
    solver: str | Solver | None = None,
    budget: int = 200,
    seed: int = 0,
    finals: tuple[str, ...] = ("denoise", "zero"),
    population: int | None = None,
    log: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    info: dict[str, Any] | None = None,
    validation: Proxy | None = None,
    seeds: Sequence[Schedule] = (),
    on_result: Callable[[SearchResult], None] | None = None,
) -> SearchResult:
    """Search a schedule of ``nfe`` model evaluations on ``proxy``.

    Args:
        proxy: the calibration sets (:class:`Proxy`).
        nfe: model evaluations of a run, the final evaluation included.
        solver: a registered deterministic solver: search its timesteps only
            (AutoDiffusion-style); ``None``: the USF search over timesteps and per-step
            decisions (S3-style).
        budget: proxy evaluations (each one NFE-``nfe`` solve of every calibration set).
        seed: the search's random seed (the search is deterministic for a seed).
        finals: final policies the search may choose.
        population: candidates per generation (default ``clip(budget // 8, 8, 32)``).
        log: a JSONL log (see the module docstring); ``resume`` continues one.
        progress: a tqdm bar (default: when stderr is a terminal).
        info: extra provenance stored in the schedules' ``info``.
        validation: other calibration data (other priors or noise, never the held-out
            sets): the result is the one of the :data:`SELECT_TOP` leading plans (the best
            candidate of each) with the lowest error there, not the lowest proxy.
        seeds: schedules to start from besides the standard ones (e.g. the winner of a
            timestep search, given as a USF schedule); same process and NFE, and for a
            timestep search the same solver.
    """
    process = proxy.process
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    if budget < 1:
        raise ValueError(f"budget must be at least 1 proxy evaluation, got {budget}")
    for f in finals:
        if f not in ("denoise", "zero"):
            raise ValueError(f"finals must be 'denoise' or 'zero', got {f!r}")
    if solver is None:
        base: Solver = USF()
        n = int(nfe) - 1
        mode, name = "usf", "usf"
    else:
        base = get_solver(solver)
        if base.stochastic:
            raise ValueError(f"{base.name} is stochastic; the search needs a deterministic solver")
        n = steps_for_nfe(base, nfe, "denoise")
        mode, name = "timesteps", base.name
    param = GridParam(process, n)
    header = {
        "proxy": proxy.fingerprint(),
        "nfe": int(nfe),
        "mode": mode,
        "solver": name,
        "seed": seed,
        "budget": budget,
        "finals": list(finals),
    }
    ev = _Evaluator(proxy, param, base, budget, header, log, resume, progress)
    rng = random.Random(seed)
    pop_size = population or max(8, min(32, budget // 8))
    trace: list[float] = []
    starts = []
    for kind, end in START_GRIDS:
        g = make_grid(process, n + 1, kind)[:-1] if end == "early" else make_grid(process, n, kind)
        z = param.encode(g)
        if mode == "usf":
            starts += [Candidate(z, plan, f) for _, plan in usf_presets(n) for f in finals]
        else:
            starts += [Candidate(z, None, f) for f in finals]
    if len(starts) > max(2, budget // 3):  # leave two thirds of a small budget to search
        starts = starts[: max(2, budget // 3)]
    starts = [_candidate_of(sch, param, mode, base) for sch in seeds] + starts
    try:
        try:
            for c in starts:
                ev(c)
            evolve_until = max(0, int(budget * EVOLVE_SHARE) - len(ev.scores))
            stop_at = ev.left - evolve_until
            while ev.left > stop_at:
                ranked = ev.ranked()
                parents = [c for v, c in ranked[: max(2, pop_size // 2)] if math.isfinite(v)]
                if len(parents) < 2:
                    parents = [c for _, c in ranked[:2]]
                for j in range(pop_size):
                    if ev.left <= stop_at:
                        break
                    if j % 3 == 2:
                        a, b = rng.sample(parents, 2)
                        child = _cross(rng, a, b)
                    else:
                        child = _mutate(rng, rng.choice(parents), finals)
                    ev(child)
                trace.append(ev.ranked()[0][0])
            # the continuous parameters of the best few plans, then of the next ones
            done: set[str] = set()
            while ev.left > 2 * n:
                lead = _leaders(ev, REFINE_TOP, done)
                if not lead:
                    break
                for i, c in enumerate(lead):
                    done.add(_family(c))
                    _refine(ev, c, trace, cap=max(2 * n + 1, ev.left // (len(lead) - i)))
        except _Budget:
            pass
    finally:
        ev.close()
    n_starts = len(starts)
    start_scores = [(ev.scores.get(c.key(), math.inf), i) for i, c in enumerate(starts)]
    v0, i0 = min(start_scores)
    v1, best = ev.ranked()[0]
    meta = {**(info or {}), "mode": mode, "budget": budget, "seed": seed}
    if validation is not None:
        # the schedule is chosen among the best of each leading plan on other data
        pool = _leaders(ev, SELECT_TOP) or [best]
        scored = []
        for c in pool:
            val = validation(param.times(c.z), ev.solver(c), c.final)
            scored.append((val, ev.scores[c.key()], c))
        val, v1, best = min(scored, key=lambda r: (r[0], r[1]))
        meta["validation"] = val
        meta["validation_pool"] = [[p, v] for v, p, _ in scored]

    def schedule(c: Candidate, value: float, what: str) -> Schedule:
        return Schedule.for_solver(
            process,
            param.times(c.z),
            ev.solver(c),
            c.final,
            info={**meta, "role": what, "proxy": value, "proxy_fingerprint": header["proxy"]},
        )

    res = SearchResult(
        schedule(best, v1, "searched"),
        schedule(starts[i0], v0, f"best of {n_starts} starting schedules"),
        v0,
        v1,
        len(ev.scores),
        ev.fresh,
        trace,
    )
    if on_result is not None:
        on_result(res)
    return res
