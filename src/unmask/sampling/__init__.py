"""Samplers: one file each, sharing the small protocol in :mod:`unmask.sampling.base`."""

from unmask.sampling.ancestral import AncestralConfig, ancestral
from unmask.sampling.ar import ARConfig, ar_sample
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerConfig, SamplerState, exponential_race
from unmask.sampling.blocks import semi_autoregressive
from unmask.sampling.cache import CacheConfig, CanvasCache
from unmask.sampling.confidence import ConfidenceConfig, confidence
from unmask.sampling.first_hitting import FirstHittingConfig, first_hitting
from unmask.sampling.threshold import ThresholdConfig, threshold

__all__ = [
    "AncestralConfig", "ancestral", "ARConfig", "ar_sample", "CacheConfig", "CanvasCache", "Conditioning", "SampleOutput", "Sampler",
    "SamplerConfig", "SamplerState", "exponential_race", "semi_autoregressive", "ConfidenceConfig", "confidence",
    "FirstHittingConfig", "first_hitting", "ThresholdConfig", "threshold",
]
