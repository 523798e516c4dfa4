"""The solver table (README and ``diffusolve solvers``), generated from the registry."""

from __future__ import annotations

from .base import REGISTRY, get_solver, list_solvers

__all__ = ["solver_table", "solver_rows"]


def solver_rows() -> list[dict[str, object]]:
    rows = []
    for name in list_solvers():
        s = get_solver(name)
        cls, preset = REGISTRY[name]
        rows.append(
            {
                "name": name,
                "order": s.order,
                "evals/step": s.evals_per_step,
                "kind": ("multistep" if s.multistep else "single-step")
                + (", stochastic" if s.stochastic else ""),
                "grid": s.natural_grid,
                "preset": ", ".join(f"{k}={v}" for k, v in preset.items()) or "-",
                "paper": s.citation,
            }
        )
    return rows


def solver_table(markdown: bool = True) -> str:
    rows = solver_rows()
    cols = ["name", "order", "evals/step", "kind", "grid", "preset", "paper"]
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        return "\n".join(out)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols[:-1]}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols[:-1]) + "  paper"]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in cols[:-1]) + "  " + str(r["paper"]))
    return "\n".join(lines)
