"""Tables, summaries and plots for bench results (plain data in, text / PNG out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "markdown_tables", "summary_table", "plot_errors", "fmt", "family"]

LIBRARIES = ("diffusolve", "diffusers")
#: mark of a diverged result (output far larger than the reference: a blow-up)
DIVERGED_MARK = "†"
#: plot panels: (title, name prefixes, lower-cased) -- both libraries' methods of a family
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "DDIM / Euler / Heun (first and second order, one step)",
        ("ddim", "euler", "heun", "flowmatch"),
    ),
    ("DPM-Solver / DPM-Solver++", ("dpm",)),
    ("UniPC", ("unipc",)),
    ("DEIS", ("deis",)),
    ("pseudo linear multistep (PNDM, PLMS, iPNDM)", ("pndm", "plms", "ipndm")),
)


def fmt(v: float | None, digits: int = 2) -> str:
    """``1.23e-04`` style, ``--`` for missing values."""
    return "--" if v is None else f"{v:.{digits}e}"


def _best(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in records if r.get("rel_error") is not None and not r.get("diverged")]
    return min(ok, key=lambda r: r["rel_error"]) if ok else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and NFE: our best rel_error, diffusers' best, and ``ratio = ours / diffusers``.

    Diverged results (``diverged`` true) are never a library's best.

    Example:
        >>> recs = [dict(library="diffusolve", method="a", task="t", nfe=5, rel_error=0.1),
        ...         dict(library="diffusolve", method="b", task="t", nfe=5, rel_error=0.05),
        ...         dict(library="diffusers", method="c", task="t", nfe=5, rel_error=0.2)]
        >>> summarize(recs)[0]["ratio"]
        0.25
    """
    keys = list(dict.fromkeys((r["task"], r["nfe"]) for r in records))
    out = []
    for task, nfe in keys:
        rows = [r for r in records if r["task"] == task and r["nfe"] == nfe]
        ours = _best(r for r in rows if r["library"] == "diffusolve")
        theirs = _best(r for r in rows if r["library"] == "diffusers")
        ratio = None
        if ours is not None and theirs is not None and theirs["rel_error"] > 0:
            ratio = ours["rel_error"] / theirs["rel_error"]
        out.append(
            {
                "task": task,
                "nfe": nfe,
                "ours_method": ours["method"] if ours else None,
                "ours_setting": ours.get("setting") if ours else None,
                "ours_rel_error": ours["rel_error"] if ours else None,
                "diffusers_method": theirs["method"] if theirs else None,
                "diffusers_setting": theirs.get("setting") if theirs else None,
                "diffusers_rel_error": theirs["rel_error"] if theirs else None,
                "ratio": ratio,
            }
        )
    return out


def markdown_tables(result: dict[str, Any]) -> str:
    """One Markdown table per task: rows = methods, columns = NFE; best per library in bold;
    diverged results marked with :data:`DIVERGED_MARK` (and explained under the table)."""
    records = result["records"]
    lines: list[str] = []
    for task, info in result["tasks"].items():
        recs = [r for r in records if r["task"] == task]
        nfes = sorted({r["nfe"] for r in recs})
        lines.append(
            f"### {task}: {info.get('prior')} d={info.get('dim')} K={info.get('n_components')}, "
            f"{info.get('process')}; rel_error (sw_floor={fmt(info.get('sw_floor'))}, "
            f"reference accuracy {fmt(info.get('reference_accuracy'))})"
        )
        lines.append("")
        lines.append("| library | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|---|" + "---|" * len(nfes))
        best = {
            (lib, n): _best(r for r in recs if r["library"] == lib and r["nfe"] == n)
            for lib in LIBRARIES
            for n in nfes
        }
        for lib in LIBRARIES:
            for method in dict.fromkeys(r["method"] for r in recs if r["library"] == lib):
                cells = []
                for n in nfes:
                    r = next(
                        (
                            x
                            for x in recs
                            if x["library"] == lib and x["method"] == method and x["nfe"] == n
                        ),
                        None,
                    )
                    v = None if r is None else r["rel_error"]
                    c = fmt(v)
                    if r is not None and best[(lib, n)] is r:
                        c = f"**{c}**"
                    if r is not None and r.get("diverged"):
                        c = f"{c} {DIVERGED_MARK}"
                    cells.append(c)
                lines.append(f"| {lib} | {method} | " + " | ".join(cells) + " |")
        if any(r.get("diverged") for r in recs):
            lines.append("")
            lines.append(
                f"{DIVERGED_MARK} diverged: the output's RMS is far above the reference's (or not "
                "finite), a blow-up rather than an accuracy; never counted as a best."
            )
        lines.append("")
    return "\n".join(lines)


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: task, NFE, our best, diffusers' best, ratio ours/diffusers."""
    lines = [
        "| task | NFE | ours (best) | rel_error | diffusers (best) | rel_error | ours/diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ratio = "--" if s["ratio"] is None else f"{s['ratio']:.3g}"
        lines.append(
            f"| {s['task']} | {s['nfe']} | {s['ours_method'] or '--'} | {fmt(s['ours_rel_error'])} "
            f"| {s['diffusers_method'] or '--'} | {fmt(s['diffusers_rel_error'])} | {ratio} |"
        )
    return "\n".join(lines)


def family(method: str) -> str:
    """The plot panel (:data:`FAMILIES`) of a method of either library, by name prefix."""
    m = method.lower().replace(" ", "").replace("-", "")
    for title, prefixes in FAMILIES:
        if m.startswith(prefixes):
            return title
    return "other"


def plot_errors(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One error-vs-NFE PNG per task (log-log), one panel per solver family.

    In a panel each method has its own colour and marker; our solvers are solid lines,
    diffusers' dashed, and the best result per library and NFE over all families is drawn
    in every panel (thin grey: solid ours, dashed diffusers) as a common yardstick.
    Diverged results are left out of the lines and shown as crosses at the clip value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = 3.0  # errors above ~1 are divergence
    markers = "osD^v<>pP*Xh"
    paths = []
    for task in result["tasks"]:
        recs = [r for r in result["records"] if r["task"] == task]
        nfes = sorted({r["nfe"] for r in recs})
        methods = list(
            dict.fromkeys(
                (r["library"], r["method"]) for r in recs if r.get("rel_error") is not None
            )
        )
        panels = [t for t, _ in FAMILIES if any(family(m) == t for _, m in methods)]
        if any(family(m) == "other" for _, m in methods):
            panels.append("other")
        if not panels:
            panels = ["(no results)"]
        ncol = min(3, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(
            nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow), squeeze=False, sharex=True, sharey=True
        )
        envelope = {
            lib: sorted(
                (n, b["rel_error"])
                for n in nfes
                if (b := _best(r for r in recs if r["library"] == lib and r["nfe"] == n))
            )
            for lib in LIBRARIES
        }
        for ax, title in zip(axes.flat, panels, strict=False):
            for lib, style in (("diffusolve", "-"), ("diffusers", "--")):
                if envelope[lib]:
                    xs, ys = zip(*envelope[lib], strict=True)
                    ax.loglog(xs, ys, style, color="0.75", lw=3, zorder=1)
            mine = [(lib, m) for lib, m in methods if family(m) == title]
            colours = plt.cm.tab10.colors if len(mine) <= 10 else plt.cm.tab20.colors
            for i, (lib, method) in enumerate(mine):
                rows = [r for r in recs if r["library"] == lib and r["method"] == method]
                pts = sorted(
                    (r["nfe"], r["rel_error"])
                    for r in rows
                    if r["rel_error"] is not None and not r.get("diverged")
                )
                style = "-" if lib == "diffusolve" else "--"
                kw = dict(color=colours[i % len(colours)], marker=markers[i % len(markers)])
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.loglog(xs, ys, style, ms=4, lw=1.2, label=f"{method} ({lib})", **kw)
                bad = [r["nfe"] for r in rows if r.get("diverged")]
                if bad:
                    label = None if pts else f"{method} ({lib}, diverged)"
                    ax.loglog(bad, [clip] * len(bad), "x", ms=7, color=kw["color"], label=label)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=6, loc="best", framealpha=0.6)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        for ax in axes.flat:
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.tick_params(labelbottom=True)
            ax.minorticks_off()
        ax0 = axes.flat[0]
        lo, _ = ax0.get_ylim()
        ax0.set_ylim(lo, min(ax0.get_ylim()[1], clip * 1.2))
        fig.supxlabel("NFE")
        fig.supylabel("mean relative error to the exact reference")
        fig.suptitle(
            f"{task}: solid = diffusolve, dashed = diffusers; grey = best per library; "
            f"x = diverged (clipped at {clip:g})",
            fontsize=10,
        )
        fig.tight_layout()
        path = out / f"samplers_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
