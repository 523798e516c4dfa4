"""``diffusolve invert`` / ``reconstruct`` and ``bench inversion``: files, round trips,
refusals, and a tiny resumable bench run. Few steps: these check the commands; the
inverters' own tests check the mathematics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusolve.bench import inversion as binv
from diffusolve.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    """A held-out digit (label 1) as a 16x16 PNG and the [-1, 1] image the command reads."""
    from diffusolve.models.data import load_digits

    x, y = load_digits("heldout")
    arr = ((x[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("input") / "digit.png"
    Image.fromarray(arr, "L").save(path)
    return path, int(y[0])


def test_invert_then_reconstruct_is_exact_and_refuses_overwrite(tmp_path, capsys, digit):
    lat = tmp_path / "lat.safetensors"
    argv = ["invert", "--image", str(digit[0]), "--label", str(digit[1]), "--method", "bdia"]
    argv += ["--steps", "4", "--out", str(lat), "--no-progress"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "bdia inversion, 4 steps" in line
    err = float(line.rsplit("error", 1)[1])
    assert err < 1e-12  # float64 by default: an exact scheme is exact
    before = lat.read_bytes()
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert lat.read_bytes() == before

    rec = tmp_path / "rec.png"
    assert main(["reconstruct", "--inversion", str(lat), "--out", str(rec), "--scale", "1"]) == 0
    assert np.array_equal(np.asarray(Image.open(rec)), np.asarray(Image.open(digit[0])))
    other = tmp_path / "other.png"
    argv = ["reconstruct", "--inversion", str(lat), "--label", "8", "--out", str(other)]
    assert main(argv + ["--scale", "1"]) == 0  # another class: an edit along the exact path
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(rec)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "11"], "labels must be in"),
        (["--prompt", "thin three"], "--prompt needs a token-conditioned model"),
        (["--method", "ddpm"], "stochastic"),
        (["--method", "nope"], "unknown inversion method"),
        (["--steps", "0"], "--steps"),
        (["--out", "x.png"], ".safetensors"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, digit, extra, message):
    argv = ["invert", "--image", str(digit[0]), "--steps", "2", "--no-progress"]
    argv += ["--out", str(tmp_path / "l.safetensors")]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_invert_list_names_every_inverter(capsys):
    from diffusolve.inversion import list_inverters

    assert main(["invert", "--list"]) == 0
    text = capsys.readouterr().out
    for name in list_inverters():
        assert name in text


def test_bench_inversion_tiny_run_resumes(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["bench", "inversion", "--methods", "edict,ddim", "--tasks", "gmm-d64"]
    argv += ["--cfg", "1,3", "--steps", "3", "--dtypes", "float64", "--n-gmm", "4"]
    argv += ["--out", str(out), "--no-progress", "--edit-tasks", "none"]
    assert main(argv) == 0
    text = (out / "inversion.md").read_text()
    assert "edict" in text and "diffusers DDIMInverseScheduler" in text
    lines = (out / "inversion.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    assert len(recs) == 6  # 2 scales x (2 methods + diffusers)
    for r in recs:
        assert {"library", "method", "task", "nfe", "cfg", "dtype", "recon_error"} <= set(r)
        assert {"seconds", "nfe_used"} <= set(r)
    edict = [r for r in recs if r["method"] == "edict"]
    assert all(r["recon_error"] < 1e-10 for r in edict)
    assert all(r["nfe_used"] == 2 * 2 * 3 for r in edict)  # 2 evaluations a step, both ways
    assert main(argv) == 2  # the report exists: --resume or --force
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert len((out / "inversion.jsonl").read_text().splitlines()) == len(lines)


def test_diffusers_ddim_round_trip_matches_our_reversed_ddim_in_kind():
    """Both first-order DDIM inversions: errors of the same order, shrinking with steps."""
    errs = {}
    for steps in (5, 20):
        out = binv.run_inversion(
            methods=["ddim"],
            tasks=["gmm-d64"],
            cfgs=[1.0],
            steps=[steps],
            dtypes=["float64"],
            n_gmm=16,
            edit_tasks=[],
            progress=False,
        )
        errs[steps] = {r["library"]: r["recon_error"] for r in out["records"]}
    for lib in ("diffusolve", "diffusers"):
        assert errs[20][lib] < errs[5][lib]
    ratio = errs[20]["diffusolve"] / errs[20]["diffusers"]
    assert 0.1 < ratio < 10


def test_mixed_precision_keeps_exact_schemes_exact():
    """A float32 network driving float64 latents: EDICT's round trip at float64 level."""
    out = binv.run_inversion(
        methods=["edict"],
        tasks=["digits"],
        cfgs=[3.0],
        steps=[3],
        dtypes=["mixed"],
        n_digits=2,
        diffusers=False,
        edit_tasks=[],
        progress=False,
    )
    (rec,) = out["records"]
    assert rec["dtype"] == "mixed" and rec["recon_error"] < 1e-11
    assert torch.float32 == binv.DTYPES["mixed"][0]


def test_demo_inversion_panel(tmp_path, monkeypatch):
    """The demo's inversion section alone, cut to one digit and 3 steps: the exact schemes
    return the input to rounding error, reversed DDIM does not."""
    import time

    from diffusolve import demo

    monkeypatch.setattr(demo, "DEMO_RESTORE_CLASSES", (3,))
    monkeypatch.setattr(demo, "DEMO_INVERT_STEPS", (3, 3))
    md, tables = demo._inversion_section(tmp_path, True, False, time.time())
    assert "![inversion panel](inversion.png)" in md
    rows = {line.split("|")[1].strip(): line.split("|") for line in tables[0].splitlines()[2:]}
    assert set(rows) == set(demo.DEMO_INVERT_METHODS)
    for name in ("edict", "bdia", "belm", "direct"):
        assert float(rows[name][3]) < 1e-10, rows[name]
    assert float(rows["ddim"][3]) > 1e-3
    columns = 1 + len(demo.DEMO_INVERT_METHODS) + 1  # input, reconstructions, edit
    assert Image.open(tmp_path / "inversion.png").size == (3 * (columns * 17 + 1), 3 * 18)


def test_bench_edit_phase_scores_and_panel(tmp_path):
    """The editing phase: records with target accuracy and preservation, and an edit panel."""
    out = binv.run_inversion(
        methods=["edict"],
        tasks=[],
        edit_tasks=["3to8", "thin2thick"],
        edit_models=["digits-tokens", "digits"],
        edit_methods=["direct"],
        n_edit=2,
        edit_steps=5,
        progress=False,
    )
    recs = {r["task"]: r for r in out["edits"]}
    # the label model has no thickness condition: that pair is not run
    assert set(recs) == {
        "edit-3to8-digits-tokens",
        "edit-3to8-digits",
        "edit-thin2thick-digits-tokens",
    }
    for task in ("edit-3to8-digits-tokens", "edit-3to8-digits", "edit-thin2thick-digits-tokens"):
        r = recs[task]
        assert 0 <= r["target_accuracy"] <= 1 and r["n"] == 2
        assert r["psnr_outside"] > 10 and r["feature_distance"] >= 0
    assert "attributes_kept" in recs["edit-3to8-digits"]
    assert "class_kept" in recs["edit-thin2thick-digits-tokens"]
    paths = binv.plot_results(out, tmp_path)
    assert (tmp_path / "edit_3to8_digits-tokens.png") in paths
    assert "Editing on held-out digits" in binv.markdown_report(out)


def test_edit_scores_on_known_images():
    """The scores themselves: an unchanged source keeps everything and scores no target
    unless it already is one; the outside mask excludes the digit's box."""
    from diffusolve.models.data import load_digits

    x, y = load_digits("heldout")
    threes = x[y == 3][:4]
    labels = torch.full((4,), 3)
    s = binv.edit_scores(threes, threes, labels, 8, None)
    assert s["target_accuracy"] == 0.0
    assert s["psnr_outside"] > 100 and s["feature_distance"] == 0.0
    # words are relative to the class: the same image scored as itself keeps every tercile
    s3 = binv.edit_scores(threes, threes, labels, 3, None)
    assert s3["target_accuracy"] == 1.0 and s3["attributes_kept"] == 1.0
    mask = binv._outside_mask(threes)
    ink = (threes + 1) / 2 > binv.INK_LEVEL
    assert not bool((mask & ink).any())


def test_null_text_on_the_caption_model_beats_ddim_inversion():
    """diffusolve.load("digits-tokens", guidance=w) guides the network on embedded tokens:
    null-text inversion optimises that float null embedding with captions as conditions."""
    import diffusolve
    from diffusolve.inversion import invert, reconstruct
    from diffusolve.models.attributes import captions
    from diffusolve.models.data import load_digits

    model = diffusolve.load("digits-tokens", guidance=7.5)
    x, y = load_digits("heldout")
    x, caps = x[:2], captions(x[:2], y[:2])
    errs = {}
    for method in ("ddim", "null_text", "direct"):
        inv = invert(model, x, 6, method, cond=caps, progress=False)
        with torch.no_grad():
            rec = reconstruct(model, inv)
        errs[method] = float((rec - x).norm() / x.norm())
    assert errs["null_text"] < 0.8 * errs["ddim"], errs
    assert errs["direct"] < 1e-5, errs


def test_edit_command(tmp_path, capsys, digit):
    """diffusolve edit: a caption edit on the token model, a label edit on the class model,
    and the clear refusals (attention method without cross-attention, unknown word)."""
    out = tmp_path / "e.png"
    base = ["edit", "--image", str(digit[0]), "--steps", "3", "--no-progress", "--force"]
    argv = base + ["--model", "digits-tokens", "--source", "one", "--target", "seven"]
    assert main(argv + ["--method", "p2p", "--out", str(out)]) == 0
    assert Image.open(out).size == (16 * 8, 16 * 8)
    assert "p2p edit 'one' -> 'seven'" in capsys.readouterr().out
    argv = base + ["--model", "digits", "--source", "1", "--target", "7", "--out", str(out)]
    assert main(argv + ["--method", "direct"]) == 0
    assert main(argv + ["--method", "p2p"]) == 2
    assert "cross-attention" in capsys.readouterr().err
    argv = base + ["--model", "digits-tokens", "--source", "one", "--target", "purple seven"]
    assert main(argv + ["--out", str(out)]) == 2
    assert "unknown word 'purple'" in capsys.readouterr().err
    argv = base + ["--model", "digits", "--source", "one", "--target", "7", "--out", str(out)]
    assert main(argv) == 2
    assert "must be labels" in capsys.readouterr().err


def test_demo_edit_panel(tmp_path, monkeypatch):
    """The demo's editing section alone, one digit per edit and 4 steps."""
    import time

    from diffusolve import demo

    monkeypatch.setattr(demo, "DEMO_EDIT_N", (1, 1))
    monkeypatch.setattr(demo, "DEMO_EDIT_STEPS", (4, 4))
    md, tables = demo._edit_section(tmp_path, True, False, time.time())
    assert "![edit panel](edit.png)" in md
    lines = tables[0].splitlines()[2:]
    assert len(lines) == 2 * len(demo.DEMO_EDIT_METHODS)
    columns = 1 + len(demo.DEMO_EDIT_METHODS)
    assert Image.open(tmp_path / "edit.png").size == (3 * (columns * 17 + 1), 3 * (2 * 17 + 1))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_exact_schemes_on_the_caption_model_float64(scale):
    """EDICT, BDIA and O-BELM on digits-tokens (a float64 network, captions as conditions):
    round trip to 1e-10 relative at guidance 1 and 3."""
    import diffusolve
    from diffusolve.inversion import invert, reconstruct
    from diffusolve.models.attributes import captions
    from diffusolve.models.data import load_digits

    model = diffusolve.load("digits-tokens", guidance=scale, dtype=torch.float64)
    x, y = load_digits("heldout")
    x, caps = x[:2].double(), captions(x[:2], y[:2])
    for method in ("edict", "bdia", "belm"):
        inv = invert(model, x, 4, method, cond=caps, progress=False)
        with torch.no_grad():
            rec = reconstruct(model, inv)
        err = float((rec - x).norm() / x.norm())
        assert err < 1e-10, (method, err)


def test_classifier_free_on_the_caption_model_takes_captions():
    """classifier_free(caption model, w) guides on embeddings: captions, ids and embeddings
    give the same guided output, equal to diffusolve.load(..., guidance=w)."""
    import diffusolve
    from diffusolve.guidance import classifier_free
    from diffusolve.models import TokenConditioned, load

    model = load("digits-tokens")
    guided = classifier_free(model, 3.0)
    assert isinstance(guided, TokenConditioned)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cap = "thick upright small three"
    with torch.no_grad():
        a = guided(x, 400.0, cap)
        b = guided(x, 400.0, model.tokenizer.encode(cap))
        c = guided(x, 400.0, model.embed(cap, 1))
        d = diffusolve.load("digits-tokens", guidance=3.0)(x, 400.0, cap)
        u, k = model(x, 400.0, None), model(x, 400.0, cap)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    torch.testing.assert_close(a, u + 3.0 * (k - u), rtol=1e-4, atol=1e-5)


def test_invert_with_a_prompt_under_guidance(tmp_path, capsys, digit):
    lat = tmp_path / "l.safetensors"
    argv = ["invert", "--model", "digits-tokens", "--image", str(digit[0]), "--prompt", "one"]
    argv += ["--guidance", "3", "--method", "direct", "--steps", "3", "--out", str(lat)]
    assert main(argv + ["--no-progress"]) == 0
    assert float(capsys.readouterr().out.rsplit("error", 1)[1]) < 1e-12
    out = tmp_path / "r.png"
    assert (
        main(["reconstruct", "--inversion", str(lat), "--prompt", "seven", "--out", str(out)]) == 0
    )
    argv = ["reconstruct", "--inversion", str(lat), "--label", "7", "--out", str(out), "--force"]
    assert main(argv) == 2
    assert "--label needs a class-conditional model" in capsys.readouterr().err


def test_fixed_point_step_never_ends_above_its_ddim_start_residual():
    """Under guidance 3 on an exact class-conditional mixture the fixed-point map does not
    contract everywhere; a step returns each sample's best iterate, so its residual never
    ends above the plain DDIM step's it started from (it did before: the last iterate was
    returned)."""
    from diffusolve.guidance import classifier_free
    from diffusolve.inversion import invert
    from diffusolve.models.analytic import ClassConditionalMixture
    from diffusolve.process import ddpm

    base = ClassConditionalMixture.random(64, 2, 3, process=ddpm(), seed=0)
    model = classifier_free(base, 3.0, null_cond=base.null_cond)
    x = base.sample(16, 1, generator=torch.Generator().manual_seed(1))
    cond = torch.ones(16, dtype=torch.long)
    start = invert(model, x, 10, "fixed_point", cond=cond, max_iter=1, progress=False)
    solved = invert(model, x, 10, "fixed_point", cond=cond, progress=False)
    # the first step starts from the same data, so the two are comparable there
    assert float(solved.aux["residual"][0]) <= float(start.aux["residual"][0])
    assert bool((solved.aux["residual"] < 1e-5).any())


def test_edict_float32_round_trip_keeps_its_state_in_float64():
    """EDICT's two sequences drift apart in float32 and rounding rides on the drift (1e-3
    to 1e-2 on digits); by default the state is float64 (the network stays float32), so a
    float32 round trip is exact to float32 rounding, returned in float32."""
    import diffusolve
    from diffusolve.inversion import invert, reconstruct
    from diffusolve.models.data import load_digits

    model = diffusolve.load("digits", guidance=3.0)
    x, y = load_digits("heldout")
    x, c = x[:2], y[:2]
    errs = {}
    for precision in ("double-double", "float64", "input"):
        inv = invert(model, x, 10, "edict", cond=c, precision=precision, progress=False)
        with torch.no_grad():
            rec = reconstruct(model, inv)
        assert rec.dtype == torch.float32
        errs[precision] = float((rec.double() - x.double()).norm() / x.double().norm())
    assert max(errs["double-double"], errs["float64"]) < 1e-6 < 1e-4 < errs["input"], errs
    assert inv.latent.dtype == torch.float32  # "input": the state is the input's dtype


def test_edict_inversion_file_keeps_the_output_dtype(tmp_path):
    import diffusolve
    from diffusolve.inversion import invert, load_inversion, reconstruct
    from diffusolve.models.data import load_digits

    model = diffusolve.load("digits")
    x, y = load_digits("heldout")
    inv = invert(model, x[:1], 3, "edict", cond=y[:1], progress=False)
    assert inv.latent.dtype == torch.float64
    back = load_inversion(inv.save(tmp_path / "e.safetensors"))
    with torch.no_grad():
        a, b = reconstruct(model, inv), reconstruct(model, back)
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_edit_list_names_every_method_and_its_kind(capsys):
    from diffusolve.edit import list_methods

    assert main(["edit", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in list_methods():
        (line,) = [x for x in lines if x.split()[0] == name]
        assert ("attention" in line) == (name in ("p2p", "uam", "guide_rescale"))


@pytest.mark.parametrize("method", ["bdia", "belm"])
def test_two_state_schemes_keep_float64_states_for_float32_inputs(method):
    """BDIA's and O-BELM's recursions accumulate rounding (pure float32 on the caption model
    at guidance 7.5, 50 steps: 1.3e-5 / 1.1e-5); with a float64 (or the default
    double-float64) state a float32
    round trip returns the float32 input, in float32."""
    import diffusolve
    from diffusolve.inversion import invert, reconstruct
    from diffusolve.models.data import load_digits

    model = diffusolve.load("digits", guidance=7.5)
    x, y = load_digits("heldout")
    x, c = x[:2], y[:2]
    errs = {}
    for precision in ("double-double", "float64", "input"):
        inv = invert(model, x, 12, method, cond=c, precision=precision, progress=False)
        with torch.no_grad():
            rec = reconstruct(model, inv)
        assert rec.dtype == torch.float32
        errs[precision] = float((rec.double() - x.double()).norm() / x.double().norm())
    assert max(errs["double-double"], errs["float64"]) < 1e-7 < errs["input"], errs
