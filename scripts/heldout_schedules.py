"""Held-out errors of searched schedules on mixtures no search saw.

For an analytic bench task (``gmm-d64-vp``, ``gmm-d64-rf``, ...): the mean relative L2 error
of each schedule's NFE-n output to the exact probability-flow endpoint on

* priors 0..3 of the task's family (``prior_for(task, seed)``, starts from seed
  ``seed + 1``; prior 0 with its starts is the bench's own task), and
* "shape B": another family (10 components, means x1.5, covariance eigenvalues in
  [3e-4, 3e-2] instead of [1e-3, 1e-1]; seed 0, starts seed 1).

Usage::

    python scripts/heldout_schedules.py gmm-d64-vp gmm-d64-vp-nfe5-usf gmm-d64-vp-nfe5-ns

Schedules are shipped names or files. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusolve.bench.tasks import TASKS, prior_for
from diffusolve.models.analytic.gmm import GaussianMixture
from diffusolve.process import get_process
from diffusolve.solvers.search import Proxy, Schedule, list_shipped, load_shipped


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
    args = ap.parse_args()
    sets = _sets(args.task, args.n)
    print("| schedule | " + " | ".join(label for label, _ in sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    for name in args.schedules:
        sch = _schedule(name)
        errs = [Proxy([s]).schedule_error(sch) for _, s in sets]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
