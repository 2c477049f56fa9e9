"""A classifier of noisy canvases, p(y | x_t): loading a run trained with ``--objective classifier``
and scoring canvases with it. docs/algorithms.md, 'Classifier guidance (D-CBG)'.

The network is the MDM's Transformer with a pooled head (``ModelConfig.labels``), trained on text
masked by the MDM's own forward process (:mod:`unmask.objectives.classifier`), so it scores a
canvas at any masking level: a partly generated sample, MASKs included. Under the masking process
the exact p(y | x_t) depends on the canvas only (which tokens are visible, not on t: the mask
pattern is drawn independently of the text), so the network needs no time input; one initialised
from a time-conditioned MDM is given the canvas's masked fraction.

* :class:`Classifier`: the network and its label names; ``log_probs`` (B, K) of canvases.
* :class:`LabelScore`: log p(label | x) of canvases (B,) for one label, and its gradient with
  respect to the one-hot input (B, L, rows), what first-order guidance needs; it is the
  ``score`` of :class:`unmask.classifier_guidance.ClassifierGuide`.
* :func:`label_log_probs`: the scorer of one label of a run folder, loaded once.
* :func:`with_classifier_guide`: the conditioning of a decoding guided by a classifier run (D-CBG;
  :mod:`unmask.classifier_guidance`), checked against the model it guides, and
  :func:`guidance_report`, what :func:`unmask.generation.generate` reports of it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from unmask.classifier_guidance import ClassifierGuide
from unmask.config import RunConfig
from unmask.errors import OptionError, UnmaskError, not_one_of
from unmask.guidance import network_time
from unmask.sampling.base import Conditioning

SCORE_BATCH = 1024  # canvases per classifier forward (a longer batch is scored in pieces)


class Classifier:
    """A classifier network (``model.config.labels`` non-empty) with its label names; ``run``: the
    RunConfig it was trained with, when loaded from a run (its tokenizer's fingerprint is checked
    against the model it guides)."""

    def __init__(self, model: torch.nn.Module, run: RunConfig | None = None) -> None:
        if not getattr(model.config, "labels", ()):
            raise UnmaskError("the network has no label head (ModelConfig.labels is empty): it is a language model, not a classifier")
        self.model, self.labels, self.run = model, tuple(model.config.labels), run

    @property
    def config(self):
        return self.model.config

    def index(self, label: str) -> int:
        """The class index of ``label``; an OptionError naming ``label`` for a name the classifier does not know."""
        if label not in self.labels:
            raise not_one_of("label", label, self.labels)
        return self.labels.index(label)

    def log_probs(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | x) (B, K) float32 of canvases ``tokens`` (B, L) (MASK anywhere), for every class y.

        ``key_mask`` (B, L): False at padding, which is neither attended to nor pooled; ``positions``
        (B, L): rotary positions (default 0..L-1). Scored in pieces of :data:`SCORE_BATCH` rows.
        """
        out = []
        for start in range(0, tokens.shape[0], SCORE_BATCH):
            part = slice(start, start + SCORE_BATCH)
            out.append(self._forward(tokens[part], _rows(key_mask, part), _rows(positions, part)).float().log_softmax(dim=-1))
        return torch.cat(out) if out else torch.empty((0, len(self.labels)), device=tokens.device)

    def _forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
        time = network_time(self.model, tokens, None, key_mask)  # a time-conditioned classifier: the canvas's masked fraction
        return self.model(tokens, t=time, key_mask=key_mask, positions=positions)

    def score(self, label: str) -> "LabelScore":
        """The scorer of ``label``: log p(label | x) of canvases and its one-hot gradient."""
        return LabelScore(self, self.index(label))


def _rows(value: torch.Tensor | None, index) -> torch.Tensor | None:
    return None if value is None else value[index]


class LabelScore:
    """log p(y | x) of one class y: ``score(tokens (B, L), key_mask=None, positions=None) -> (B,) float32``."""

    def __init__(self, classifier: Classifier, index: int) -> None:
        self.classifier, self.index = classifier, index
        self.label = classifier.labels[index]
        self.calls = 0  # classifier forwards (pieces of SCORE_BATCH rows count one each)
        self.rows = 0  # canvases scored

    @property
    def config(self):
        return self.classifier.config

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += -(-tokens.shape[0] // SCORE_BATCH)
        self.rows += tokens.shape[0]
        return self.classifier.log_probs(tokens, key_mask, positions)[:, self.index]

    def gradient(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """d log p(y | x) / d onehot(x) (B, L, R) float32 at the canvases ``tokens`` (B, L): the
        derivative with respect to entry [i, v] of the one-hot input (R rows: the embedding's, MASK
        included), by the chain rule through the input embedding e_i = onehot_i E:
        g[i, v] = (d log p / d e_i) . E[v]. One forward and one backward per piece of rows."""
        model = self.classifier.model
        parts = []
        for start in range(0, tokens.shape[0], SCORE_BATCH):
            part = slice(start, start + SCORE_BATCH)
            parts.append(self._gradient(model, tokens[part], _rows(key_mask, part), _rows(positions, part)))
        self.calls += len(parts)
        self.rows += tokens.shape[0]
        return torch.cat(parts)

    def _gradient(self, model, tokens: torch.Tensor, key_mask: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def leaf(module, args, output):  # the embeddings become the leaf the gradient is taken at
            captured.append(output.detach().requires_grad_(True))
            return captured[-1]

        handle = model.embed.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logp = self.classifier._forward(tokens, key_mask, positions).float().log_softmax(dim=-1)[:, self.index]
                (grad,) = torch.autograd.grad(logp.sum(), captured[0])
        finally:
            handle.remove()
        return grad.float() @ model.embed.weight.detach().float().T


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> Classifier:
    """The classifier of a run folder (or checkpoint folder) trained with ``--objective classifier``, in eval mode on ``device``."""
    from unmask.checkpoint import load_model

    model, config = load_model(run_dir, device, weights=weights)
    if not config.model.labels:
        raise OptionError("classifier", "{classifier} {_run} is a language model (objective {_objective}), not a classifier; train one "
                          "with {objective} classifier", _run=str(run_dir), _objective=config.train.objective)
    return Classifier(model, config)


def label_log_probs(run_dir: str | Path, label: str, device: str | torch.device = "cpu") -> Callable[..., torch.Tensor]:
    """log p(label | x) of canvases by the classifier of ``run_dir`` (loaded once, here):
    ``score(tokens (B, L) LongTensor, key_mask (B, L) bool or None) -> (B,) float32``.

    Tokens may hold MASK anywhere (the classifier was trained on masked canvases); the result is
    on the classifier's device. The returned :class:`LabelScore` also gives the one-hot gradient.
    """
    return load_classifier(run_dir, device).score(label)


def with_classifier_guide(cond: Conditioning | None, canvas: torch.Tensor, run: RunConfig, device, classifier=None, label: str | None = None,
                          gamma: float | None = None, dcbg: str = "auto") -> Conditioning | None:
    """``cond`` with D-CBG guidance toward ``label`` by ``classifier`` (a run folder or a
    :class:`Classifier`) at weight ``gamma`` (default 1) in the form ``dcbg`` (auto, exact,
    first-order), for decoding ``canvas`` (B, W) with the MDM of ``run``; ``cond`` itself without a
    classifier. Refused: guidance options without a classifier, an AR or uniform-noise model, a
    classifier of another vocabulary or tokenizer, a canvas longer than the classifier's context."""
    if classifier is None:
        for name, value in (("label", label), ("gamma", gamma), ("dcbg", None if dcbg == "auto" else dcbg)):
            if value is not None:
                raise OptionError(name, f"{{{name}}} is an option of classifier guidance; give {{classifier}} too, or leave it out")
        return cond
    if run.model.causal or run.model.noise != "mask":
        raise OptionError("classifier", "{classifier} guides the samplers of a masked diffusion model; this checkpoint is {_kind}",
                          _kind="an AR model" if run.model.causal else f"a {run.model.noise}-noise model")
    if label is None:
        raise OptionError("label", "{classifier} guidance needs {label}: the class the samples are steered toward")
    loaded = classifier if isinstance(classifier, Classifier) else load_classifier(classifier, device)
    _check_pair(loaded, run, canvas.shape[1], classifier)
    guide = ClassifierGuide(loaded.score(label), 1.0 if gamma is None else gamma, dcbg)
    return replace(cond or Conditioning(), classifier_guide=guide)


def _check_pair(classifier: Classifier, run: RunConfig, width: int, name) -> None:
    """Refuse a classifier that cannot read the canvases of the model of ``run`` (``width`` columns)."""
    mine, theirs = classifier.config, run.model
    fingerprint = None if classifier.run is None else classifier.run.tokenizer_fingerprint
    if (mine.vocab_size, mine.mask_id) != (theirs.vocab_size, theirs.mask_id):
        raise OptionError("classifier", "{classifier} {_name} reads a vocabulary of {_v} (MASK {_m}), the model {_mv} (MASK {_mm}); train "
                          "the classifier with {init_from} the model it guides", _name=str(name), _v=mine.vocab_size, _m=mine.mask_id,
                          _mv=theirs.vocab_size, _mm=theirs.mask_id)
    if fingerprint and run.tokenizer_fingerprint and fingerprint != run.tokenizer_fingerprint:
        raise OptionError("classifier", "{classifier} {_name} was trained with another tokenizer than the model's (fingerprint {_f}, the "
                          "model's {_mf}); train it with {init_from} the model it guides", _name=str(name), _f=fingerprint,
                          _mf=run.tokenizer_fingerprint)
    if width > mine.context_len:
        raise OptionError("classifier", "{classifier} {_name} reads {_ctx} tokens, fewer than the canvas of {_w} (EOS, prompt and the "
                          "generated tokens); shorten the canvas or train the classifier with a longer context", _name=str(name),
                          _ctx=mine.context_len, _w=width)


def guidance_report(cond: Conditioning | None) -> dict:
    """What a D-CBG decoding adds to :func:`unmask.generation.generate`'s result: {"dcbg": {label,
    gamma, form (the option), used (the form(s) that guided: exact, first-order or both), steps
    (guided calls per form), classifier_rows (canvases the classifier scored)}}; nothing unguided."""
    guide = None if cond is None else cond.classifier_guide
    if guide is None:
        return {}
    return {"dcbg": {"label": guide.score.label, "gamma": guide.gamma, "form": guide.form, "used": guide.used(), "steps": dict(guide.calls),
                     "classifier_rows": guide.score.rows}}
