"""The caption-conditioned digits model: tokenizer, measured attributes, cond forms, guidance,
shipped weights and a small held-out caption check."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import diffusolve
from diffusolve.guidance import classifier_free
from diffusolve.models import attributes as A
from diffusolve.models import load
from diffusolve.models.bundled import TokenConditioned, asset_dir
from diffusolve.models.data import load_digits
from diffusolve.models.tokens import VOCAB, DigitsTokenizer
from diffusolve.train.digits_tokens import (
    DigitsTokensConfig,
    caption_batch,
    evaluate_captions,
    heldout_captions,
    train_digits_tokens,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ASSETS = asset_dir("digits-tokens")
METRICS = json.loads((ASSETS / "metrics.json").read_text())


@pytest.fixture(scope="module")
def model() -> TokenConditioned:
    return load("digits-tokens")


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits("heldout")


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """``x`` resampled at ``theta @ (u, v, 1)`` (normalised coordinates, v downwards),
    paper (-1) outside."""
    th = torch.tensor(theta, dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(th, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, align_corners=False) - 1.0


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trip_and_json(tmp_path) -> None:
    tok = DigitsTokenizer()
    caps = ["thick slanted-left small three", "three", "", "thin large nine", "upright zero"]
    ids = tok.encode(caps)
    assert ids.shape == (5, tok.max_length) and ids.dtype == torch.long
    assert tok.decode(ids) == caps
    assert ids[2].tolist() == [tok.start_id] + [tok.pad_id] * (tok.max_length - 1)
    assert torch.equal(tok.encode("Thick  THREE"), tok.encode(["thick three"]))
    assert tok.index("thick slanted-left three", "three") == 3
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json" and DigitsTokenizer.load(tmp_path) == tok
    # every word of every caption the training can produce is in the vocabulary
    assert set(VOCAB[2:]) == set(A.DIGIT_WORDS) | {
        w for words in A.ATTRIBUTE_WORDS.values() for w in words
    }
    assert DigitsTokenizer.load(ASSETS) == tok


def test_tokenizer_errors_name_the_problem() -> None:
    tok = DigitsTokenizer()
    with pytest.raises(ValueError, match=r"unknown word 'bold'.*vocabulary is: zero, one"):
        tok.encode("bold three")
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        tok.encode("<pad> three")
    with pytest.raises(ValueError, match="at most 4 fit"):
        tok.encode("thick upright small large three")
    with pytest.raises(ValueError, match="token ids must be in"):
        tok.decode(torch.tensor([[1, 99]]))


# --- attributes -------------------------------------------------------------------------


def test_shear_adds_to_slant_with_the_documented_sign(heldout) -> None:
    x, _ = heldout
    x = x[:50]
    for k in (-0.3, 0.2):
        # output (u, v) reads input u + k * v_down: the top (v_down < 0) moves right by k
        sheared = _affine(x, [[1.0, k, 0.0], [0.0, 1.0, 0.0]])
        change = A.slant(sheared) - A.slant(x)
        assert torch.allclose(change, torch.full_like(change, k), atol=0.05)
        # shear keeps size (det C) and nearly keeps thickness
        assert torch.allclose(
            A.size(sheared) / A.size(x), torch.ones(50, dtype=torch.float64), atol=0.03
        )
        assert (A.thickness(sheared) / A.thickness(x) - 1).abs().max() < 0.1
    # a mirror image slants the other way
    assert torch.allclose(A.slant(x.flip(-1)), -A.slant(x), atol=1e-12)


def test_dilation_thickens_and_scaling_grows(heldout) -> None:
    x, _ = heldout
    x = x[:50]
    assert torch.all(A.thickness(F.max_pool2d(x, 3, 1, 1)) > 1.15 * A.thickness(x))
    assert torch.all(A.thickness(-F.max_pool2d(-x, 3, 1, 1)) < A.thickness(x))  # erosion
    for s in (0.6, 0.8):
        small = _affine(x, [[1 / s, 0.0, 0.0], [0.0, 1 / s, 0.0]])
        ratio = A.size(small) / A.size(x)
        assert torch.allclose(ratio, torch.full_like(ratio, s), atol=0.03)
    # a filled 12 x 4 pixel bar: pixel-grid variances (n^2 - 1) / 12 give the size, and
    # thickness is 2 area / perimeter = 2 * 48 / 32 up to the rounded corners
    rect = -torch.ones(1, 1, 16, 16)
    rect[..., 2:14, 5:9] = 1.0
    assert float(A.size(rect)) == pytest.approx(((12**2 - 1) * (4**2 - 1)) ** 0.25, rel=1e-9)
    assert float(A.thickness(rect)) == pytest.approx(2 * 48 / 32, rel=0.03)
    assert float(A.slant(rect)) == pytest.approx(0.0, abs=1e-12)
    blank = -torch.ones(1, 1, 16, 16)
    assert A.measure(blank).tolist() == [[0.0, 0.0, 0.0]]


def test_words_are_class_terciles_of_the_train_split() -> None:
    x, y = load_digits("train")
    bins = A.attribute_bins(x, y)
    for c in range(10):
        frac = torch.stack([(bins[y == c] == k).float().mean(0) for k in range(3)])
        assert torch.all((frac - 1 / 3).abs() < 0.04), (c, frac)
    shipped = json.loads((ASSETS / "attribute_thresholds.json").read_text())["thresholds"]
    cuts = A.thresholds()
    for c, word in enumerate(A.DIGIT_WORDS):
        for j, attr in enumerate(A.ATTRIBUTES):
            assert shipped[word][attr] == pytest.approx(cuts[c, j].tolist(), abs=1e-6)
    words = A.caption_words(x[0], int(y[0]))
    assert A.captions(x[:1], y[:1]) == [" ".join(words)]
    assert A.parse_caption(" ".join(words)) == (
        int(y[0]),
        dict(zip(A.ATTRIBUTES, bins[0].tolist(), strict=True)),
    )
    assert caption_batch(bins[:1], y[:1]) == [" ".join(words)]


def test_caption_dropouts() -> None:
    g = torch.Generator().manual_seed(0)
    bins, labels = torch.ones(4000, 3, dtype=torch.long), torch.full((4000,), 3)
    caps = caption_batch(bins, labels, word_dropout=0.3, caption_dropout=0.1, generator=g)
    assert abs(sum(c == "" for c in caps) / 4000 - 0.1) < 0.02
    kept = [c for c in caps if c]
    assert all(c.endswith("three") for c in kept)
    assert abs(sum("medium" in c for c in kept) / len(kept) - 0.7) < 0.03


# --- the model --------------------------------------------------------------------------


def test_shipped_folder_is_a_small_diffusers_model(model) -> None:
    from diffusers import UNet2DConditionModel

    assert (ASSETS / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 8_000_000
    assert isinstance(model, TokenConditioned) and isinstance(model.unet, UNet2DConditionModel)
    assert model.unet.config.cross_attention_dim == model.encoder.dim
    # cross-attention layers (attn2) at 8x8 and 4x4 (down, mid, up) for attention editing
    cross = [k for k in model.unet.attn_processors if ".attn2." in k]
    assert {k.split(".")[0] for k in cross} == {"down_blocks", "mid_block", "up_blocks"}
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_cond_forms_give_identical_outputs(model) -> None:
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    caption = "thick slanted-left three"
    with torch.no_grad():
        ref = model(x, 400.0, caption)
        forms = [
            [caption] * 3,
            [caption],
            model.tokenizer.encode(caption),
            model.tokenizer.encode([caption] * 3),
            model.embed(caption, 1),
            model.embed(caption, 3),
        ]
        for cond in forms:
            assert torch.equal(model(x, 400.0, cond), ref)
        null = model(x, 400.0, None)
        assert torch.equal(model(x, 400.0, ""), null)
        assert torch.equal(model(x, 400.0, model.null_cond), null)
        assert not torch.allclose(null, ref)
        # one caption per sample
        mixed = model(x, 400.0, ["one", caption, "seven"])
        assert torch.allclose(mixed[1], ref[1], atol=1e-5)  # batch kernels may round apart
        assert not torch.allclose(mixed[0], ref[0])
    assert model.embed(["one", "two"]).shape == (2, model.tokenizer.max_length, model.encoder.dim)


def test_cond_errors_and_gradients(model) -> None:
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown word 'fat'"):
        model(x, 10.0, "fat three")
    with pytest.raises(ValueError, match="3 samples in a batch of 2"):
        model(x, 10.0, ["one", "two", "three"])
    with pytest.raises(ValueError, match="token ids must be"):
        model(x, 10.0, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="cond must be None, a caption"):
        model(x, 10.0, 3)
    # null-text inversion optimises embeddings: gradients reach them through the UNet
    emb = model.embed(None, 1).clone().requires_grad_(True)
    model(x, 300.0, emb).square().sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_classifier_free_guidance_on_ids_and_captions(model) -> None:
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = model.tokenizer.encode(["thin three", "large eight"])
    with torch.no_grad():
        cond, null = model(x, 300.0, ids), model(x, 300.0, None)
        want = null + 2.5 * (cond - null)
        guided = classifier_free(model, 2.5, null_cond=model.null_cond)
        assert torch.allclose(guided(x, 300.0, ids), want, atol=1e-5)
        on_emb = classifier_free(model, 2.5, null_cond=model.embed(None, 1))
        assert torch.allclose(on_emb(x, 300.0, model.embed(ids)), want, atol=1e-5)
        top = diffusolve.load("digits-tokens", guidance=2.5)
        assert isinstance(top, TokenConditioned) and top.unet is not None
        assert torch.allclose(top(x, 300.0, ["thin three", "large eight"]), want, atol=1e-5)
        assert torch.allclose(top(x, 300.0, ids), want, atol=1e-5)
        assert torch.equal(diffusolve.load("digits-tokens", guidance=1.0)(x, 300.0, ids), cond)


def test_small_heldout_caption_check(model) -> None:
    check = METRICS["test_check"]
    out = evaluate_captions(
        model, n=check["n"], steps=check["steps"], guidance=check["guidance"], seed=check["seed"]
    )
    # the model card's figure for exactly this configuration, and far above chance (10 %)
    assert out["digit_accuracy"] == pytest.approx(check["digit_accuracy"], abs=0.1)
    assert out["digit_accuracy"] >= 0.7
    assert sum(out["attribute_accuracy"].values()) / 3 >= 0.55  # chance: 1/3; card: 0.8
    caps, labels, _ = heldout_captions(check["n"], check["seed"])
    assert [A.parse_caption(c)[0] for c in caps] == labels.tolist()


# --- training ---------------------------------------------------------------------------


def test_tiny_training_is_deterministic_and_loadable(tmp_path) -> None:
    from safetensors.torch import load_file

    cfg = DigitsTokensConfig(steps=2, batch_size=4)
    for name in ("a", "b"):
        train_digits_tokens(cfg, tmp_path / name, progress=False)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = (load_file(str(tmp_path / n / part)) for n in ("a", "b"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    tiny = load(tmp_path / "a")
    assert isinstance(tiny, TokenConditioned)
    with torch.no_grad():
        assert tiny(torch.zeros(2, 1, 16, 16), 999.0, "two").shape == (2, 1, 16, 16)
    from diffusolve.cli import main

    # refuses to overwrite a trained folder without --force (exit code 2, before any work)
    assert main(["train", "digits-tokens", "--out", str(tmp_path / "a"), "--steps", "1"]) == 2
