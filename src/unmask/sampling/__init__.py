"""Samplers: one file each, sharing the small protocol in :mod:`unmask.sampling.base`."""

from unmask.sampling.ancestral import AncestralConfig, ancestral
from unmask.sampling.ar import ARConfig, ar_sample
from unmask.sampling.base import SampleOutput, SamplerState, exponential_race, sample_tokens

__all__ = ["AncestralConfig", "ancestral", "ARConfig", "ar_sample", "SampleOutput", "SamplerState", "exponential_race", "sample_tokens"]
