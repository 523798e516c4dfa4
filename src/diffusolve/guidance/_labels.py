"""Small helpers shared by the classifier-based terms (target labels, calling a network)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def target_labels(cond: Any, target: Any, b: int, device: Any) -> Tensor:
    """The class labels ``[B]`` a term pushes towards: ``target`` if given, else the
    evaluation's condition (long labels, as a label model's guided network sees them)."""
    y = cond if target is None else target
    if y is None:
        raise ValueError(
            "a classifier term needs target labels: pass cond=labels when sampling, or "
            "target=labels to the term"
        )
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"a classifier term's targets must be integer labels, got dtype {y.dtype} (for a "
            "caption model, pass target=labels)"
        )
    y = y.to(torch.long).reshape(-1)
    if y.numel() == 1:
        y = y.expand(b)
    if y.numel() != b:
        raise ValueError(f"got {y.numel()} target labels for a batch of {b}")
    return y


def net_dtype(fn: Any, x: Tensor) -> torch.dtype:
    """The floating dtype of a module's parameters (``x``'s for other callables)."""
    if isinstance(fn, torch.nn.Module):
        for p in (*fn.parameters(), *fn.buffers()):
            if p.is_floating_point():
                return p.dtype
    return x.dtype
