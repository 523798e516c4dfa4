"""scikit-learn's digits at 16x16: moved to :mod:`diffusolve.models.data` (the bundled
model, its classifier and FD-digits use it, and models must not import ``train``).

Re-exported here so that ``from diffusolve.train.data import load_digits`` keeps working.
"""

from ..models.data import (
    HELDOUT_FRACTION,
    IMAGE_SIZE,
    NUM_CLASSES,
    SPLIT_SEED,
    load_digits,
    split,
)

__all__ = ["SPLIT_SEED", "HELDOUT_FRACTION", "IMAGE_SIZE", "NUM_CLASSES", "load_digits", "split"]
