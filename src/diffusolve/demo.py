"""``diffusolve demo``: the main job.

1. On the bundled class-conditional digits model: samples per class at NFE 5/10/20 with
   three solvers (PNG panels) and FD-digits per solver at NFE 10.
2. Restoration on held-out digits (the unconditional model as prior): box inpainting and
   4x super-resolution with three posterior samplers, one PNG panel and PSNR per method.
3. Inversion of held-out digits under guidance: reversed DDIM against the exact schemes
   (EDICT, BDIA, O-BELM, direct inversion), round-trip errors, and a regeneration under
   another class along the exact path.
4. Editing with the caption model: threes into eights, thin digits into thick ones.
5. Guidance and composition on the bundled model: one digit per class under every
   guidance method (classifier-free and its variants, classifier, EluCD, loss guidance),
   judged by an independent classifier; "3 OR 8" and "3 AND 8" by SuperDiff.
6. Few-step models distilled or fine-tuned from the bundled model (LCM, LCM-LoRA, MMD,
   LCM + MMD):
   one digit per class at 1, 2 and 4 network evaluations next to the teacher at 3 and 10,
   with FD-digits per model at NFE 2.
7. On an exact reference (a Gaussian mixture whose probability-flow ODE is solved to
   1e-10): the error of each solver against the exact endpoint as NFE grows, and a plot.

Everything lands in one folder with a ``report.md`` that embeds the panels and tables. An
earlier report in that folder is kept unless ``force``. One line per stage goes to stderr,
so a run without a terminal (``make demo`` in a log) shows where it is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "markdown_table", "OUTPUTS"]

#: the files the demo writes in its folder (checked before it starts)
OUTPUTS = (
    "report.md",
    "digits_*_nfe*.png",
    "restoration.png",
    "inversion.png",
    "edit.png",
    "guidance.png",
    "compose.png",
    "fewstep.png",
    "exact_reference.png",
)


def _stage(message: str, t0: float) -> None:
    print(f"[demo {time.time() - t0:5.0f} s] {message}", file=sys.stderr, flush=True)


DEMO_SOLVERS = ("ddim", "dpmpp_2m", "unipc_bh2_2")
DEMO_NFES = (5, 10, 20)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _available(names: tuple[str, ...]) -> list[str]:
    from .solvers import list_solvers

    have = set(list_solvers())
    return [n for n in names if n in have]


def _digits_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Samples per class and FD-digits on the bundled model. Returns (markdown, printed tables)."""
    from .images import save_grid
    from .loading import load
    from .models import fd_digits, fd_digits_noise_floor
    from .process import make_grid
    from .solvers import get_solver, sample, steps_for_nfe

    model = load("digits", guidance=2.0)
    proc = model.process
    per_class = 4 if quick else 8
    labels = torch.arange(10).repeat_interleave(per_class)
    solvers = _available(DEMO_SOLVERS)
    md = ["## Bundled digits model (classifier-free guidance 2.0)", ""]
    md.append(
        "Rows are classes 0-9; each panel uses the same per-sample seeds, so columns are "
        "comparable across solvers and NFE."
    )
    panel_rows = []
    for name in solvers:
        _stage(f"digits panels, {name}, NFE {'/'.join(map(str, DEMO_NFES))}", t0)
        solver = get_solver(name)
        cells = [name]
        for nfe in DEMO_NFES:
            grid = make_grid(proc, steps_for_nfe(solver, nfe), solver.natural_grid)
            xT = proc.prior_sample((labels.numel(), 1, 16, 16), noise=_seeded(labels.numel()))
            with torch.no_grad():
                x = sample(model, xT, grid, solver, cond=labels, progress=progress)
            png = save_grid(x, out / f"digits_{name}_nfe{nfe}.png", nrow=per_class, scale=3)
            cells.append(f"![{name} NFE {nfe}]({png.name})")
        panel_rows.append(cells)
    md += ["", markdown_table(["solver"] + [f"NFE {n}" for n in DEMO_NFES], panel_rows), ""]

    # FD-digits on the plain conditional model (no guidance), as on the model card: guidance
    # trades diversity for class fidelity and raises FD
    plain = load("digits")
    n_fd = 300 if quick else 1000
    fd_rows = []
    fd_labels = torch.arange(n_fd) % 10
    for name in solvers:
        _stage(f"FD-digits, {name}, {n_fd} samples at NFE 10", t0)
        solver = get_solver(name)
        grid = make_grid(proc, steps_for_nfe(solver, 10), solver.natural_grid)
        t1 = time.time()
        xs = []
        for chunk in torch.split(torch.arange(n_fd), 500):
            xT = proc.prior_sample(
                (chunk.numel(), 1, 16, 16), noise=_seeded(chunk.numel(), 10_000 + int(chunk[0]))
            )
            with torch.no_grad():
                xs.append(sample(plain, xT, grid, solver, cond=fd_labels[chunk], progress=progress))
        fd = fd_digits(torch.cat(xs))
        fd_rows.append([name, 10, n_fd, float(fd), round(time.time() - t1, 1)])
    fd_md = markdown_table(["solver", "NFE", "samples", "FD-digits", "seconds"], fd_rows)
    _stage(f"FD-digits noise floor ({n_fd} real digits)", t0)
    floor = fd_digits_noise_floor(n_fd)
    md += [
        "### FD-digits at NFE 10 (conditional, no guidance; held-out split as reference)",
        "",
        fd_md,
        "",
        f"Noise floor: FD-digits between two real digit sets of {n_fd} images is {floor:.3g}; "
        "the model card gives the 50-step figure.",
        "",
    ]
    fd_md += f"\n\nFD-digits noise floor at {n_fd} samples (real vs real): {floor:.3g}"
    return "\n".join(md), [fd_md]


def _seeded(n: int, start: int = 0) -> list[int]:
    """Per-sample seeds ``start .. start + n - 1``."""
    return list(range(start, start + n))


#: restoration panel: its tasks, and the samplers in order of preference (the first three
#: that are registered and run every task are shown)
DEMO_RESTORE_TASKS = ("inpaint-box", "sr4")
DEMO_RESTORE_METHODS = ("pigdm", "ddrm", "dps", "ddnm_plus", "diffpir", "ddnm")
#: held-out digits of these classes, in this order (the first 2 in --quick)
DEMO_RESTORE_CLASSES = (3, 5, 8, 2)
#: sampler steps (quick, full)
DEMO_RESTORE_STEPS = (20, 50)


def _restoration_methods(operators: list) -> list[str]:
    from .inverse.samplers import SAMPLERS, get_sampler

    names = []
    for name in DEMO_RESTORE_METHODS:
        if name not in SAMPLERS:
            continue
        try:
            for op in operators:
                get_sampler(name).check(op)
        except NotImplementedError:
            continue
        names.append(name)
    return names[:3]


def _restoration_section(
    out: Path, quick: bool, progress: bool, t0: float
) -> tuple[str, list[str]]:
    """Posterior samplers on held-out digits: one panel and a PSNR table."""
    from .images import save_grid
    from .inverse.noise import GaussianNoise
    from .inverse.samplers import get_sampler
    from .inverse.tasks import IMAGE_TASKS, make_task
    from .loading import load
    from .models.data import load_digits
    from .restore_cli import measurement_image, psnr

    model = load("digits")  # cond=None: the null class, an unconditional prior
    classes = DEMO_RESTORE_CLASSES[: 2 if quick else 4]
    steps = DEMO_RESTORE_STEPS[0 if quick else 1]
    sigma_y = 0.05
    images, labels = load_digits("heldout")
    first = [int(torch.nonzero(labels == c)[0]) for c in classes]
    x = images[first]
    n = x.shape[0]
    operators = [make_task(task, tuple(x.shape[1:])) for task in DEMO_RESTORE_TASKS]
    methods = _restoration_methods(operators)
    rows, columns = [], []
    for task, op in zip(DEMO_RESTORE_TASKS, operators, strict=True):
        _stage(f"restoration, {task}: {', '.join(methods)}, {n} digits, {steps} steps", t0)
        # measurement noise from seeds 0.., sampler noise from seeds 100.. (never the same)
        y = GaussianNoise(sigma_y).sample(op(x.to(torch.float64)), generator=0)
        shown, what = measurement_image(op, y)
        rows.append([task, f"measurement ({what})", "-", float(psnr(shown, x).mean()), "-"])
        columns.append(shown.to(x.dtype))
        for name in methods:
            t1 = time.time()
            with torch.no_grad():
                r = get_sampler(name).run(
                    model, op, y.to(x.dtype), sigma_y, steps=steps, noise=100, progress=progress
                )
            rows.append([task, name, steps, float(psnr(r, x).mean()), round(time.time() - t1, 1)])
            columns.append(r)
    columns.append(x)
    panel = torch.stack(columns, 1).flatten(0, 1)  # a row per digit
    save_grid(panel, out / "restoration.png", nrow=len(columns), scale=3)
    table = markdown_table(["task", "method", "steps", "PSNR (dB)", "seconds"], rows)
    described = "; ".join(f"{t}: {IMAGE_TASKS[t][0]}" for t in DEMO_RESTORE_TASKS)
    md = [
        "## Restoration: posterior sampling with the digits model as prior",
        "",
        f"{n} held-out digits, measured with Gaussian noise of std {sigma_y} (images in "
        f"[-1, 1]) by each task ({described}). A row per digit; columns: for "
        f"{' then '.join(DEMO_RESTORE_TASKS)}, the measurement shown as an image "
        "(the pseudo-inverse A^+ y: hidden pixels grey, 4x4 blocks) and "
        f"{', '.join(methods)} ({steps} steps each, the unconditional model as prior, "
        "default options); last, the ground truth. PSNR is the mean over the digits; "
        "`diffusolve restore` runs the same on your own image.",
        "",
        "![restoration panel](restoration.png)",
        "",
        table,
        "",
    ]
    return "\n".join(md), [table]


#: inversion panel: methods (reversed DDIM first, as the baseline), guidance, steps
DEMO_INVERT_METHODS = ("ddim", "edict", "bdia", "belm", "direct")
DEMO_INVERT_SCALE = 3.0
DEMO_INVERT_STEPS = (10, 20)
#: class each demo digit is regenerated as, along the exact path (an edit by class)
DEMO_INVERT_TARGET = {3: 8, 5: 6, 8: 3, 2: 7}
#: the edit column: this inversion to half the noise range, regenerated under the other
#: class (from full noise every scheme's regeneration under another class is blotchy, and
#: BDIA's speckles; from t_max / 2 direct inversion gives the cleanest digits)
DEMO_INVERT_EDIT = "direct"
DEMO_INVERT_STRENGTH = 0.5


def _inversion_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Round trips of held-out digits under guidance: reversed DDIM against exact schemes,
    and each digit regenerated as another class from its exact inversion."""
    from .images import save_grid
    from .inversion import invert, reconstruct
    from .loading import load
    from .models.data import load_digits

    model = load("digits", guidance=DEMO_INVERT_SCALE)  # float32 network
    classes = DEMO_RESTORE_CLASSES[: 2 if quick else 4]
    steps = DEMO_INVERT_STEPS[0 if quick else 1]
    images, labels = load_digits("heldout")
    first = [int(torch.nonzero(labels == c)[0]) for c in classes]
    x = images[first].to(torch.float64)  # float64 latents, float32 network
    cond = torch.tensor(classes)
    target = torch.tensor([DEMO_INVERT_TARGET[c] for c in classes])
    _stage(f"inversion: {', '.join(DEMO_INVERT_METHODS)} at guidance 3, {steps} steps", t0)
    rows, columns = [], [x]
    for name in DEMO_INVERT_METHODS:
        t1 = time.time()
        inv = invert(model, x, steps, name, cond=cond, progress=progress)
        with torch.no_grad():
            rec = reconstruct(model, inv)
        err = ((rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()
        rows.append([name, inv.nfe, f"{float(err):.1e}", round(time.time() - t1, 1)])
        columns.append(rec.to(torch.float32))
    t_start = DEMO_INVERT_STRENGTH * model.process.t_max
    half = invert(model, x, steps, DEMO_INVERT_EDIT, cond=cond, t_start=t_start)
    with torch.no_grad():
        columns.append(reconstruct(model, half, cond=target).to(torch.float32))
    panel = torch.stack([c.to(torch.float32) for c in columns], 1).flatten(0, 1)
    save_grid(panel, out / "inversion.png", nrow=len(columns), scale=3)
    table = markdown_table(
        ["method", "inversion NFE", "max relative round-trip error", "seconds"], rows
    )
    pairs = ", ".join(f"{c} -> {DEMO_INVERT_TARGET[c]}" for c in classes)
    md = [
        "## Inversion: round trips under classifier-free guidance",
        "",
        f"{len(classes)} held-out digits inverted under their class at guidance "
        f"{DEMO_INVERT_SCALE:g} ({steps} steps; the float32 network drives float64 latents) "
        "and regenerated. A row per digit; columns: the input, then each method's "
        f"reconstruction ({', '.join(DEMO_INVERT_METHODS)}), then an edit: the "
        f"{DEMO_INVERT_EDIT} inversion to half the noise range regenerated under another "
        f"class ({pairs}). Reversed DDIM drifts; the exact "
        "schemes return the input to rounding error. `diffusolve invert` / `reconstruct` "
        "do the same on your own image.",
        "",
        "![inversion panel](inversion.png)",
        "",
        table,
        "",
    ]
    return "\n".join(md), [table]


#: edit panel: methods on the caption model, digits per edit (quick, full), steps
DEMO_EDIT_METHODS = ("direct", "p2p")
DEMO_EDIT_N = (2, 4)
DEMO_EDIT_STEPS = (20, 50)


def _edit_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Caption edits on held-out digits with the digits-tokens model: a three into an eight
    keeping its other words, and a thin digit made thick keeping its class."""
    from .bench.inversion import edit_conds, edit_data, edit_scores
    from .edit import edit
    from .images import save_grid
    from .models import load

    model = load("digits-tokens")
    n = DEMO_EDIT_N[0 if quick else 1]
    steps = DEMO_EDIT_STEPS[0 if quick else 1]
    rows, blocks = [], []
    for task, what in (("3to8", "three -> eight"), ("thin2thick", "thin -> thick")):
        images, labels = edit_data(task, n)
        source, target, target_class, target_thick = edit_conds(
            task, "digits-tokens", images, labels
        )
        _stage(f"editing, {what}: {', '.join(DEMO_EDIT_METHODS)}, {n} digits", t0)
        cols = [images]
        for name in DEMO_EDIT_METHODS:
            t1 = time.time()
            edited = edit(model, images, source=source, target=target, method=name, steps=steps)
            sc = edit_scores(edited, images, labels, target_class, target_thick)
            kept = sc.get("attributes_kept", sc.get("class_kept"))
            rows.append(
                [
                    what,
                    name,
                    f"{sc['target_accuracy']:.2f}",
                    f"{kept:.2f}",
                    f"{sc['psnr_outside']:.1f}",
                    round(time.time() - t1, 1),
                ]
            )
            cols.append(edited.detach().to(torch.float32).clamp(-1, 1))
        blocks.append(torch.stack(cols, 1).flatten(0, 1))
    save_grid(torch.cat(blocks), out / "edit.png", nrow=1 + len(DEMO_EDIT_METHODS), scale=3)
    table = markdown_table(
        ["edit", "method", "target reached", "kept", "PSNR outside (dB)", "seconds"], rows
    )
    md = [
        "## Editing: captions on held-out digits",
        "",
        f"The caption model (`digits-tokens`) edits {n} held-out threes into eights (the "
        f"other caption words unchanged) and {n} thin digits into thick ones, {steps} steps. "
        "A row per digit; columns: the source, then "
        f"{' and '.join(DEMO_EDIT_METHODS)}. 'target reached': the bundled classifier says "
        "eight / the measured thickness is in the thick tercile; 'kept': the other "
        "attributes' terciles (three -> eight) or the class (thin -> thick); PSNR to the "
        "source outside its ink box. `diffusolve edit` runs the same on your own image.",
        "",
        "![edit panel](edit.png)",
        "",
        table,
        "",
    ]
    return "\n".join(md), [table]


#: guidance panel: (label, method, scale) at the same solver, steps and starts
DEMO_GUIDANCE = (
    ("conditional", "cfg", 1.0),
    ("CFG 3", "cfg", 3.0),
    ("CFG++ 0.6", "cfg++", 0.6),
    ("interval CFG 3", "interval-cfg", 3.0),
    ("rescaled CFG 3", "rescaled-cfg", 3.0),
    ("classifier 1", "classifier", 1.0),
    ("EluCD 0.3", "elucd", 0.3),
    ("loss 4", "loss", 4.0),
)
DEMO_GUIDANCE_STEPS = 10
#: SuperDiff's reverse SDE needs many small steps (25 left visible noise in the digits)
DEMO_COMPOSE_STEPS = 100


def _guidance_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Every guidance method on the same starts (one digit per class), judged by the
    independent classifier; SuperDiff OR / AND of labels 3 and 8."""
    from .bench.guidance_digits import guided as guided_model
    from .compose import superdiff_sample
    from .images import save_grid
    from .models import load, load_classifier
    from .models.clean_classifier import load_judge_classifier
    from .process import make_grid
    from .solvers import sample

    model = load("digits")
    proc = model.process
    grid = make_grid(proc, DEMO_GUIDANCE_STEPS, "time_uniform")
    per_class = 1 if quick else 3
    labels = torch.arange(10).repeat(per_class)
    judge = load_judge_classifier()
    xT = proc.prior_sample((labels.numel(), 1, 16, 16), noise=_seeded(labels.numel(), 20_000))
    columns, rows = [], []
    for title, method, scale in DEMO_GUIDANCE:
        _stage(f"guidance: {title}", t0)
        t1 = time.time()
        guided = guided_model(model, method, scale, grid)
        stats: dict = {}
        with torch.no_grad():
            x = sample(guided, xT, grid, "ddim", cond=labels, stats=stats, progress=False)
        with torch.no_grad():
            acc = float((judge(x.float()).argmax(1) == labels).double().mean())
        columns.append(x[:10].float())
        rows.append([title, stats["nfe"], f"{100 * acc:.0f} %", round(time.time() - t1, 1)])
    panel = torch.stack(columns, 1).flatten(0, 1)  # a row per class
    save_grid(panel, out / "guidance.png", nrow=len(columns), scale=3)
    table = markdown_table(["method", "NFE", "judge accuracy", "seconds"], rows)

    steps = DEMO_COMPOSE_STEPS
    n = 8
    clf = load_classifier()
    comp_rows, comp_cols = [], []
    for mode, title in (("or", "3 OR 8"), ("and", "3 AND 8")):
        _stage(f"composition: {title} (SuperDiff, {steps} steps)", t0)
        x = proc.prior_sample((n, 1, 16, 16), noise=_seeded(n, 30_000))
        with torch.no_grad():
            y, _ = superdiff_sample(
                model,
                x,
                steps,
                mode,
                cond=[3, 8],
                noise=_seeded(n, 31_000),
                grid_kind="time_uniform",
            )
            prob = torch.softmax(clf(y.float(), proc.t_min), -1).double()
        top = prob.argmax(1)
        comp_cols.append(y.float())
        comp_rows.append(
            [
                title,
                f"{float(((top == 3) | (top == 8)).double().mean()):.2f}",
                f"{float((top == 3).double().mean()):.2f}",
                f"{float(torch.minimum(prob[:, 3], prob[:, 8]).mean()):.3f}",
            ]
        )
    save_grid(torch.cat(comp_cols), out / "compose.png", nrow=n, scale=3)
    comp = markdown_table(
        ["composition", "classified 3 or 8", "classified 3", "mean min(p3, p8)"], comp_rows
    )
    names = ", ".join(t for t, _, _ in DEMO_GUIDANCE)
    md = [
        "## Guidance and composition",
        "",
        f"One digit per class (rows 0-9) from the same starts under each guidance method "
        f"(columns: {names}); DDIM, {DEMO_GUIDANCE_STEPS} steps. Accuracy is measured by "
        "an independent clean classifier that no method uses"
        f"{'' if quick else f' ({per_class} digits per class)'}. "
        "`diffusolve bench guidance` measures FD-digits against accuracy over each "
        "method's scale.",
        "",
        "![guidance panel](guidance.png)",
        "",
        table,
        "",
        f"SuperDiff superposition of the labels 3 and 8 ({steps} reverse-SDE steps, the "
        "network called once per step on the stacked labels): top row OR, bottom row AND, "
        "judged by the bundled classifier.",
        "",
        "![composition panel](compose.png)",
        "",
        comp,
        "",
    ]
    return "\n".join(md), [table, comp]


#: few-step panel: the teacher's solver and NFEs shown next to the few-step models
DEMO_TEACHER = ("dpmpp_2m", (3, 10))  # 3: its smallest NFE with the final denoise


def _teacher_samples(model, labels: torch.Tensor, nfe: int, seed: int, progress: bool):
    """The teacher (``DEMO_TEACHER`` solver) at ``nfe`` evaluations, the final denoise
    included, per-sample seeds ``seed + i``."""
    from .process import make_grid
    from .solvers import get_solver, sample, steps_for_nfe

    solver = get_solver(DEMO_TEACHER[0])
    proc = model.process
    grid = make_grid(proc, steps_for_nfe(solver, nfe), solver.natural_grid)
    xs = []
    for chunk in torch.split(torch.arange(labels.numel()), 500):
        xT = proc.prior_sample(
            (chunk.numel(), 1, 16, 16), noise=_seeded(chunk.numel(), seed + int(chunk[0]))
        )
        with torch.no_grad():
            xs.append(sample(model, xT, grid, solver, cond=labels[chunk], progress=progress))
    return torch.cat(xs)


def _fewstep_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Few-step models at 1, 2 and 4 evaluations against the teacher at 3 and 10: a panel
    (one digit per class) and FD-digits at NFE 2 (conditional, no guidance)."""
    from .images import save_grid
    from .models import fd_digits, fd_digits_noise_floor, load
    from .models.fewstep import FEWSTEP_MODELS, fewstep_recipe, sample_fewstep

    teacher = load("digits")
    labels = torch.arange(10)
    n_fd = 200 if quick else 1000
    fd_labels = torch.arange(n_fd) % 10
    columns, titles, rows, missing = [], [], [], []
    solver, nfes = DEMO_TEACHER
    for nfe in nfes:
        _stage(f"few-step panel: teacher {solver} at NFE {nfe}", t0)
        columns.append(_teacher_samples(teacher, labels, nfe, 40_000, False))
        titles.append(f"teacher {solver} NFE {nfe}")
        t1 = time.time()
        fd = fd_digits(_teacher_samples(teacher, fd_labels, nfe, 50_000, progress))
        rows.append(
            [f"digits (teacher, {solver})", nfe, n_fd, float(fd), round(time.time() - t1, 1)]
        )
    for name in FEWSTEP_MODELS:
        try:
            recipe = fewstep_recipe(name)
            model = load(name)
        except (FileNotFoundError, ImportError) as err:  # not trained here, or no peft
            missing.append(f"- `{name}`: not shown ({err})")
            continue
        _stage(f"few-step panel: {name} ({recipe.solver}) at 1, 2 and 4 evaluations", t0)
        for steps in (1, 2, 4):
            columns.append(sample_fewstep(model, 10, steps, labels, seed=40_000, recipe=recipe))
            titles.append(f"{name} NFE {recipe.nfe(steps)}")
        t1 = time.time()
        x = sample_fewstep(model, n_fd, 2, fd_labels, seed=50_000, recipe=recipe)
        rows.append([name, recipe.nfe(2), n_fd, float(fd_digits(x)), round(time.time() - t1, 1)])
    panel = torch.stack([c.float() for c in columns], 1).flatten(0, 1)  # a row per class
    save_grid(panel, out / "fewstep.png", nrow=len(columns), scale=3)
    _stage(f"FD-digits noise floor ({n_fd} real digits)", t0)
    floor = fd_digits_noise_floor(n_fd)
    table = markdown_table(["model", "NFE", "samples", "FD-digits", "seconds"], rows)
    md = [
        "## Few-step models",
        "",
        "One digit per class (rows 0-9) from each model, columns: "
        + ", ".join(titles)
        + ". The few-step models are trained from the bundled model by `diffusolve train "
        "digits-lcm` (consistency distillation, full and as a LoRA) and `diffusolve train "
        "digits-mmd` (MMD fine-tuning for two evaluations, of the teacher or, with `--init "
        "digits-lcm`, of the LCM model: `digits-lcm-mmd`); their model cards give the "
        "recipes and `diffusolve bench accel` the full comparison.",
        "",
        "![few-step panel](fewstep.png)",
        "",
        table,
        "",
        f"Noise floor: FD-digits between two real digit sets of {n_fd} images is {floor:.3g}.",
        "",
        *missing,
        "",
    ]
    return "\n".join(md), [table + f"\n\nFD-digits noise floor at {n_fd} samples: {floor:.3g}"]


def _exact_section(out: Path, quick: bool, progress: bool, t0: float) -> tuple[str, list[str]]:
    """Error against the exact probability-flow endpoint of a Gaussian mixture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import rel_error
    from .models.analytic import GaussianMixture
    from .process import ddpm, make_grid
    from .solvers import get_solver, sample, steps_for_nfe

    proc = ddpm("linear")
    gmm = GaussianMixture.random(2, 25, process=proc, seed=0)
    n = 256 if quick else 1000
    xT = proc.prior_sample((n, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    _stage(f"exact reference: Gaussian mixture PF-ODE endpoint of {n} samples (DOP853)", t0)
    ref = gmm.reference(xT, proc.t_max, proc.t_min, final="denoise")
    names = _available(
        ("ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "deis_tab3", "ipndm")
    )
    nfes = (5, 10, 20, 50)
    rows, curves = [], {}
    _stage(f"exact reference: {len(names)} solvers at NFE {'/'.join(map(str, nfes))}", t0)
    for name in names:
        solver = get_solver(name)
        errs = []
        for nfe in nfes:
            try:
                grid = make_grid(proc, steps_for_nfe(solver, nfe), solver.natural_grid)
            except ValueError:
                errs.append(float("nan"))
                continue
            x = sample(gmm, xT, grid, solver, progress=False)
            errs.append(float(rel_error(x, ref)))
        rows.append([name] + errs)
        curves[name] = errs
    table = markdown_table(["solver"] + [f"NFE {k}" for k in nfes], rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, errs in curves.items():
        ax[0].loglog(nfes, errs, marker="o", label=name)
    ax[0].set_xticks(list(nfes))
    ax[0].set_xticklabels([str(k) for k in nfes])
    ax[0].minorticks_off()
    ax[0].set_xlabel("NFE")
    ax[0].set_ylabel("relative error vs exact PF-ODE endpoint")
    ax[0].legend(fontsize=7)
    ax[0].grid(True, which="both", alpha=0.3)
    data = gmm.sample(2000, torch.Generator().manual_seed(1))
    ax[1].scatter(data[:, 0], data[:, 1], s=2, alpha=0.3, label="exact data samples")
    best = min(curves, key=lambda k: curves[k][1] if curves[k][1] == curves[k][1] else 1e9)
    grid = make_grid(proc, steps_for_nfe(best, 10), get_solver(best).natural_grid)
    xs = sample(gmm, xT, grid, best, progress=False)
    ax[1].scatter(xs[:, 0], xs[:, 1], s=2, alpha=0.5, label=f"{best}, NFE 10")
    ax[1].legend(fontsize=7)
    ax[1].set_title("25-component Gaussian mixture (DDPM linear process)")
    fig.tight_layout()
    fig.savefig(out / "exact_reference.png", dpi=110)
    plt.close(fig)
    md = [
        "## Exact reference: 25-component Gaussian mixture in 2-D",
        "",
        "Every solver starts from the same noise at t_max; the reference is the exact "
        "probability-flow endpoint (DOP853, float64, rtol 1e-10) followed by the exact "
        f"denoiser at t_min. Mean relative error over {n} samples:",
        "",
        table,
        "",
        "![error vs NFE](exact_reference.png)",
        "",
    ]
    return "\n".join(md), [table]


def run_demo(
    out: str | Path = "diffusolve-demo",
    quick: bool = False,
    progress: bool = True,
    force: bool = False,
) -> int:
    """Run the demo and write ``out/report.md``; returns an exit code.

    Refuses (``FileExistsError``, before any work) when ``out`` already holds a report or
    panels, unless ``force``."""
    from ._paths import check_dir_out

    out = check_dir_out(out, files=OUTPUTS, force=force)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    _stage(f"writing to {out}/ ({'quick' if quick else 'full'} run)", t0)
    parts, printed = ["# diffusolve demo", ""], []
    sections = (
        _digits_section,
        _restoration_section,
        _inversion_section,
        _edit_section,
        _guidance_section,
        _fewstep_section,
        _exact_section,
    )
    for section in sections:
        md, tables = section(out, quick, progress, t0)
        parts.append(md)
        printed += tables
    parts.append(f"_Total time: {time.time() - t0:.0f} s on {torch.get_num_threads()} threads._")
    report = out / "report.md"
    report.write_text("\n".join(parts) + "\n")
    for tab in printed:
        print(tab, end="\n\n")
    print(
        f"Wrote {report} and {len(list(out.glob('*.png')))} PNG panels in {out}/ ({time.time() - t0:.0f} s)."
    )
    return 0
