"""Acceleration: post-training quantization (``quant``) and feature caching (``cache``)."""

from .cache import (  # noqa: F401
    CacheSchedule,
    DeepCache,
    EncoderPropagation,
    deep_cache,
    encoder_propagation,
    find_unet,
    prior_noise_injection,
)
