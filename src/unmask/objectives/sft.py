"""Supervised fine-tuning (SFT) on prompt/response pairs, of an MDM or the AR baseline.
docs/algorithms.md, 'Conditional bound and fine-tuning'.

The data is a pairs folder (``unmask.data.pairs``): rows ``[EOS ; prompt ; response ; EOS ...]``
with their response masks. Only the response region is learned, normalised by its length, for the
network the run's ``objective`` trains: an MDM masks only the response (:func:`corrupt_response`,
with CFG dropout of the prompt) and is scored by ``dce_loss``; the AR model scores the response
targets only. The held-out score is ``unmask.likelihood.response_nll`` (MDM: the conditional bound;
AR: exact). The ``sft`` section of the training config selects this objective.
"""

from __future__ import annotations

from typing import Any

import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.likelihood import LikelihoodResult, response_nll
from unmask.losses import Corruption, ar_loss, dce_loss
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import OBJECTIVES, register
from unmask.schedule import Schedule, add_noise, mask_exactly, sample_times


def corrupt_response(
    x0: torch.Tensor,
    response: torch.Tensor,
    schedule: Schedule,
    mask_id: int,
    generator: torch.Generator,
    *,
    loss: str = "t-dce",
    prompt_dropout: float = 0.0,
    u: torch.Tensor | None = None,
    low_discrepancy: bool = True,
) -> Corruption:
    """SFT noise of rows x0 (B, L) (docs/algorithms.md, 'Conditional bound and fine-tuning'): only the response region ``response``
    (B, L) bool, R_b positions of row b, is masked (t-DCE: each with p = 1 - alpha(t); k-DCE:
    exactly k ~ U{1..R_b}), and the loss is normalised by R_b: the negative conditional ELBO of
    the response in nats per response token. The prompt is never masked, except that with
    probability ``prompt_dropout`` a row's prompt (every position before its response but the
    first, the EOS separator) is replaced by MASK in x_t: CFG dropout, which trains the
    unconditional model that guidance subtracts, in the form the samplers give it (the prompt
    masked, its length and the separator kept: unmask.sampling.canvas.make_canvas). Dropped
    prompts are not targets.
    """
    b, l = x0.shape
    r = response.sum(dim=1).cpu()
    if u is None:
        u = sample_times(b, generator, low_discrepancy)
    if loss == "k-dce":
        k = torch.ceil(u * r).clamp(min=1).minimum(r).long()
        xt, masked = mask_exactly(x0, k, mask_id, generator, eligible=response)
        t, weight = k.float() / r, l / k.float()
    else:
        xt, masked = add_noise(x0, schedule.mask_prob(u), mask_id, generator, eligible=response)
        t, weight = u, schedule.weight(u) * l / r
    drop = torch.rand(b, generator=generator) < prompt_dropout
    prompt = ~response & (torch.arange(l, device=x0.device) > 0) & drop.to(x0.device)[:, None]
    xt = torch.where(prompt, torch.full_like(xt, mask_id), xt)
    return Corruption(xt, masked, t.to(x0.device), weight.to(x0.device))



@register
class FineTuning(Objective):
    name = "sft"
    data = "pairs"
    fine_tunes = True

    def __init__(self, train: TrainConfig, model: ModelConfig) -> None:
        super().__init__(train, model)
        self.causal = self.network(train)["causal"]

    @classmethod
    def network(cls, train: TrainConfig) -> dict[str, Any]:
        return OBJECTIVES[train.objective].network(train)  # the network of the run that is fine-tuned

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> Corruption | None:
        if self.causal:
            return None
        cfg = self.train
        return corrupt_response(batch.tokens, batch.response, self.schedule, self.model.mask_id, generator, loss=cfg.loss,
                                prompt_dropout=cfg.sft.cfg_dropout, low_discrepancy=cfg.low_discrepancy)

    def loss(self, model, batch: Batch, noise: Corruption | None) -> torch.Tensor:
        if noise is None:  # AR: the response targets only (row i predicts token i + 1)
            return ar_loss(model, batch.tokens, batch.response[:, 1:])
        return dce_loss(model, batch.tokens, noise)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return response_nll(model, held_out.tokens, held_out.response, draws=max(2, self.train.eval_draws), batch_size=batch_size,
                            seed=VALIDATION_SEED)
