"""A decoding's guide, riding in its conditioning (``Conditioning.steering``), as a constraint does:
:func:`steer` puts it there, and the one decoding path (:meth:`unmask.sampling.spec.SamplerSpec.run`)
hands the decoding to :meth:`Steering.decode`. docs/sampling.md, 'Reward- and energy-guided decoding'.

:meth:`Steering.decode` makes the guide's rows (N particles per prompt row for best-of and SMC, one
for SVDD and EDLM), binds the decoding's own pieces (a score meter, the guide's generator, each
row's prompt, the stop token) and decodes them through the same path with the sampler wrapped by
:func:`unmask.steering.guide.guided`, so policies, caches, classifier-free guidance and blocks
compose with every guide. Then it keeps one row per prompt row. The guide's generator is seeded from
the decoding's seed, and the decoding's own generator draws exactly what the unguided sampler draws
over the same rows: guided decoding is reproducible from the seed. Rows decode to the end (no row
leaves the batch at a stop token; a text still ends at its first stop token).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.errors import OptionError
from unmask.sampling.base import Conditioning, SampleOutput, SamplerState
from unmask.steering.guide import Guide, guided
from unmask.steering.meter import ScoreMeter
from unmask.steering.registry import GUIDES, guide_config, guide_named
from unmask.steering.rewards import Candidates, Score, parse_score

SIDE_SEED = 0x5EED_0F_6D1DE  # mixed into the decoding's seed for the guide's generator


@dataclass
class SteeredOutput(SampleOutput):
    """A guided decoding's output: the kept rows, and the score's calls, sequences and seconds
    (``nfe`` and ``row_nfe`` count the MDM's network calls, the guide's estimates included)."""

    score_calls: int = 0
    scored_sequences: int = 0
    score_seconds: float = 0.0


@dataclass(frozen=True)
class Steering:
    """A guide (its registry entry and typed config) with its score; the other fields are bound by
    :meth:`decode` for one decoding: the score ``meter``, the guide's generator ``side``, rows per
    prompt row ``group``, the generation start column, the stop token (``end``, else the decoding's
    own), each row's prompt ids, the MASK id and, under block decoding, the rows' generated ``region`` (R, L) and the ``full`` rows
    of which the sampler sees the columns from ``offset`` on."""

    guide: Guide
    config: object
    score: Score
    tokenizer: object | None = None
    meter: ScoreMeter | None = None
    side: torch.Generator | None = None
    group: int = 1
    start: int = 0
    stop_token: int | None = None
    prompt_ids: tuple | None = None
    mask_id: int = -1
    end: int | None = None
    region: torch.Tensor | None = None
    full: torch.Tensor | None = None
    offset: int = 0

    @property
    def bound(self) -> bool:
        """Bound to a decoding (by :meth:`decode`)."""
        return self.meter is not None

    def wrap(self, sampler):
        """``sampler`` with this guide around its step (:func:`unmask.steering.guide.guided`)."""
        return guided(sampler)

    def rows(self, index: torch.Tensor) -> "Steering":
        """The steering of a subset of rows."""
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        ids = None if self.prompt_ids is None else tuple(self.prompt_ids[i] for i in index.tolist())
        return replace(self, prompt_ids=ids, region=pick(self.region), full=pick(self.full))

    def placed(self, region: torch.Tensor) -> "Steering":
        """The steering of rows laid out anew, ``region`` (R, L) marking each row's generated columns."""
        return replace(self, region=region, full=None, offset=0)

    def window(self, full: torch.Tensor, offset: int) -> "Steering":
        """The steering of a sampler that sees the columns of ``full`` (R, L) from ``offset`` on."""
        return replace(self, full=full, offset=offset)

    def candidates(self, tokens: torch.Tensor, rows: torch.Tensor | None = None, final: bool = False) -> Candidates:
        """What the score reads of ``tokens`` (R', w), the sampler's rows (``final``: finished canvas
        rows); ``rows`` (R',): the row of this steering each belongs to. A text is the row's generated
        columns up to its first MASK (a block model's later blocks) and up to and with its first stop token."""
        rows = torch.arange(tokens.shape[0], device=tokens.device) if rows is None else rows
        whole = tokens
        if not final and self.full is not None:
            whole = self.full[rows].clone()
            whole[:, self.offset : self.offset + tokens.shape[1]] = tokens
        cols = torch.arange(whole.shape[1], device=whole.device)
        region = self.region[rows] if self.region is not None and not final else (cols >= self.start)[None].expand(len(rows), -1)
        n = int(region[0].sum())
        gen = whole.gather(1, region.long().argmax(dim=1, keepdim=True) + torch.arange(n, device=whole.device))
        key = (gen == self.mask_id).cumsum(dim=1) == 0
        if self.stop_token is not None:
            stop = (gen == self.stop_token).long()
            key &= stop.cumsum(dim=1) - stop == 0
        prompts = [[] for _ in rows] if self.prompt_ids is None else [self.prompt_ids[i] for i in rows.tolist()]
        return Candidates(torch.where(key, gen, 0), key, prompts, self.tokenizer, self.stop_token)

    def decode(self, run, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None, callback,
               start: int, stop_token: int | None) -> SteeredOutput:
        """Decode canvas x (B, L) with the guide: ``run(model, x, generator, cond, callback, start,
        stop_token) -> SampleOutput`` is the unguided decoding path."""
        cond = cond or Conditioning()
        if cond.constraint is not None and self.guide.name == "edlm":
            raise OptionError("guide", "{guide} edlm cannot be combined with a constraint: its candidates would replace the "
                              "constrained tokens; use best-of, svdd or smc")
        n, b = self.guide.group(self.config), x.shape[0]
        index = torch.arange(b, device=x.device).repeat_interleave(n)
        prompts = prompt_ids(x, cond, start)
        end = self.end if self.end is not None else stop_token
        bound = replace(self, meter=ScoreMeter(), side=side_generator(generator), group=n, start=start, stop_token=end,
                        prompt_ids=tuple(prompts[i] for i in index.tolist()), mask_id=model.config.mask_id)
        work = replace(cond.rows(index), steering=bound)
        view = None if callback is None else (lambda s: callback(SamplerState(s.tokens[::n], step=s.step, nfe=s.nfe)))
        out = run(model, x[index], generator, work, view, start, None)
        kept = self.guide.choose(bound, out.tokens).to(x.device)
        row_nfe = None if out.row_nfe is None else out.row_nfe.view(b, n).sum(dim=1)
        return SteeredOutput(out.tokens[kept], out.nfe, out.steps, row_nfe, **bound.meter.report())


def prompt_ids(x: torch.Tensor, cond: Conditioning, start: int) -> list[list[int]]:
    """Each row's prompt (the ``prompt_mask`` tokens before ``start``; none without a prompt mask)."""
    if cond.prompt_mask is None:
        return [[] for _ in range(x.shape[0])]
    given = cond.prompt_mask[:, :start]
    return [row[keep].tolist() for row, keep in zip(x[:, :start], given)]


def side_generator(generator: torch.Generator) -> torch.Generator:
    """The guide's generator, on the decoding generator's device, seeded from its seed (which it
    leaves as it was)."""
    return torch.Generator(device=generator.device).manual_seed((generator.initial_seed() ^ SIDE_SEED) % (1 << 63))


def steer(cond: Conditioning | None, guide, reward: str | Score | None = None, energy: str | Score | None = None,
          tokenizer=None, device="cpu", end: int | None = None, **options) -> Conditioning | None:
    """``cond`` with a guide: ``guide`` a name of :data:`~unmask.steering.registry.GUIDES` with its
    ``options`` (particles, alpha, ess, window; None: the guide's default) or a guide config;
    ``reward`` (best-of, svdd, smc) or ``energy`` (edlm) a score spec or a :class:`Score`;
    ``tokenizer``: the decoding model's, for text scores; ``device``: where a score's model runs;
    ``end``: the token a scored text ends at (None: the decoding's stop token, if any).
    ``guide`` None: ``cond`` unchanged, and any guide option given is refused by name."""
    given = {"reward": reward, "energy": energy, **options}
    if guide is None:
        named = [key for key, value in given.items() if value is not None]
        if named:
            raise OptionError(named[0], "{" + named[0] + "} needs a {guide} (best-of, svdd, smc or edlm)")
        return cond
    by_config = {g.config: g for g in GUIDES.values()}
    if type(guide) in by_config:
        entry, config = by_config[type(guide)], guide
        if any(value is not None for value in options.values()):
            raise OptionError(next(k for k, v in options.items() if v is not None), "give the guide's options in its config")
    else:
        entry, config = guide_named(guide), guide_config(guide, **options)
    other = "energy" if entry.score == "reward" else "reward"
    if given[other] is not None:
        raise OptionError(other, "{" + other + "}: {guide} {_guide} takes a {" + entry.score + "}", _guide=entry.name)
    if given[entry.score] is None:
        raise OptionError(entry.score, "{guide} {_guide} needs a {" + entry.score + "}", _guide=entry.name)
    score = parse_score(given[entry.score], entry.score, device)
    return replace(cond or Conditioning(), steering=Steering(entry, config, score, tokenizer, end=end))

