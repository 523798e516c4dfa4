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
        lines.append(
            "  ".join(str(r[c]).ljust(widths[c]) for c in cols[:-1]) + "  " + str(r["paper"])
        )
    return "\n".join(lines)


START, END = "<!-- solvers:start -->", "<!-- solvers:end -->"


def update_readme(path: str = "README.md", check: bool = False) -> bool:
    """Rewrite the solver table between the README markers; with ``check``, only compare.

    Returns True when the README is (or now is) up to date.
    """
    from pathlib import Path

    text = Path(path).read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + solver_table(markdown=True) + "\n" + END + tail
    if check:
        return new == text
    Path(path).write_text(new)
    return True


if __name__ == "__main__":  # python -m diffusolve.solvers.table [README.md]
    import sys

    update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
