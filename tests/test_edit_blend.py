"""Prompt-to-prompt's local blending on the caption model: the mask, and its two limits."""

from __future__ import annotations

import pytest
import torch

from diffusolve.bench.inversion import edit_conds, edit_data
from diffusolve.edit import edit
from diffusolve.edit.methods import _blend_mask
from diffusolve.models import load

pytestmark = pytest.mark.usefixtures("single_thread")


def test_blend_mask_is_the_pooled_normalised_attention_of_the_words():
    maps = torch.zeros(1, 16, 3)  # a 4x4 attention grid, 3 tokens
    maps[0, 5, 1] = 1.0  # token 1 attends at (1, 1) only
    maps[0, :, 2] = 1.0  # token 2 everywhere
    only1 = torch.tensor([[False, True, False]])
    mask = _blend_mask(maps, only1, torch.Size([1, 1, 8, 8]), 0.3)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    assert bool(mask[0, 0, 2, 2]) and not bool(mask[0, 0, 7, 7])  # near (1, 1) only
    both = torch.tensor([[False, True, True]])
    assert bool(_blend_mask(maps, both, torch.Size([1, 1, 8, 8]), 0.3).all())


@pytest.fixture(scope="module")
def threes():
    model = load("digits-tokens")
    x, y = edit_data("3to8", 2)
    source, target, _, _ = edit_conds("3to8", "digits-tokens", x, y)
    return model, x, source, target


def test_local_blend_at_threshold_one_returns_the_source_exactly(threes):
    """Nothing may change (no normalised map exceeds 1): from blend_start on the target
    follows the source trajectory, whose clean end is the input itself."""
    model, x, source, target = threes
    out = edit(
        model,
        x,
        source=source,
        target=target,
        method="p2p",
        steps=6,
        blend_words=("three", "eight"),
        blend_threshold=1.0,
    )
    assert torch.equal(out, x)


def test_local_blend_at_threshold_zero_is_plain_p2p(threes):
    model, x, source, target = threes
    kw = dict(source=source, target=target, method="p2p", steps=6)
    plain = edit(model, x, **kw)
    blended = edit(model, x, blend_words=("three", "eight"), blend_threshold=0.0, **kw)
    torch.testing.assert_close(
        blended, plain, rtol=0, atol=1e-4
    )  # float32 rounding of traj + (z - traj)


def test_blend_words_must_be_in_a_prompt(threes):
    model, x, source, target = threes
    with pytest.raises(ValueError, match="appear in neither prompt"):
        edit(model, x, source=source, target=target, method="p2p", steps=3, blend_words=("nine",))
