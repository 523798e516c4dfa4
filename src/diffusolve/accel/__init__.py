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
from .quant import (  # noqa: F401
    CalibrationSet,
    QuantConfig,
    Trajectories,
    collect_trajectories,
    int8_dynamic,
    load_quantized,
    ptq4dm_calibration,
    quantize,
    save_quantized,
    tdac_calibration,
    uniform_calibration,
)
