"""Training of the small bundled models (digits UNet, noise-aware digits classifier).

Heavy imports (diffusers, scikit-learn) happen inside the functions.
"""

from .data import load_digits

__all__ = ["load_digits"]
