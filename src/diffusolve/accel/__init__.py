"""Acceleration: post-training quantization (``quant``, with EDA-DM block reconstruction in
``recon`` and real int8 CPU execution) and feature caching (``cache``). The few-step models
are in :mod:`diffusolve.models.fewstep` (trained by :mod:`diffusolve.train`)."""

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
    real_int8,
    save_quantized,
    tdac_calibration,
    uniform_calibration,
)
from .recon import BlockReconstruction, reconstruct_blocks  # noqa: F401
