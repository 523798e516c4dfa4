"""Guidance: denoiser wrappers with the same signature (classifier-free guidance, ...)."""

from .cfg import ClassifierFreeGuidance, check_scale, classifier_free, concat_cond

__all__ = ["ClassifierFreeGuidance", "concat_cond", "classifier_free", "check_scale"]
