"""Guidance: denoiser wrappers with the model's signature ``(x, t, cond) -> x0``.

Classifier-free guidance and its variants (CFG++, interval guidance, rescaled CFG) are
*rules* that combine the conditional and unconditional branches; classifier guidance, EluCD
(off-the-shelf clean classifier) and loss guidance are additive x0 *terms*. :class:`Guided`
holds one rule and any number of terms and calls the network once per evaluation; every
named method is a preset of it.
"""

from .base import CFGRule, Evaluation, GuidanceTerm, Guided, as_scale, next_grid_time
from .cfg import ClassifierFreeGuidance, check_scale, classifier_free, concat_cond
from .cfg_pp import CFGPlusPlus, CFGPlusPlusRule, cfgpp_scale
from .classifier import ClassifierGuidance, ClassifierTerm, classifier_log_prob_grad
from .elucd import EluCD, EluCDTerm, calibrated_log_prob, softplus_relu
from .interval import EDM2_S_INTERVAL, EDM2_XXL_INTERVAL, IntervalGuidance, IntervalRule
from .loss import LossGuidance, LossTerm
from .rescaled import RescaledCFG, RescaledRule, rescale_std

__all__ = ["ClassifierFreeGuidance", "concat_cond", "classifier_free", "check_scale"]
__all__ += ["Guided", "GuidanceTerm", "CFGRule", "Evaluation", "as_scale", "next_grid_time"]
__all__ += ["CFGPlusPlus", "CFGPlusPlusRule", "cfgpp_scale"]
__all__ += ["IntervalGuidance", "IntervalRule", "EDM2_S_INTERVAL", "EDM2_XXL_INTERVAL"]
__all__ += ["RescaledCFG", "RescaledRule", "rescale_std"]
__all__ += ["ClassifierGuidance", "ClassifierTerm", "classifier_log_prob_grad"]
__all__ += ["EluCD", "EluCDTerm", "softplus_relu", "calibrated_log_prob"]
__all__ += ["LossGuidance", "LossTerm"]
