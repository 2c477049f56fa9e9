"""Classifier-based guidance of a masked diffusion model, D-CBG (Schiff et al. 2024, "Simple Guidance
Mechanisms for Discrete Diffusion Models"). docs/algorithms.md, 'Classifier guidance (D-CBG)'.

To sample p(x | y) with an unconditional MDM and a classifier p(y | x_t) of noisy canvases, the
reverse step of every position being filled is tilted by the classifier: under the masking process
the unmasking decision does not depend on y, and the token a masked position i takes is drawn from

    p(x^i = v | x_t, y) = p(x^i = v | x_t) p(y | x_t, x^i = v) / p(y | x_t),

where p(y | x_t, x^i = v) is the classifier at the canvas with position i set to v. With a weight
gamma (p(y | .)^gamma) the guided logits at a wanted position are

    exact:        l_v + gamma log p(y | x_t[i <- v])                                (one classifier
                  call on all |want| x V canvases)
    first-order:  l_v + gamma (g[i, v] - g[i, x_t^i]),  g = d log p(y | x) / d onehot(x) at x_t
                  (one forward and backward per step; Taylor expansion of the exact form)

(constants in v drop out of the softmax). With an exact classifier and gamma = 1 the exact form
makes a sampler that fills one position per step sample p(x | y) exactly. :class:`ClassifierGuide`
applies either to the logits of every MDM sampler (:func:`unmask.sampling.base.predict` calls
:meth:`ClassifierGuide.guide`); ``form="auto"`` uses the exact one while |want| x V canvases fit
``budget``, the first-order one otherwise, and counts the calls of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from unmask.errors import OptionError, check_number, not_one_of

FORMS = ("auto", "exact", "first-order")
EXACT_BUDGET = 1024  # canvases one exact step may score ("auto": more, and the step is first-order; a 4096-token vocabulary always is)


class LabelScorer(Protocol):
    """log p(y | x) of canvases for one label y (:class:`unmask.classifier.LabelScore`, or an exact one in tests)."""

    def __call__(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) log p(y | tokens) of canvases tokens (B, L)."""

    def gradient(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, R) d log p(y | x) / d onehot(x) at tokens (B, L), over the R input ids (MASK included)."""


@dataclass(frozen=True)
class Canvas:
    """The whole canvas of a sampler that sees a window of it (block models): ``tokens`` (B, L')
    laid out with slot = position, ``key_mask`` (B, L') or None, the window starting at column ``start``."""

    tokens: torch.Tensor
    key_mask: torch.Tensor | None
    start: int

    def rows(self, index: torch.Tensor) -> "Canvas":
        return Canvas(self.tokens[index], None if self.key_mask is None else self.key_mask[index], self.start)


@dataclass(frozen=True)
class ClassifierGuide:
    """D-CBG on the logits of the positions a step fills: ``guide(x, want, logits) -> logits``.

    ``score``: log p(y | x) of canvases (and its one-hot gradient for the first-order form);
    ``gamma`` >= 0: the weight of the classifier (p(y | x)^gamma; 0: no guidance); ``form``:
    ``exact``, ``first-order`` or ``auto`` (exact while the step's |want| x V canvases fit
    ``budget``). ``calls`` counts the steps guided by each form (shared by the copies
    :meth:`rows` and :meth:`window` make, so the whole decoding is counted).
    """

    score: LabelScorer
    gamma: float = 1.0
    form: str = "auto"
    budget: int = EXACT_BUDGET
    canvas: Canvas | None = None
    calls: dict = field(default_factory=lambda: {"exact": 0, "first-order": 0})

    def __post_init__(self) -> None:
        check_number("gamma", self.gamma, ">= 0")
        if self.form not in FORMS:
            raise not_one_of("dcbg", self.form, FORMS)
        check_number("budget", self.budget, "> 0")

    def rows(self, index: torch.Tensor) -> "ClassifierGuide":
        """The guide of a subset of rows."""
        return self if self.canvas is None else replace(self, canvas=self.canvas.rows(index))

    def window(self, tokens: torch.Tensor, key_mask: torch.Tensor | None, start: int) -> "ClassifierGuide":
        """The guide of a sampler that sees the columns from ``start`` of the canvas rows ``tokens`` (B, L'),
        laid out with slot = position (``key_mask`` (B, L'): their padding): the classifier still sees them all."""
        return replace(self, canvas=Canvas(tokens, key_mask, start))

    def used(self) -> str:
        """Which form guided the steps so far: exact, first-order, both ("exact+first-order") or none."""
        return "+".join(name for name, n in self.calls.items() if n) or "none"

    def guide(self, x: torch.Tensor, want: torch.Tensor, logits: torch.Tensor, key_mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (N, V) at the N ``want`` (B, L) positions of canvas x (B, L) (row-major order,
        as :func:`unmask.sampling.base.predict` gives them), tilted by gamma log p(y | .).
        ``key_mask``, ``positions`` (B, L): the canvas's padding and rotary positions."""
        if not self.gamma or logits.shape[0] == 0:
            return logits
        if self.canvas is not None:  # a window of the canvas: put it back in its rows
            x, want, key_mask, positions = self._whole(x, want)
        n, vocab = logits.shape
        exact = self.form == "exact" or (self.form == "auto" and n * vocab <= self.budget)
        self.calls["exact" if exact else "first-order"] += 1
        terms = exact_terms(self.score, x, want, vocab, key_mask, positions) if exact else \
            first_order_terms(self.score, x, want, vocab, key_mask, positions)
        return logits + self.gamma * terms.to(logits.dtype)

    def _whole(self, x: torch.Tensor, want: torch.Tensor):
        canvas, w = self.canvas, x.shape[1]
        if canvas.tokens.shape[0] != x.shape[0]:
            raise OptionError("classifier", "{classifier} guidance got {_rows} rows of a window but holds {_canvas} canvas rows",
                              _rows=x.shape[0], _canvas=canvas.tokens.shape[0])
        whole = canvas.tokens.clone()
        whole[:, canvas.start : canvas.start + w] = x
        wanted = torch.zeros_like(whole, dtype=torch.bool)
        wanted[:, canvas.start : canvas.start + w] = want
        return whole, wanted, canvas.key_mask, None


def exact_terms(score: LabelScorer, x: torch.Tensor, want: torch.Tensor, vocab: int, key_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y | x[i <- v]) (N, V) for each of the N ``want`` (B, L) positions i of x (B, L) (row-major)
    and each token v < ``vocab``: one batched classifier call over the N x V canvases."""
    rows, cols = want.nonzero(as_tuple=True)
    n = rows.numel()
    canvases = x[rows][:, None, :].repeat(1, vocab, 1)  # (N, V, L)
    candidates = torch.arange(vocab, device=x.device)[None, :].expand(n, vocab)
    canvases[torch.arange(n, device=x.device)[:, None], torch.arange(vocab, device=x.device)[None, :], cols[:, None]] = candidates
    spread = lambda v: None if v is None else v[rows][:, None, :].expand(n, vocab, -1).reshape(n * vocab, -1)  # noqa: E731
    return score(canvases.reshape(n * vocab, -1), spread(key_mask), spread(positions)).reshape(n, vocab).float()


def first_order_terms(score: LabelScorer, x: torch.Tensor, want: torch.Tensor, vocab: int, key_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """g[i, v] - g[i, x^i] (N, V), g = d log p(y | x) / d onehot(x) at x (B, L), for the N ``want``
    positions i (row-major) and tokens v < ``vocab``: the first-order (Taylor) estimate of
    log p(y | x[i <- v]) - log p(y | x). One gradient over the rows with a wanted position."""
    called = want.any(dim=1)
    pick = lambda v: None if v is None else v[called]  # noqa: E731
    grad = score.gradient(x[called], pick(key_mask), pick(positions))  # (B', L, R)
    at = grad[want[called]]  # (N, R)
    current = at.gather(1, x[want][:, None])  # the token in place now (MASK)
    return (at[:, :vocab] - current).float()
