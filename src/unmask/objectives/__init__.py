"""Training objectives, one module each behind one small protocol (:class:`Objective`, in ``base.py``).

    mdm.py   masked diffusion: k-DCE or t-DCE on windows of text
    ar.py    the autoregressive baseline: next-token cross-entropy on the same windows
    bd3.py   block diffusion (BD3-LM): block-causal, one time per block
    sft.py   fine-tuning an MDM or AR model on prompt/response pairs (the ``sft`` section selects it)
    classifier.py  a classifier of noisy canvases p(y | x_t) on labelled texts (for D-CBG guidance)
    udlm.py  uniform-state diffusion (UDLM): the exact continuous-time bound, time-conditioned network
    duo.py   Duo: UDLM after a curriculum through its Gaussian dual (relaxed one-hot inputs)
    sdtt.py  distilling an MDM for few-step sampling (self-distillation through time; distillation.py: the rounds)
    dcd.py   distilling a Duo model for few-step sampling (discrete consistency distillation)

Each supplies its noise, loss, held-out bound, data and network to the one training loop
(:mod:`unmask.train`) and is registered by name in :data:`OBJECTIVES`. The losses they share with
evaluation live in :mod:`unmask.losses` (and :mod:`unmask.block_diffusion`).
"""

from unmask.objectives.base import Batch, Objective, objective_class, objective_for
from unmask.objectives.registry import OBJECTIVES, register, trained_from_text
from unmask.objectives import mdm, ar, bd3, sft, udlm, duo  # noqa: E402,F401  (registers the built-in objectives, in this order)
from unmask.objectives import sdtt, dcd  # noqa: E402,F401
from unmask.objectives import classifier  # noqa: E402,F401
from unmask.objectives.sft import corrupt_response

__all__ = [
    "OBJECTIVES", "Batch", "Objective", "corrupt_response", "objective_class", "objective_for", "register", "trained_from_text",
]
