"""Guidance: denoiser wrappers with the same signature (classifier-free guidance, ...)."""

from .cfg import ClassifierFreeGuidance, concat_cond

__all__ = ["ClassifierFreeGuidance", "concat_cond"]
