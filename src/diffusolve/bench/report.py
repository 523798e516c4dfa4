"""Tables, summaries and plots for bench results (plain data in, text / PNG out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "summarize",
    "moonshot",
    "markdown_tables",
    "summary_table",
    "moonshot_table",
    "fd_summary_table",
    "fd_only_table",
    "searched_table",
    "fd_table",
    "plot_errors",
    "fmt",
    "family",
    "is_searched",
    "counts",
]

LIBRARIES = ("diffusolve", "diffusers")
#: mark of a diverged result (output far larger than the reference: a blow-up)
DIVERGED_MARK = "†"
#: mark of a searched schedule whose search saw this bench's data (or whose data is unknown)
NOT_HELDOUT_MARK = "‡"
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
    ("searched schedules (fixed NFE)", ("searched:",)),
)


def fmt(v: float | None, digits: int = 2) -> str:
    """``1.23e-04`` style, ``--`` for missing values."""
    return "--" if v is None else f"{v:.{digits}e}"


def is_searched(r: dict[str, Any]) -> bool:
    """Whether a record is a searched schedule's (it carries a ``searched`` dict)."""
    return bool(r.get("searched"))


def counts(r: dict[str, Any]) -> bool:
    """Whether a record may be a library's best: not a searched schedule whose search saw
    this bench's data or whose held-out status is unknown."""
    return not is_searched(r) or r["searched"].get("heldout") is True


def _best(records: Iterable[dict[str, Any]], key: str = "rel_error") -> dict[str, Any] | None:
    ok = [r for r in records if r.get(key) is not None and not r.get("diverged") and counts(r)]
    return min(ok, key=lambda r: r[key]) if ok else None


def _record(
    recs: Iterable[dict[str, Any]], library: str, method: str, nfe: int
) -> dict[str, Any] | None:
    """The record of ``method`` of ``library`` at ``nfe`` (``None`` when not run)."""
    return next(
        (r for r in recs if r["library"] == library and r["method"] == method and r["nfe"] == nfe),
        None,
    )


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rel_error"):
    if a is None or b is None or not b[key] > 0:
        return None
    return a[key] / b[key]


def summarize(
    records: Sequence[dict[str, Any]], fd_only: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Per task and NFE: our best rel_error, diffusers' best, and ``ratio = ours / diffusers``.

    Diverged results (``diverged`` true) are never a library's best, nor is a searched
    schedule that was not held out (:func:`counts`). Besides our best over everything
    (``ours_*``, searched schedules included) each row has our best fixed-schedule solver
    (``fixed_*``, searched schedules left out; ``fixed_ratio = fixed / diffusers``), the
    best searched schedule (``searched_*``, with ``searched_cost``) and, where records carry
    FD-digits, the best searched schedule's FD next to the best fixed-schedule method's of
    either library (``fd_*``; ``fd_ratio = searched / fixed``). ``fd_only`` records
    (FD-digits alone: stochastic solvers, which join the fixed-schedule baseline, and
    whole-trajectory samplers) take part in ``fd_any_*``: our best FD-digits over every
    method, with its median nearest-neighbour distance to the train split next to the
    held-out digits' (``fd_any_nn``, ``fd_any_nn_heldout``; ``fd_any_ratio = any / fixed``).

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
        fixed = _best(r for r in rows if r["library"] == "diffusolve" and not is_searched(r))
        found = _best(r for r in rows if is_searched(r))
        row = {
            "task": task,
            "nfe": nfe,
            "ours_method": ours["method"] if ours else None,
            "ours_setting": ours.get("setting") if ours else None,
            "ours_rel_error": ours["rel_error"] if ours else None,
            "diffusers_method": theirs["method"] if theirs else None,
            "diffusers_setting": theirs.get("setting") if theirs else None,
            "diffusers_rel_error": theirs["rel_error"] if theirs else None,
            "ratio": _ratio(ours, theirs),
            "fixed_method": fixed["method"] if fixed else None,
            "fixed_rel_error": fixed["rel_error"] if fixed else None,
            "fixed_ratio": _ratio(fixed, theirs),
            "searched_method": found["method"] if found else None,
            "searched_rel_error": found["rel_error"] if found else None,
            "searched_cost": found["searched"].get("cost") if found else None,
        }
        extra = [r for r in fd_only if r["task"] == task and r["nfe"] == nfe]
        if any(r.get("fd_digits") is not None for r in [*rows, *extra]):
            fd_found = _best((r for r in rows if is_searched(r)), "fd_digits")
            fd_fixed = _best(
                [r for r in rows if not is_searched(r)]
                + [r for r in extra if r.get("kind") == "stochastic solver"],
                "fd_digits",
            )
            fd_any = _best([r for r in rows if r["library"] == "diffusolve"] + extra, "fd_digits")
            row.update(
                fd_searched_method=fd_found["method"] if fd_found else None,
                fd_searched=fd_found["fd_digits"] if fd_found else None,
                fd_fixed_method=fd_fixed["method"] if fd_fixed else None,
                fd_fixed_library=fd_fixed["library"] if fd_fixed else None,
                fd_fixed=fd_fixed["fd_digits"] if fd_fixed else None,
                fd_ratio=_ratio(fd_found, fd_fixed, "fd_digits"),
                fd_any_method=fd_any["method"] if fd_any else None,
                fd_any=fd_any["fd_digits"] if fd_any else None,
                fd_any_nn=fd_any.get("median_nn_train") if fd_any else None,
                fd_any_nn_heldout=fd_any.get("heldout_median_nn_train") if fd_any else None,
                fd_any_ratio=_ratio(fd_any, fd_fixed, "fd_digits"),
            )
        out.append(row)
    return out


def moonshot(
    records: Sequence[dict[str, Any]], low: int = 5, high: int = 10
) -> list[dict[str, Any]]:
    """Per task with both NFEs in the records: our best at NFE ``low`` (searched schedules
    included, held out only) against diffusers' best at NFE ``high``; ``ratio = ours /
    diffusers`` (< 1: ours at ``low`` evaluations beats diffusers at ``high``).

    Example:
        >>> recs = [dict(library="diffusolve", method="a", task="t", nfe=5, rel_error=0.1),
        ...         dict(library="diffusers", method="c", task="t", nfe=10, rel_error=0.2)]
        >>> moonshot(recs)[0]["ratio"]
        0.5
    """
    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        if not ({low, high} <= {r["nfe"] for r in rows}):
            continue
        ours = _best(r for r in rows if r["library"] == "diffusolve" and r["nfe"] == low)
        theirs = _best(r for r in rows if r["library"] == "diffusers" and r["nfe"] == high)
        out.append(
            {
                "task": task,
                "ours_nfe": low,
                "ours_method": ours["method"] if ours else None,
                "ours_rel_error": ours["rel_error"] if ours else None,
                "diffusers_nfe": high,
                "diffusers_method": theirs["method"] if theirs else None,
                "diffusers_rel_error": theirs["rel_error"] if theirs else None,
                "ratio": _ratio(ours, theirs),
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
                    r = _record(recs, lib, method, n)
                    v = None if r is None else r["rel_error"]
                    c = fmt(v)
                    if r is not None and best[(lib, n)] is r:
                        c = f"**{c}**"
                    if r is not None and r.get("diverged"):
                        c = f"{c} {DIVERGED_MARK}"
                    if r is not None and not counts(r):
                        c = f"{c} {NOT_HELDOUT_MARK}"
                    cells.append(c)
                lines.append(f"| {lib} | {method} | " + " | ".join(cells) + " |")
        if any(r.get("diverged") for r in recs):
            lines.append("")
            lines.append(
                f"{DIVERGED_MARK} diverged: the output's RMS is far above the reference's (or not "
                "finite), a blow-up rather than an accuracy; never counted as a best."
            )
        if any(not counts(r) for r in recs):
            lines.append("")
            lines.append(
                f"{NOT_HELDOUT_MARK} searched schedule whose search saw this bench's data (or "
                "whose search data is not recorded): not a held-out result; never counted as a "
                "best."
            )
        notes = _searched_notes(recs)
        if notes:
            lines += ["", *notes]
        if any(r.get("fd_digits") is not None for r in recs):
            lines += ["", fd_table(result, task)]
        lines.append("")
    return "\n".join(lines)


def _cost_text(cost: dict[str, Any] | None) -> str:
    if not cost:
        return "search cost not recorded"
    parts = []
    for key, unit in (
        ("proxy_evaluations", "proxy evaluations"),
        ("model_evaluations", "model evaluations"),
        ("seconds", "s"),
    ):
        v = cost.get(key)
        if v is not None:
            parts.append(f"{v:,.0f} {unit}" if key != "seconds" else f"{v:.0f} {unit}")
    text = ", ".join(parts) or "not recorded"
    return text + (f" ({cost['note']})" if cost.get("note") else "")


def _searched_notes(recs: Sequence[dict[str, Any]]) -> list[str]:
    """One line per searched method of a task: what was searched, held out or not, cost."""
    out = []
    for r in {r["method"]: r for r in recs if is_searched(r)}.values():
        s = r["searched"]
        held = {True: "held out", False: "NOT held out", None: "held-out status unknown"}
        out.append(
            f"- `{r['method']}`: {s.get('mode') or 'schedule'} search ({s.get('solver')}, "
            f"final={s.get('final')}) on {s.get('searched_on') or 'unknown data'}; "
            f"{held[s.get('heldout')]}: {s.get('note')}; search cost: "
            f"{_cost_text(s.get('cost'))}."
        )
    return out


def fd_table(result: dict[str, Any], task: str) -> str:
    """Markdown: FD-digits per method (rows) and NFE (columns) of one task, with its floor."""
    info = result["tasks"].get(task, {})
    recs = [r for r in result["records"] if r["task"] == task]
    nfes = sorted({r["nfe"] for r in recs})
    n = info.get("fd_samples")
    lines = [
        f"FD-digits ({n} samples per method and NFE, unconditional, against the held-out "
        f"digits; real-vs-real floor at this size {fmt(info.get('fd_floor'), 3)}; lower is "
        "better; best fixed-schedule and best searched in bold):",
        "",
        "| library | method | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    best = {}
    for k in nfes:
        rows = [r for r in recs if r["nfe"] == k]
        best[k] = (
            _best((r for r in rows if not is_searched(r)), "fd_digits"),
            _best((r for r in rows if is_searched(r)), "fd_digits"),
        )
    for lib in LIBRARIES:
        for method in dict.fromkeys(r["method"] for r in recs if r["library"] == lib):
            cells = []
            for k in nfes:
                r = _record(recs, lib, method, k)
                c = "--" if r is None or r.get("fd_digits") is None else f"{r['fd_digits']:.3g}"
                if r is not None and any(r is b for b in best[k]):
                    c = f"**{c}**"
                cells.append(c)
            lines.append(f"| {lib} | {method} | " + " | ".join(cells) + " |")
    extra = [r for r in result.get("fd_only", ()) if r["task"] == task]
    if not extra:
        return "\n".join(lines)
    for method in dict.fromkeys(r["method"] for r in extra):
        cells = []
        for k in nfes:
            r = _record(extra, "diffusolve", method, k)
            cells.append(
                "--" if r is None or r.get("fd_digits") is None else f"{r['fd_digits']:.3g}"
            )
        kind = next(r.get("kind") for r in extra if r["method"] == method)
        lines.append(f"| diffusolve | {method} ({kind}; FD only) | " + " | ".join(cells) + " |")
    lines += ["", fd_only_table(extra)]
    return "\n".join(lines)


def fd_only_table(extra: Sequence[dict[str, Any]]) -> str:
    """Markdown: the FD-only samplers' records with their memorisation figures."""
    held = next((r.get("heldout_median_nn_train") for r in extra if r.get("fd_digits")), None)
    lines = [
        "FD-only samplers (no probability-flow reference; documented defaults, no settings "
        "search): median nearest-neighbour distance of the samples to the train split (the "
        f"held-out digits': {_r(held)}; much lower is copying), the fraction within a third "
        "of the held-out median of a training image, DPM-OT's level and share of distinct "
        "images:",
        "",
        "| method | NFE | NFE used | FD-digits | NN to train | within radius | t_late (sigma) "
        "| distinct | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in extra:
        level = "--"
        if r.get("t_late") is not None:
            sig = next((g["sigma"] for g in r.get("guard", ()) if g["t_late"] == r["t_late"]), None)
            level = f"{r['t_late']:.4g} ({_r(sig)})"
        distinct = "--" if r.get("distinct_fraction") is None else f"{r['distinct_fraction']:.2f}"
        lines.append(
            f"| {r['method']} | {r['nfe']} | {r.get('nfe_used') or '--'} | "
            f"{_r(r.get('fd_digits'))} | {_r(r.get('median_nn_train'))} | "
            f"{_r(r.get('frac_within_radius'))} | {level} | "
            f"{distinct} | {r.get('note') or ''} |"
        )
    return "\n".join(lines)


def _r(v: float | None) -> str:
    return "--" if v is None else f"{v:.3g}"


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: task, NFE, our best (searched schedules included), diffusers' best, ratio
    ours/diffusers, then our best fixed-schedule solver and its ratio to diffusers'."""
    lines = [
        "| task | NFE | ours (best) | rel_error | diffusers (best) | rel_error | ours/diffusers "
        "| ours fixed-schedule (best) | rel_error | fixed/diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['nfe']} | {s['ours_method'] or '--'} | {fmt(s['ours_rel_error'])} "
            f"| {s['diffusers_method'] or '--'} | {fmt(s['diffusers_rel_error'])} | "
            f"{_r(s['ratio'])} | {s.get('fixed_method') or '--'} | "
            f"{fmt(s.get('fixed_rel_error'))} | {_r(s.get('fixed_ratio'))} |"
        )
    return "\n".join(lines)


def searched_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task and NFE with a searched schedule, its gain over our best
    fixed-schedule solver and over diffusers' best, next to what the search cost."""
    rows = [s for s in summary if s.get("searched_method")]
    if not rows:
        return ""
    lines = [
        "| task | NFE | searched (best held out) | rel_error | fixed/searched | "
        "diffusers/searched | proxy evaluations | model evaluations | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        c = s.get("searched_cost") or {}
        e = s["searched_rel_error"]
        gain_f = None if not e or s.get("fixed_rel_error") is None else s["fixed_rel_error"] / e
        gain_d = (
            None if not e or s.get("diffusers_rel_error") is None else s["diffusers_rel_error"] / e
        )

        def n(v: Any) -> str:
            return "--" if v is None else f"{v:,.0f}"

        lines.append(
            f"| {s['task']} | {s['nfe']} | {s['searched_method']} | {fmt(e)} | {_r(gain_f)} | "
            f"{_r(gain_d)} | {n(c.get('proxy_evaluations'))} | {n(c.get('model_evaluations'))} "
            f"| {n(c.get('seconds'))} |"
        )
    return "\n".join(lines)


def fd_summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task and NFE with FD-digits, the best searched schedule's FD-digits and
    our best over every method (FD-only samplers included, with the median nearest-neighbour
    distance of its samples to the train split next to the held-out digits') against the
    best fixed-schedule solver's (either library); empty without FD."""
    rows = [s for s in summary if "fd_fixed" in s]
    if not rows:
        return ""
    lines = [
        "| task | NFE | searched (best FD) | FD-digits | ours, any method (best FD) | FD-digits "
        "| NN to train (held-out digits) | fixed-schedule (best FD) | FD-digits | "
        "searched/fixed | any/fixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        fixed = s.get("fd_fixed_method")
        if fixed:
            fixed = f"{fixed} ({s['fd_fixed_library']})"
        nn = "--"
        if s.get("fd_any_nn") is not None:
            nn = f"{s['fd_any_nn']:.3g} ({_r(s.get('fd_any_nn_heldout'))})"
        lines.append(
            f"| {s['task']} | {s['nfe']} | {s.get('fd_searched_method') or '--'} | "
            f"{_r(s.get('fd_searched'))} | {s.get('fd_any_method') or '--'} | "
            f"{_r(s.get('fd_any'))} | {nn} | {fixed or '--'} | {_r(s.get('fd_fixed'))} | "
            f"{_r(s.get('fd_ratio'))} | {_r(s.get('fd_any_ratio'))} |"
        )
    return "\n".join(lines)


def moonshot_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown of :func:`moonshot` rows (empty when the run lacks one of the two NFEs)."""
    if not rows:
        return ""
    lines = [
        "| task | ours (best) | NFE | rel_error | diffusers (best) | NFE | rel_error | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        lines.append(
            f"| {m['task']} | {m['ours_method'] or '--'} | {m['ours_nfe']} | "
            f"{fmt(m['ours_rel_error'])} | {m['diffusers_method'] or '--'} | "
            f"{m['diffusers_nfe']} | {fmt(m['diffusers_rel_error'])} | {_r(m['ratio'])} |"
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
