"""Training of the small bundled models (digits UNet, noise-aware digits classifier).

Heavy imports (torch, diffusers, scikit-learn) happen on first use, so that registering the
``diffusolve train`` sub-commands stays instant.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_digits"]


def __getattr__(name: str) -> Any:
    if name == "load_digits":
        from ..models.data import load_digits

        return load_digits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
