"""The solver table (README and ``diffusolve solvers``), generated from the registry.

``solver_table(markdown=True)`` is the full Markdown table of the README (regenerate it with
``python -m diffusolve.solvers.table README.md``). The plain-text table for terminals cites
papers by first author and year, rounds presets, and is cut to ``width`` columns.
"""

from __future__ import annotations

import re

from . import base
from .base import REGISTRY, get_solver, list_solvers

__all__ = ["solver_table", "solver_rows", "short_citation", "update_readme"]

COLUMNS = ["name", "order", "evals/step", "kind", "grid", "preset", "paper"]


def solver_rows() -> list[dict[str, object]]:
    citations = getattr(base, "CITATIONS", {})
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
                "paper": citations.get(name, s.citation),
            }
        )
    return rows


def short_citation(citation: str) -> str:
    """``"Lu, Zhou, ... & Zhu, DPM-Solver: ..., NeurIPS 2022; ..."`` -> ``"Lu et al. 2022"``
    (one entry per cited paper, duplicates dropped).

    Example:
        >>> short_citation("Zhang & Chen, Fast Sampling ..., ICLR 2023")
        'Zhang & Chen 2023'
        >>> short_citation("Song, Meng & Ermon, Denoising Diffusion Implicit Models, ICLR 2021")
        'Song et al. 2021'
    """
    out: list[str] = []
    for paper in (p.strip() for p in citation.split(";")):
        if not paper:
            continue
        first = re.split(r",| & ", paper, maxsplit=1)[0].strip()
        two = re.match(r"^([^,&]+) & ([^,&]+),", paper)
        authors = f"{two.group(1).strip()} & {two.group(2).strip()}" if two else first
        if not two and ("," in paper.split(",", 1)[1][:40] or " & " in paper[:60]):
            authors = f"{first} et al."
        years = re.findall(r"\b(19|20)(\d\d)\b", paper)
        entry = f"{authors} {years[-1][0]}{years[-1][1]}" if years else authors
        if entry not in out:
            out.append(entry)
    return "; ".join(out)


def _short_preset(text: str) -> str:
    return re.sub(r"(\d+\.\d{4,})", lambda m: f"{float(m.group(1)):.3g}", text)


def solver_table(markdown: bool = True, width: int | None = None) -> str:
    """The registry as a Markdown table (README) or, with ``markdown=False``, a plain table
    with short citations whose lines are cut to ``width`` characters (a terminal's)."""
    rows = solver_rows()
    if markdown:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
        return "\n".join(out)
    # terminal: short citations before the (long) presets, so a cut line keeps the paper
    plain = ["name", "order", "evals/step", "kind", "grid", "paper", "preset"]
    cells = [
        {
            **{c: str(r[c]) for c in COLUMNS},
            "preset": _short_preset(str(r["preset"])),
            "paper": short_citation(str(r["paper"])),
        }
        for r in rows
    ]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in plain[:-1]}
    lines = ["  ".join(c.ljust(widths[c]) for c in plain[:-1]) + "  preset"]
    for r in cells:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in plain[:-1]) + "  " + r["preset"])
    aliases = getattr(base, "ALIASES", {})
    if aliases:
        lines += ["", "aliases (other libraries' names):"]
        lines += [f"  {k} -> {v[0]}: {v[1]}" for k, v in sorted(aliases.items())]
    lines += ["", "full table with paper titles: diffusolve solvers --markdown"]
    if width is not None and width > 0:
        lines = [
            line if len(line) <= width else line[: max(1, width - 3)] + "..." for line in lines
        ]
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
