"""A classifier of noisy canvases p(y | x_t), the classifier of D-CBG guidance. docs/algorithms.md,
'Classifier guidance (D-CBG)'; docs/training.md, 'Training a classifier'.

Data: a labels folder (:mod:`unmask.data.labels`), rows ``[EOS ; text ; PAD ...]`` with their class
indices, made from a JSONL file of ``{"text": ..., "label": ...}`` lines by :func:`new_classifier`.

Noise: the MDM's own forward process. t ~ U(0, 1) per row (low-discrepancy over the batch), and
each text token is masked with probability 1 - alpha(t) under the run's schedule; the EOS
separator and the padding never are, as a sampler's canvas never masks its prompt. The classifier
so learns p(y | x_t) at every masking level a sampler's canvas passes through.

Loss: the cross-entropy -log p_phi(y | x_t) of the row's label, in nats per row (what the loop
calls nats/token: a classifier makes one prediction per row). Held out: the same on the
validation rows under fixed noise (``eval_draws`` draws per row), with the accuracy at those
noise levels and on the clean texts (:class:`ClassifierResult`).

Network: the MDM's Transformer with a pooled head (``ModelConfig.labels``), bidirectional and
time-agnostic: under the masking process the exact p(y | x_t) depends on the canvas alone (the
mask pattern is drawn independently of the text, so t adds nothing once x_t is seen). A classifier
started from a time-conditioned MDM (``init_from``) keeps its time input and gets the canvas's
masked fraction, in training and when guiding (:class:`unmask.classifier.Classifier`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from unmask.config import ModelConfig
from unmask.data.labels import folder_labels, is_labels_folder, prepare_labels, read_labelled
from unmask.device import device_of
from unmask.errors import OptionError, UnmaskError
from unmask.likelihood import LikelihoodResult, batch_slices
from unmask.losses import Corruption
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import register
from unmask.schedule import add_noise, masked_fraction, sample_times


@dataclass
class ClassifierResult(LikelihoodResult):
    """The held-out score of a classifier: ``nats_per_token`` is the mean -log p(y | x_t) per row over
    the noise draws, ``accuracy`` its argmax accuracy there, ``clean_accuracy`` on the unmasked texts."""

    accuracy: float = math.nan
    clean_accuracy: float = math.nan

    def headline(self) -> str:
        return f"{self.nats_per_token:.4f} nats/row (-log p(label | noisy text))"

    def extra(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "clean_accuracy": self.clean_accuracy}


def key_mask_of(batch: Batch) -> torch.Tensor:
    """(B, T) bool: a labelled row's real positions, its EOS and its text (not the padding)."""
    first = torch.arange(batch.tokens.shape[1], device=batch.tokens.device) == 0
    return batch.response | first


def classifier_logits(model, tokens: torch.Tensor, key_mask: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(B, K) label logits of canvases; a time-conditioned classifier gets each row's masked fraction."""
    t = masked_fraction(tokens, config.mask_id, key_mask) if config.time_conditioning else None
    return model(tokens, t=t, key_mask=key_mask)


@register
class Classification(Objective):
    name = "classifier"
    data = "labels"
    defaults = {"lr": 1e-3, "loss": "t-dce"}

    def check(self, tokenizer, data_dir: Path, device: torch.device) -> None:
        super().check(tokenizer, data_dir, device)
        if self.train.loss != "t-dce":
            raise OptionError("loss", "{objective} classifier masks with probability 1 - alpha(t), t ~ U(0, 1); leave {loss} out "
                              "(t-dce), not {_loss}", _loss=self.train.loss)
        labels = folder_labels(data_dir)
        if labels != self.model.labels or self.model.block_causal:
            raise UnmaskError(f"the model is not a classifier of the labels of {data_dir} ({', '.join(labels)}): its labels are "
                              f"{list(self.model.labels)}{' and it is block-causal' if self.model.block_causal else ''}")

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> Corruption:
        t = sample_times(batch.tokens.shape[0], generator, self.train.low_discrepancy)
        xt, masked = add_noise(batch.tokens, self.schedule.mask_prob(t), self.model.mask_id, generator, eligible=batch.response)
        return Corruption(xt, masked, t.to(xt.device), torch.ones_like(t).to(xt.device))

    def loss(self, model, batch: Batch, noise: Corruption) -> torch.Tensor:
        logits = classifier_logits(model, noise.xt, key_mask_of(batch), self.model)
        return F.cross_entropy(logits.float(), batch.labels, reduction="none")

    @torch.no_grad()
    def validate(self, model, held_out: Batch, batch_size: int) -> ClassifierResult:
        held_out = held_out.to(device_of(model))
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        key_mask, draws = key_mask_of(held_out), self.train.eval_draws
        nll, right, clean = [], [], []
        for _ in range(draws):
            xt = self.draw_noise(held_out, generator).xt
            for rows in batch_slices(xt.shape[0], batch_size):
                logits = classifier_logits(model, xt[rows], key_mask[rows], self.model).float()
                nll.append(F.cross_entropy(logits, held_out.labels[rows], reduction="none"))
                right.append(logits.argmax(dim=-1) == held_out.labels[rows])
        for rows in batch_slices(held_out.tokens.shape[0], batch_size):
            clean.append(classifier_logits(model, held_out.tokens[rows], key_mask[rows], self.model).argmax(dim=-1) == held_out.labels[rows])
        nll = torch.cat(nll).double()
        mean, stderr = nll.mean().item(), (nll.std().item() / math.sqrt(nll.numel()) if nll.numel() > 1 else 0.0)
        return ClassifierResult("exact", mean, stderr, math.exp(mean), held_out.tokens.shape[0], draws, "classifier",
                                torch.cat(right).float().mean().item(), torch.cat(clean).float().mean().item())


def new_classifier(run_dir: Path, data: Path | None, preset: str | None = None, context_len: int | None = None,
                   time_conditioning: bool | None = None, init_from: Path | None = None) -> tuple[ModelConfig, Path]:
    """(network, labels folder) of a new classifier run: ``data`` a JSONL file of labelled texts
    (tokenised into RUN/labels, 10% held out) or a labels folder. The network is ``preset``'s
    (default tiny) with the default tokenizer, or, with ``init_from``, that MDM run's network and
    tokenizer (the classifier of the model it will guide); the label head replaces the LM head."""
    from unmask.data import default_tokenizer

    if data is None:
        raise OptionError("data", "{objective} classifier needs {data}: a JSONL file of {{\"text\": ..., \"label\": ...}} lines")
    if init_from is None:
        tokenizer = default_tokenizer()
        base = ModelConfig.from_name(preset or "tiny", vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id if tokenizer.mask_inside
                                     else -1, time_conditioning=bool(time_conditioning), causal=False)
    else:
        base, tokenizer = _source(init_from, preset, time_conditioning)
    if context_len is not None:
        base = dataclasses.replace(base, context_len=context_len)
    if is_labels_folder(data):
        folder = Path(data)
    else:
        from unmask.checkpoint import run_lock

        with run_lock(run_dir, create=True):  # RUN/labels is the run's: never written over a run that exists
            if (run_dir / "checkpoints").exists():
                raise OptionError("run_dir", "{run_dir} {_dir} already holds a run; pass {resume} to continue it or choose a new folder",
                                  _dir=run_dir)
            folder = prepare_labels(run_dir / "labels", tokenizer, read_labelled(data), max_length=base.context_len)
    return dataclasses.replace(base, labels=folder_labels(folder)), folder


def _source(init_from: Path, preset: str | None, time_conditioning: bool | None):
    """(network without its labels, tokenizer) of a classifier started from the MDM run ``init_from``."""
    from unmask.adaptation import source_config
    from unmask.checkpoint import checkpoint_tokenizer

    if preset is not None or time_conditioning is not None:
        raise OptionError("init_from", "{init_from} gives the network; leave {preset} and {time_conditioning} out")
    source = source_config(init_from)
    if source.causal or source.noise != "mask":
        raise OptionError("init_from", "{init_from} {_path}: a classifier of masked canvases starts from a masked diffusion model, not "
                          "an {_kind} model", _path=str(init_from), _kind="AR" if source.causal else f"{source.noise}-noise")
    try:
        tokenizer = checkpoint_tokenizer(init_from)
    except (UnmaskError, FileNotFoundError):
        raise OptionError("init_from", "{init_from} {_path}: not a run folder with a tokenizer", _path=str(init_from)) from None
    return dataclasses.replace(source, block_causal=0, shift_logits=False, labels=()), tokenizer
