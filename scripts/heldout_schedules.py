"""Held-out errors of searched schedules on mixtures no search saw.

For an analytic bench task (``gmm-d64-vp``, ``gmm-d64-rf``, ...): the mean relative L2 error
of each schedule's NFE-n output to the exact probability-flow endpoint on

* priors 0..3 of the task's family (``prior_for(task, seed)``, starts from seed
  ``seed + 1``; prior 0 with its starts is the bench's own task), and
* "shape B": another family (10 components, means x1.5, covariance eigenvalues in
  [3e-4, 3e-2] instead of [1e-3, 1e-1]; seed 0, starts seed 1).

Usage::

    python scripts/heldout_schedules.py gmm-d64-vp gmm-d64-vp-nfe5-usf gmm-d64-vp-nfe5-ns

Schedules are shipped names or files. ``--fixed NFE`` adds a row with the best of our
fixed-schedule solvers at that NFE (the solvers of :data:`FIXED` on every grid kind, ending
at t_min or one point early, final denoise or zero), picked on each set itself: a choice no user has, so an upper bound on
what a fixed schedule gives there. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusolve.bench.tasks import TASKS, prior_for
from diffusolve.models.analytic.gmm import GaussianMixture
from diffusolve.process import GRIDS, get_process, make_grid
from diffusolve.solvers import steps_for_nfe
from diffusolve.solvers.search import Proxy, Schedule, list_shipped, load_shipped

#: the fixed-schedule solvers of ``--fixed``
FIXED = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh1_1", "unipc_bh1_2", "unipc_bh2_2")
FIXED += ("deis_tab3", "ipndm")


def _schedule(name: str) -> Schedule:
    return load_shipped(name) if name in list_shipped() else Schedule.load(Path(name))


def _sets(task: str, n: int) -> list[tuple[str, tuple]]:
    d = int(TASKS[task]["dim"])
    process = get_process(TASKS[task]["process"])
    out = []
    priors = [(f"prior {s}", prior_for(task, s), s + 1) for s in range(4)]
    shape_b = GaussianMixture.random(
        d, 10, process=process, seed=0, mean_scale=1.5, eig_range=(3e-4, 3e-2)
    )
    for label, model, noise_seed in [*priors, ("shape B", shape_b, 1)]:
        g = torch.Generator().manual_seed(noise_seed)
        x = process.prior_sample((n, d), g, dtype=torch.float64)
        out.append((label, (model, x, model.reference_zero(x, process.t_max))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task")
    ap.add_argument("schedules", nargs="+")
    ap.add_argument("--n", type=int, default=512, help="starts per set (default 512)")
    ap.add_argument("--fixed", type=int, help="add our best fixed-schedule solver at this NFE")
    args = ap.parse_args()
    sets = _sets(args.task, args.n)
    print("| schedule | " + " | ".join(label for label, _ in sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    if args.fixed:
        process = sets[0][1][0].process
        best = [(float("inf"), "")] * len(sets)
        for name in FIXED:
            for kind in GRIDS:
                for final in ("denoise", "zero"):
                    n = steps_for_nfe(name, args.fixed, final)
                    ends = {"t_min": make_grid(process, n, kind)}
                    ends["early"] = make_grid(process, n + 1, kind)[:-1]  # one point early
                    for end, grid in ends.items():
                        sch = Schedule.for_solver(process, grid, name, final)
                        for i, (_, s) in enumerate(sets):
                            e = Proxy([s]).schedule_error(sch)
                            if e < best[i][0]:
                                best[i] = (e, f"{name}/{kind}/{end}/{final}")
        cells = " | ".join(f"{e:.4f} ({what})" for e, what in best)
        print(f"| our best fixed solver, picked per set | {cells} |", flush=True)
    for name in args.schedules:
        sch = _schedule(name)
        errs = [Proxy([s]).schedule_error(sch) for _, s in sets]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
