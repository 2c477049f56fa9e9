"""Reward- and energy-guided decoding around any MDM sampler (docs/sampling.md, 'Reward- and
energy-guided decoding'; docs/algorithms.md, 'Reward- and energy-guided decoding').

A score (:mod:`~unmask.steering.rewards`: ``ar:RUN``, ``regex:PATTERN``, ``classifier:RUN:LABEL``,
``python:MODULE:FUNCTION``) values whole sequences; a guide (best-of-N, SVDD, SMC, EDLM; one file
each) wraps the sampler's step and uses the score as a reward or as an energy; :func:`steer` puts
the two in a decoding's conditioning, and the one decoding path does the rest.
"""

from unmask.steering.best_of import BestOfConfig, best_of
from unmask.steering.edlm import EDLMConfig, edlm
from unmask.steering.guide import Guide, GuidedState, guided
from unmask.steering.meter import ScoreMeter
from unmask.steering.options import GUIDE_NAMES, GUIDE_OPTIONS
from unmask.steering.registry import GUIDES, guide_config
from unmask.steering.rewards import (
    ARLikelihood, Candidates, ClassifierScore, PythonScore, RegexScore, Score, TokenScore, parse_score,
)
from unmask.steering.smc import SMCConfig, smc
from unmask.steering.steering import SteeredOutput, Steering, steer
from unmask.steering.svdd import SVDDConfig, svdd

__all__ = [
    "ARLikelihood", "BestOfConfig", "Candidates", "ClassifierScore", "EDLMConfig", "GUIDES", "GUIDE_NAMES", "GUIDE_OPTIONS", "Guide",
    "GuidedState", "PythonScore", "RegexScore", "SMCConfig", "SVDDConfig", "Score", "ScoreMeter", "SteeredOutput", "Steering",
    "TokenScore", "best_of", "edlm", "guide_config", "guided", "parse_score", "smc", "steer", "svdd",
]
