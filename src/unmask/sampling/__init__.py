"""Samplers: one file each, sharing the small protocol in :mod:`unmask.sampling.base`; the option
table, the block plans and driver, the caches, canvases and the one decoding path around them."""

from unmask.sampling.ancestral import AncestralConfig, ancestral
from unmask.sampling.ar import ARConfig, ar_sample
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerConfig, SamplerState, exponential_race
from unmask.sampling.block_cache import BlockCache
from unmask.sampling.blocks import decode_blocks
from unmask.sampling.cache import CacheConfig, CanvasCache
from unmask.sampling.canvas import infill_canvas, make_canvas
from unmask.sampling.confidence import ConfidenceConfig, confidence
from unmask.sampling.decoding import Decoding, decoding_for, sampling_generator
from unmask.sampling.first_hitting import FirstHittingConfig, first_hitting
from unmask.sampling.options import OPTIONS, Option
from unmask.sampling.plans import ColumnBlocks, GridBlocks
from unmask.sampling.spec import SAMPLERS, SamplerSpec
from unmask.sampling.threshold import ThresholdConfig, threshold
from unmask.sampling.uniform import UniformConfig, UniformState, uniform

__all__ = [
    "AncestralConfig", "ancestral", "ARConfig", "ar_sample", "BlockCache", "CacheConfig", "CanvasCache", "ColumnBlocks", "Conditioning",
    "ConfidenceConfig", "confidence", "Decoding", "decode_blocks", "decoding_for", "exponential_race", "FirstHittingConfig",
    "first_hitting", "GridBlocks", "infill_canvas", "make_canvas", "OPTIONS", "Option", "SAMPLERS", "SampleOutput", "Sampler",
    "SamplerConfig", "SamplerSpec", "SamplerState", "sampling_generator", "ThresholdConfig", "threshold",
    "UniformConfig", "UniformState", "uniform",
]
