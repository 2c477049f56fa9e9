"""Scores of whole sequences for reward- and energy-guided decoding (docs/sampling.md, 'Reward- and
energy-guided decoding'; docs/algorithms.md, 'Reward- and energy-guided decoding').

A score reads a batch of :class:`Candidates` (the generated tokens of B canvas rows, their prompts and,
on demand, their texts) and returns one float per row. A guide uses it either as a reward r(x), the
target being p(x) exp(r(x) / alpha) (best-of-N, SVDD, SMC), or as a log-density -E(x), the energy
of EDLM (:meth:`Score.log_density`). A spec string names one:

* ``ar:RUN``: an AR run (or an imported AR checkpoint folder). Reward: the mean log-likelihood per
  generated token given ``[EOS ; prompt]``; log-density: the sum (log p_AR(x | prompt), the energy
  EDLM needs, Xu et al. 2024). With the MDM's tokenizer the tokens are scored as they are, otherwise
  the texts are tokenised again with the AR run's own tokenizer.
* ``regex:PATTERN``: 1 when the generated text matches PATTERN in full (Python ``re.fullmatch``), else 0.
  A reward only (0/1 is no log-density).
* ``classifier:RUN:LABEL``: log p(LABEL | x) of a noisy-input classifier run
  (``unmask.classifier.label_log_probs``), read on [EOS ; prompt ; generated text] as it was trained.
* ``python:MODULE:FUNCTION``: ``FUNCTION(texts: list[str]) -> list[float]`` from an importable module
  (the command line and the Python API; a server loads them at startup only, requests name none).

A text ends at the first stop token when the decoding has one (the token is then scored by ``ar:``
as the end of the document, as a judge scores a finished text).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch

from unmask.errors import OptionError

KINDS = ("ar", "regex", "classifier", "python")
AR_BATCH = 64  # rows per forward of an AR score


@dataclass
class Candidates:
    """B sequences to score: ``tokens`` (B, T) the generated tokens (up to and with the first stop
    token when the text was cut there, then padding), ``key_mask`` (B, T) True at those tokens,
    ``prompt_ids`` each row's prompt (the decoding model's token ids), ``stop_token`` the token a
    text ends at (None: none), ``tokenizer`` the decoding model's (needed for texts)."""

    tokens: torch.Tensor
    key_mask: torch.Tensor
    prompt_ids: Sequence[Sequence[int]] = ()
    tokenizer: object | None = None
    stop_token: int | None = None
    _cut: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            self.prompt_ids = [[] for _ in range(self.tokens.shape[0])]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def ids(self, row: int) -> list[int]:
        """Row ``row``'s generated ids (the stop token included when the text ends at it)."""
        return self.tokens[row][self.key_mask[row]].tolist()

    def stopped(self, row: int) -> bool:
        """Whether row ``row``'s text ends at a stop token (its last scored id)."""
        ids = self.ids(row)
        return self.stop_token is not None and bool(ids) and ids[-1] == self.stop_token

    @cached_property
    def texts(self) -> list[str]:
        """The generated texts (the stop token not included); decoded once, on first use."""
        if self.tokenizer is None:
            raise OptionError("reward", "{reward}: a text score needs the decoding model's tokenizer")
        return [self.tokenizer.decode(self.ids(r)[: -1 if self.stopped(r) else None]) for r in range(len(self))]

    @cached_property
    def prompts(self) -> list[str]:
        if self.tokenizer is None:
            raise OptionError("reward", "{reward}: a text score needs the decoding model's tokenizer")
        return [self.tokenizer.decode(list(p)) for p in self.prompt_ids]


class Score:
    """A batched score of whole sequences: ``score(candidates) -> (B,) float64``. ``spec``: what it
    was made from; ``density``: it also defines a log-density (:meth:`log_density`) and can be an energy."""

    spec: str = ""
    density: bool = False

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        raise NotImplementedError

    def log_density(self, candidates: Candidates) -> torch.Tensor:
        """-E(x) (B,) up to a constant; by default the score itself."""
        return self(candidates)


class TokenScore(Score):
    """A score from a function of the generated tokens: ``fn(tokens (B, T), key_mask (B, T)) -> (B,)``
    (the Python API; tests use an oracle's exact log p). ``density``: ``fn`` is a log-density."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], density: bool = True, spec: str = "tokens") -> None:
        self.fn, self.density, self.spec = fn, density, spec

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return torch.as_tensor(self.fn(candidates.tokens, candidates.key_mask)).double().reshape(len(candidates))


class RegexScore(Score):
    """1.0 where the generated text matches ``pattern`` in full, else 0.0."""

    def __init__(self, pattern: str, param: str = "reward") -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as exc:
            raise OptionError(param, "{" + param + "} regex:{_pattern}: not a regular expression ({_why})", _pattern=pattern,
                              _why=exc) from None
        self.spec = f"regex:{pattern}"

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return torch.tensor([float(self.regex.fullmatch(t) is not None) for t in candidates.texts], dtype=torch.float64)


class PythonScore(Score):
    """``function(texts) -> floats`` from an importable module (read as a log-density when an energy)."""

    density = True

    def __init__(self, module: str, function: str, param: str = "reward") -> None:
        self.spec = f"python:{module}:{function}"
        try:
            self.fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise OptionError(param, "{" + param + "} {_spec}: cannot import it ({_why})", _spec=self.spec, _why=exc) from None
        if not callable(self.fn):
            raise OptionError(param, "{" + param + "} {_spec} is not a function", _spec=self.spec)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        values = list(self.fn(candidates.texts))
        if len(values) != len(candidates):
            raise OptionError("reward", "{reward} {_spec} returned {_n} values for {_b} texts", _spec=self.spec, _n=len(values),
                              _b=len(candidates))
        return torch.tensor([float(v) for v in values], dtype=torch.float64)


class ClassifierScore(Score):
    """log p(label | x) of a noisy-input classifier run (``unmask.classifier.label_log_probs``), read
    on each row as the classifier was trained: [EOS ; prompt ; generated text], right-padded (the
    key mask hides the padding)."""

    density = True

    def __init__(self, run: str, label: str, device, param: str = "reward") -> None:
        from unmask.classifier import label_log_probs

        self.spec = f"classifier:{run}:{label}"
        try:
            self.fn = label_log_probs(run, label, device)
        except OptionError as exc:  # the classifier names its own parameters; here they are parts of this spec
            raise OptionError(param, "{" + param + "} {_spec}: {_why}", _spec=self.spec, _why=exc) from None
        self.device = device

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        eos = [] if candidates.tokenizer is None else [candidates.tokenizer.eos_id]
        rows = [eos + list(p) + candidates.ids(r) for r, p in enumerate(candidates.prompt_ids)]
        width = max(map(len, rows))
        tokens = torch.tensor([q + [0] * (width - len(q)) for q in rows], device=self.device)
        key_mask = torch.tensor([[True] * len(q) + [False] * (width - len(q)) for q in rows], device=self.device)
        return torch.as_tensor(self.fn(tokens, key_mask)).double().reshape(len(candidates)).cpu()


class ARLikelihood(Score):
    """log p_AR(generated | EOS, prompt) of an AR run: per generated token (the reward) or summed
    (the log-density, EDLM's -E). Rows longer than the AR model's context keep their last tokens."""

    density = True

    def __init__(self, run: str, device="cpu", param: str = "reward") -> None:
        from unmask.checkpoint import checkpoint_tokenizer, load_model

        self.spec = f"ar:{run}"
        self.model, config = load_model(run, device)
        if not config.model.causal:
            raise OptionError(param, "{" + param + "} ar:{_run} is an MDM checkpoint ({_objective}); give an AR run", _run=run,
                              _objective=config.train.objective)
        self.tokenizer = checkpoint_tokenizer(run)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        total, count = self.log_likelihood(candidates)
        return total / count.clamp(min=1)

    def log_density(self, candidates: Candidates) -> torch.Tensor:
        return self.log_likelihood(candidates)[0]

    def _rows(self, candidates: Candidates) -> list[tuple[list[int], list[int]]]:
        """(context, scored ids) per row in the AR model's tokens."""
        same = candidates.tokenizer is None or getattr(candidates.tokenizer, "fingerprint", None) == self.tokenizer.fingerprint
        if same:
            return [(list(p), candidates.ids(r)) for r, p in enumerate(candidates.prompt_ids)]
        eos = self.tokenizer.eos_id
        texts, prompts = candidates.texts, candidates.prompts
        return [(self.tokenizer.encode(p) if p else [], self.tokenizer.encode(t) + ([eos] if candidates.stopped(r) else []))
                for r, (p, t) in enumerate(zip(prompts, texts))]

    @torch.no_grad()
    def log_likelihood(self, candidates: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of log p over the generated tokens (B,), their count (B,)), float64 on the CPU."""
        rows, ctx, eos = self._rows(candidates), self.model.config.context_len, self.tokenizer.eos_id
        device = next(self.model.parameters()).device
        total, count = torch.zeros(len(rows), dtype=torch.float64), torch.zeros(len(rows), dtype=torch.float64)
        for lo in range(0, len(rows), AR_BATCH):
            part = rows[lo : lo + AR_BATCH]
            seqs = [([eos] + c + s)[-(ctx + 1):] for c, s in part]
            width = max(map(len, seqs))
            x = torch.tensor([q + [eos] * (width - len(q)) for q in seqs], device=device)
            scored = torch.zeros(x.shape, dtype=torch.bool, device=device)
            for i, (q, (_, s)) in enumerate(zip(seqs, part)):
                scored[i, len(q) - min(len(s), len(q) - 1) : len(q)] = True
            logp = self.model(x[:, :-1]).float().log_softmax(dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            total[lo : lo + len(part)] = (logp * scored[:, 1:]).double().sum(dim=1).cpu()
            count[lo : lo + len(part)] = scored[:, 1:].sum(dim=1).double().cpu()
        return total, count


def parse_score(spec: str | Score, param: str = "reward", device="cpu") -> Score:
    """The score a spec names (module docstring); a :class:`Score` is returned as it is. ``param``:
    the parameter that gave it ("reward" or "energy"), which errors name. An energy must define a
    log-density (``ar:``, ``classifier:``, ``python:``)."""
    score = spec if isinstance(spec, Score) else _parse(spec, param, device)
    if param == "energy" and not score.density:
        raise OptionError("energy", "{energy} {_spec} defines no log-density; an energy is ar:RUN, classifier:RUN:LABEL or "
                          "python:MODULE:FUNCTION", _spec=score.spec)
    return score


def _parse(spec: str, param: str, device) -> Score:
    kind, _, rest = str(spec).partition(":")
    if kind not in KINDS or not rest:
        raise OptionError(param, "{" + param + "} {_spec!r} is not a score; give ar:RUN, regex:PATTERN, classifier:RUN:LABEL or "
                          "python:MODULE:FUNCTION", _spec=spec)
    if kind == "ar":
        return ARLikelihood(rest, device, param)
    if kind == "regex":
        return RegexScore(rest, param)
    head, _, tail = rest.rpartition(":")
    if not head or not tail:
        what = "classifier:RUN:LABEL" if kind == "classifier" else "python:MODULE:FUNCTION"
        raise OptionError(param, "{" + param + "} {_spec!r} must read {_what}", _spec=spec, _what=what)
    if kind == "classifier":
        return ClassifierScore(head, tail, device, param)
    return PythonScore(head, tail, param)
