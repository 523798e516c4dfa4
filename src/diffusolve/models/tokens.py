"""Captions of the token-conditioned digits model: a word tokenizer and a token embedding.

The vocabulary is fixed and small (:data:`VOCAB`): ``<pad>``, ``<start>``, the digit words
``zero .. nine`` and the nine attribute words of :mod:`diffusolve.models.attributes`. A
caption is split on whitespace (lower-cased); its token sequence is ``<start>``, one token
per word, then ``<pad>`` up to ``max_length`` (5: start + thickness + slant + size + digit).
The empty caption ``""`` (``<start> <pad> <pad> <pad> <pad>``) is the null condition of
classifier-free guidance. There is no external text encoder: :class:`TokenEmbedding` is a
learned table (token + position embedding, then LayerNorm) trained with the UNet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .attributes import ATTRIBUTE_WORDS, ATTRIBUTES, DIGIT_WORDS

__all__ = [
    "PAD",
    "START",
    "VOCAB",
    "DigitsTokenizer",
    "TokenEmbedding",
    "load_token_embedding",
    "save_token_embedding",
]

PAD = "<pad>"
START = "<start>"
#: the default vocabulary (ids are positions): pad 0, start 1, digits 2-11, attributes 12-20
VOCAB: tuple[str, ...] = (
    (PAD, START) + DIGIT_WORDS + tuple(w for a in ATTRIBUTES for w in ATTRIBUTE_WORDS[a])
)
_EMBED_CONFIG = "config.json"
_EMBED_WEIGHTS = "model.safetensors"


class DigitsTokenizer:
    """Words to token ids and back, for a fixed vocabulary.

    Args:
        vocab: the words; a word's id is its index. Must start with ``<pad>``, ``<start>``.
        max_length: tokens per caption, ``<start>`` included (captions are padded to it).

    Example:
        >>> from diffusolve.models.tokens import DigitsTokenizer
        >>> tok = DigitsTokenizer()
        >>> ids = tok.encode(["thick three", ""])
        >>> ids.tolist()
        [[1, 14, 5, 0, 0], [1, 0, 0, 0, 0]]
        >>> tok.decode(ids)
        ['thick three', '']
    """

    def __init__(self, vocab: Sequence[str] = VOCAB, max_length: int = 5) -> None:
        vocab = tuple(str(w) for w in vocab)
        if vocab[:2] != (PAD, START):
            raise ValueError(f"the vocabulary must start with {PAD!r}, {START!r}; got {vocab[:2]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has repeated words")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.vocab = vocab
        self.max_length = int(max_length)
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.pad_id = 0
        self.start_id = 1

    def __len__(self) -> int:
        return len(self.vocab)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DigitsTokenizer)
            and self.vocab == other.vocab
            and self.max_length == other.max_length
        )

    def __repr__(self) -> str:
        return f"DigitsTokenizer({len(self.vocab)} words, max_length={self.max_length})"

    def words(self, caption: str) -> list[str]:
        """The words of ``caption`` (lower-cased, split on whitespace), checked against the
        vocabulary and the length limit."""
        if not isinstance(caption, str):
            raise TypeError(f"a caption is a string, got {type(caption).__name__}")
        words = caption.lower().split()
        for w in words:
            if w not in self.ids or w in (PAD, START):
                known = ", ".join(self.vocab[2:])
                raise ValueError(
                    f"unknown word {w!r} in caption {caption!r}; the vocabulary is: {known}"
                )
        if len(words) > self.max_length - 1:
            raise ValueError(
                f"caption {caption!r} has {len(words)} words; at most {self.max_length - 1} fit "
                f"(max_length {self.max_length} counts the start token)"
            )
        return words

    def encode(self, captions: str | Sequence[str]) -> Tensor:
        """Token ids ``[B, max_length]`` (int64): one row per caption (``B = 1`` for a string)."""
        if isinstance(captions, str):
            captions = [captions]
        rows = []
        for caption in captions:
            ids = [self.start_id] + [self.ids[w] for w in self.words(caption)]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        if not rows:
            raise ValueError("no captions to encode")
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Captions of token ids ``[B, L]`` (or one row ``[L]``); start and pad tokens dropped."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [B, L] or [L], got {tuple(ids.shape)}")
        if bool(((ids < 0) | (ids >= len(self.vocab))).any()):
            raise ValueError(f"token ids must be in 0..{len(self.vocab) - 1}")
        return [
            " ".join(self.vocab[i] for i in row if i not in (self.pad_id, self.start_id))
            for row in ids.tolist()
        ]

    def index(self, caption: str, word: str) -> int:
        """The position of ``word``'s token in ``caption``'s sequence (where its
        cross-attention maps are), e.g. ``index("thick three", "three") == 2``."""
        words = self.words(caption)
        if word.lower() not in words:
            raise ValueError(f"{word!r} is not a word of {caption!r}")
        return 1 + words.index(word.lower())

    def to_dict(self) -> dict[str, object]:
        return {"type": "DigitsTokenizer", "vocab": list(self.vocab), "max_length": self.max_length}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON (``tokenizer.json``); ``path`` may be a folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DigitsTokenizer:
        """Read a tokenizer written by :meth:`save` (a file, or a folder with
        ``tokenizer.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            data = json.loads(path.read_text())
            return cls(data["vocab"], data["max_length"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found (a tokenizer.json is expected)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a valid tokenizer file ({err})") from None


class TokenEmbedding(nn.Module):
    """``embed(ids [B, L]) -> [B, L, dim]``: learned token and position embeddings, then
    LayerNorm (the model's "text encoder").

    Example:
        >>> import torch
        >>> from diffusolve.models.tokens import TokenEmbedding
        >>> TokenEmbedding(21, 5, 64)(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, vocab_size: int, max_length: int, dim: int) -> None:
        super().__init__()
        self.vocab_size, self.max_length, self.dim = int(vocab_size), int(max_length), int(dim)
        self.token = nn.Embedding(self.vocab_size, self.dim)
        self.position = nn.Parameter(torch.zeros(self.max_length, self.dim))
        self.norm = nn.LayerNorm(self.dim)
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def config(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "max_length": self.max_length, "dim": self.dim}

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.max_length:
            raise ValueError(
                f"token ids must be [B, L] with L <= {self.max_length}, got {tuple(ids.shape)}"
            )
        return self.norm(self.token(ids) + self.position[: ids.shape[1]])


def save_token_embedding(module: TokenEmbedding, folder: str | Path) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _EMBED_CONFIG).write_text(json.dumps(module.config(), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / _EMBED_WEIGHTS))
    return folder


def load_token_embedding(folder: str | Path) -> TokenEmbedding:
    """Read a :class:`TokenEmbedding` saved by :func:`save_token_embedding` (safetensors,
    never pickle), in eval mode with frozen parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = "retrain the model with `diffusolve train digits-tokens --out <folder> --force`"
    try:
        cfg = json.loads((folder / _EMBED_CONFIG).read_text())
        module = TokenEmbedding(cfg["vocab_size"], cfg["max_length"], cfg["dim"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder / _EMBED_CONFIG} not found; {fix}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / _EMBED_CONFIG} is not a valid config ({err}); {fix}") from None
    try:
        module.load_state_dict(load_file(str(folder / _EMBED_WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {folder / _EMBED_WEIGHTS} ({first}); {fix}") from None
    return module.eval().requires_grad_(False)
