"""Tiny random diffusers / transformers parts for the pipeline tests (nothing downloaded).

A CLIP tokenizer whose byte-pair vocabulary is written to a folder (every word of ``words``
is one token), CLIP text-encoder configs, an ``AutoencoderKL``, ``UNet2DModel`` and
``UNet2DConditionModel`` of a few channels, and the parts of a Stable-Diffusion pipeline
built from them. The builders draw their weights from torch's global generator in a fixed
order, so a caller that seeds it (or passes ``seed``) gets the same parts every time.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

WORDS = ("a", "photo", "of", "cat", "dog")
LENGTH = 8  # tokens per prompt (start, words, end / padding)
DIM = 32  # the text width and the UNet's cross-attention width


def write_clip_vocab(folder: Path, words=WORDS) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``folder``: single letters,
    letter+</w>, and the merges that build each word (so every word is one token). Returns
    the two paths."""
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + [
        c + end for end in ("", "</w>") for c in string.ascii_lowercase
    ]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in words:
        cur = word[0]
        for i, c in enumerate(word[1:]):
            nxt = c + ("</w>" if i == len(word) - 2 else "")
            if f"{cur} {nxt}" not in merges:
                merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def clip_tokenizer(folder: Path, words=WORDS) -> tuple[transformers.CLIPTokenizer, int]:
    """A ``CLIPTokenizer`` over :func:`write_clip_vocab` (``LENGTH`` tokens a prompt) and the
    size of its vocabulary."""
    vocab, merges = write_clip_vocab(folder, words)
    tok = transformers.CLIPTokenizer(vocab, merges, model_max_length=LENGTH)
    return tok, len(json.loads(Path(vocab).read_text()))


def clip_text_config(n_vocab: int, width: int = DIM) -> transformers.CLIPTextConfig:
    """A two-layer CLIP text-encoder config of ``width`` (also the projection width)."""
    return transformers.CLIPTextConfig(
        vocab_size=n_vocab,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=LENGTH,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_vae(latent_channels: int = 4, **kw) -> AutoencoderKL:
    """An ``AutoencoderKL`` for 16x16 images and 8x8 latents; ``kw`` overrides the config."""
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    )
    return AutoencoderKL(**{**cfg, **kw})


def _seeded(cls, seed: int | None, cfg: dict, kw: dict):
    """``cls`` of a one-channel 8x8 one-layer-per-block config, ``cfg``, then ``kw``; torch's
    generator seeded with ``seed`` first (left as it is with ``None``)."""
    if seed is not None:
        torch.manual_seed(seed)
    base = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1)
    return cls(**{**base, **cfg, **kw})


def tiny_unet(seed: int | None = 0, **kw) -> UNet2DModel:
    """A one-channel 8x8 ``UNet2DModel`` 8 / 16 channels wide (seeded as :func:`_seeded`);
    ``kw`` overrides the config."""
    cfg = dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return _seeded(UNet2DModel, seed, cfg, kw)


def tiny_cond_unet(seed: int | None = 0, **kw) -> UNet2DConditionModel:
    """A one-channel 8x8 cross-attention ``UNet2DConditionModel`` 32 / 64 channels wide, of
    cross-attention width ``DIM`` (seeded as :func:`_seeded`); ``kw`` overrides the config."""
    cfg = dict(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=DIM,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return _seeded(UNet2DConditionModel, seed, cfg, kw)


def tiny_sd_parts(folder: Path, words=WORDS, unet_channels=(16, 32)) -> dict:
    """The parts of a latent text-to-image pipeline, float64 in eval mode, seeded with 0:
    ``tokenizer`` (:func:`clip_tokenizer`), ``text_encoder`` (CLIP, width ``DIM``), ``vae``
    (4 latent channels) and ``unet`` (4 channels, ``unet_channels`` wide)."""
    torch.manual_seed(0)
    tokenizer, n_vocab = clip_tokenizer(folder, words)
    text_encoder = transformers.CLIPTextModel(clip_text_config(n_vocab))
    vae = tiny_vae()
    unet = tiny_cond_unet(
        None, in_channels=4, out_channels=4, block_out_channels=unet_channels, attention_head_dim=4
    )
    for m in (text_encoder, vae, unet):
        m.double().eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)
