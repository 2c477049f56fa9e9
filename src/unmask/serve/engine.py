"""The serving engine: a checkpoint, the checks a request passes before it is decoded, its canvas,
and its decoding (run in a worker thread against the scheduler's batching proxy).

A request's constraint (structured output) is compiled for the checkpoint's tokenizer by the
process's :data:`~unmask.serve.compiler.COMPILER` (each constraint once, within
``Limits.compile_seconds``) and rides in its conditioning; its rows are decoded beside rows with
other constraints or none.

A guided request (``guide``) names one of the rewards the server was started with (``unmask serve
--reward NAME=SPEC``) as its reward or energy, never a spec, code or a file.

A request's result depends on the request alone (its prompts, settings and seed), never on the
requests decoded beside it: its canvas is built from it alone (left-padded to a multiple of
``Limits.bucket`` columns so that requests of different lengths share forwards), it has its own
seeded generator, and the scheduler gives it the same logits as a forward of its own.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.compiled import compile_for_decoding
from unmask.constraints import Constraint
from unmask.constraints.decode import constrain
from unmask.device import pick_device
from unmask.errors import OptionError, check_number
from unmask.sampling.base import Conditioning, SamplerState
from unmask.sampling.canvas import INFILL, infill_canvas, infill_ids, make_canvas
from unmask.sampling.decoding import Decoding, check_kind, decoding_for, sampling_generator
from unmask.serve.batcher import Scheduler, Ticket
from unmask.serve.compiler import COMPILER
from unmask.serve.schemas import field_of
from unmask.steering.rewards import Score
from unmask.steering.steering import steer


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error with the field (``param``) at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def refused(exc: OptionError) -> RequestError:
    """A decoding parameter the library refused, named by its request field."""
    return RequestError(exc.spelled(field_of), field_of(exc.param))


@dataclass(frozen=True)
class Limits:
    """What one server accepts: new tokens, choices, prompts and steps per request; requests
    decoded together (``max_active``) and waiting (``max_queue``); seconds per request from arrival
    (``timeout``); canvases are left-padded to a multiple of ``bucket`` columns; request bodies
    are read up to ``max_body_bytes`` (1 MiB by default: far more text than a context holds, and a
    bound on what tokenising a request costs); a constraint compiles in at most ``compile_seconds``
    (outlines-core's compile time grows with the pattern's automaton times the vocabulary); a guided
    request takes at most ``max_particles`` particles (or candidates) per row."""

    max_tokens: int = 256
    max_n: int = 8
    max_prompts: int = 8
    max_steps: int = 1024
    max_active: int = 16
    max_queue: int = 64
    timeout: float = 300.0
    bucket: int = 16
    max_body_bytes: int = 1 << 20
    compile_seconds: float = 20.0
    max_particles: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            check_number(f.name, getattr(self, f.name), "> 0")


@dataclass
class Params:
    """One generation request, as the HTTP layer hands it over (None: not given). ``sampling``: the
    sampler options it gives, by their library names (:func:`unmask.serve.schemas.sampler_options`);
    ``constraint``: what its text must match (:func:`unmask.serve.schemas.constraint_of`); ``guiding``:
    its guide, the names of the server's rewards it uses and the guide's options
    (:func:`unmask.serve.schemas.guide_options`)."""

    prompts: list[str]
    max_tokens: int = 16
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sampling: dict = field(default_factory=dict)
    infill: bool = False
    constraint: Constraint | None = None
    guiding: dict = field(default_factory=dict)


@dataclass
class Job:
    """A checked request, ready to decode: the canvas x (R, L) of R = prompts x n rows, its
    conditioning, the generation region [start, L) (AR: the region is appended), and how to decode."""

    params: Params
    x: torch.Tensor
    cond: Conditioning
    start: int
    length: int  # columns of the generation region
    seed: int
    decoding: Decoding
    prompt_tokens: int
    stop_token: int | None = None
    committed_at: list[list[int]] = field(default_factory=list)  # per row and region column: the step it was filled (-1: not yet)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int  # generated tokens in the text


class ReleasingTokenizer:
    """A tokenizer whose ``encode`` lets other threads run meanwhile: the ``tokenizers`` library
    holds Python's GIL in ``encode`` (a second per megabyte of text, during which the event loop
    could not even answer /health) but releases it in ``encode_batch``. Everything else is the
    tokenizer's own."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode_batch([text])[0]


def cut_text(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class Engine:
    """A loaded checkpoint served to many requests at once."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", limits: Limits = Limits(), name: str | None = None,
                 rewards: dict[str, Score] | None = None, compile: bool = False) -> None:
        """``rewards``: the scores requests may name as their reward or energy (:mod:`unmask.steering`);
        ``compile``: the network runs compiled at bucketed shapes (:mod:`unmask.compiled`; its ``stats``
        count the calls), each shape compiled when a forward first meets it."""
        self.device = pick_device(device)
        model, self.config = load_model(checkpoint, self.device)
        self.model = compile_for_decoding(model, compile)
        self.tok = ReleasingTokenizer(checkpoint_tokenizer(checkpoint))
        self.limits = limits
        self.causal = self.config.model.causal
        self.context = self.config.model.context_len
        path = Path(checkpoint).resolve()
        self.name = name or (path.parent.parent.name if path.parent.name == "checkpoints" else path.name)
        self.scheduler = Scheduler(self.model)
        self.rewards = dict(rewards or {})
        self.pieces = [self.tok.decode([i]) for i in range(self.tok.vocab_size)]

    def warm_up(self, batches: tuple[int, ...] = (1,)) -> float:
        """Decode the default request (no prompt, the default ``max_tokens`` and sampler) once per
        batch size of ``batches``, through the scheduler as a request is, so that a compiled network
        (``compile``) compiles those shapes before the first request meets them; the seconds it took."""
        started = time.perf_counter()
        for rows in batches:
            self.run(self.prepare(Params([""], max_tokens=min(Params.max_tokens, self.limits.max_tokens), n=rows, seed=0)), Ticket())
        return time.perf_counter() - started

    # ---- checks and canvases -------------------------------------------------------------
    def prepare(self, p: Params) -> Job:
        """Check a request against the limits and the model and build its canvas; raises RequestError."""
        lim, steps = self.limits, p.sampling.get("steps")
        if not p.prompts:
            raise RequestError("prompt must be a string or a non-empty list of strings", "prompt")
        if len(p.prompts) > lim.max_prompts:
            raise RequestError(f"prompt: {len(p.prompts)} prompts in one request; this server takes at most {lim.max_prompts}", "prompt")
        if not 1 <= p.n <= lim.max_n:
            raise RequestError(f"n={p.n} must be between 1 and {lim.max_n} on this server", "n")
        if not 1 <= p.max_tokens <= lim.max_tokens:
            raise RequestError(f"max_tokens={p.max_tokens} must be between 1 and {lim.max_tokens} on this server", "max_tokens")
        if steps is not None and not 1 <= steps <= lim.max_steps:
            raise RequestError(f"steps={steps} must be between 1 and {lim.max_steps} on this server", "steps")
        particles = p.guiding.get("particles")
        if particles is not None and not 1 <= particles <= lim.max_particles:
            raise RequestError(f"particles={particles} must be between 1 and {lim.max_particles} on this server", "particles")
        if len(p.stop) > 4 or any(not s for s in p.stop):
            raise RequestError("stop takes at most 4 non-empty strings", "stop")
        if p.stop and p.constraint is not None:
            raise RequestError("stop cannot be combined with a constraint (response_format, regex or choice): a text cut at a stop "
                               "string would no longer match it", "stop")
        seed = p.seed if p.seed is not None else secrets.randbits(62)
        try:
            return self._prepare(p, seed)
        except OptionError as exc:  # the decoding path names the parameter; the client knows it by its field
            raise refused(exc) from None

    def _prepare(self, p: Params, seed: int) -> Job:
        """The job of a checked request: its canvas and its decoding, both from the decoding path."""
        model = self.config.model
        check_kind(model, p.sampling, p.max_tokens, infill=p.infill)  # the options this kind of model takes, first
        x, cond, start, prompt_tokens = self._infill_canvas(p) if p.infill else self._prompt_canvas(p)
        length = p.max_tokens if self.causal else x.shape[1] - start
        decoding = decoding_for(model, length, p.sampling, self.config.train.schedule, infill=p.infill)
        decoding.check(model, length, cond)
        if p.constraint is not None:  # one automaton for the request's rows; a region it cannot fill is refused now
            automaton = COMPILER(p.constraint, self.tok.tok, self.limits.compile_seconds)
            cond = constrain(cond, x, start, (automaton,) * x.shape[0], p.max_tokens if self.causal else None,
                             "prompt" if p.infill else "length")
        cond = self._steer(cond, p)
        decoding.check_steering(cond)
        # with blocks (a block model's, or semi-autoregressive ones) a row that produced EOS stops early
        blocks = (model.block_causal or p.sampling.get("block_len")) and not p.infill
        job = Job(p, x, cond, start, length, seed, decoding, prompt_tokens * p.n, self.tok.eos_id if blocks else None)
        if self.causal:
            job.committed_at = [[-1] * p.max_tokens for _ in range(x.shape[0])]
        else:
            job.committed_at = ((x[:, start:] != self.tok.mask_id).long() - 1).tolist()  # given template text: step 0; MASK: -1
        return job

    def _steer(self, cond: Conditioning, p: Params) -> Conditioning:
        """The request's guide in its conditioning, its reward or energy one of the server's, by name
        (a request never names code or a file); its text ends at EOS as the client's does."""
        given = dict(p.guiding)
        for key in ("reward", "energy"):
            name = given.get(key)
            if name is not None and name not in self.rewards:
                known = ", ".join(map(repr, self.rewards)) or "none (unmask serve --reward NAME=SPEC configures them)"
                raise RequestError(f"{key} {name!r} is not a reward of this server; its rewards: {known}", key)
            given[key] = None if name is None else self.rewards[name]
        return steer(cond, given.pop("guide", None), given.pop("reward"), given.pop("energy"), self.tok.tok, self.device,
                     None if p.infill else self.tok.eos_id, **given)

    def _check_room(self, prompt_len: int, new: int, room: int, what: str = "prompt") -> None:
        """A canvas holds a separator, the prompt and ``new`` generated tokens in ``room`` positions."""
        total = 1 + prompt_len + new
        if total > room:
            parts = f"{what} of {prompt_len} tokens + 1 separator" + (f" + max_tokens {new}" if new else "")
            fed = "" if room == self.context else f" (a context of {self.context}; the last new token is never fed back)"
            raise RequestError(f"{parts} = {total} positions; this model takes at most {room}{fed}: shorten the {what}"
                               + (" or lower max_tokens" if new else ""), "prompt" if 1 + prompt_len >= room else "max_tokens")

    def _layout(self, total: int, room: int) -> dict:
        """The canvas keywords of a request's rows of ``total`` columns: left-padded to a multiple of
        the bucket width (within ``room`` columns), so that requests of different lengths share
        forwards, with the key mask and positions always given (the same keywords in every forward)."""
        bucket = self.limits.bucket
        return {"width": max(total, min(-(-total // bucket) * bucket, room)), "explicit": True, "device": self.device}

    def _prompt_canvas(self, p: Params) -> tuple[torch.Tensor, Conditioning, int, int]:
        """n rows per prompt [PAD.. ; EOS ; prompt ; MASK x max_tokens] (AR: without the MASKs, which
        it appends); returns (x, cond, start of the region, prompt tokens)."""
        ids = [self.tok.encode(t) if t else [] for t in p.prompts]
        longest, new = max(map(len, ids)), 0 if self.causal else p.max_tokens
        room = self.context + int(self.causal)  # the AR model never feeds its last new token back
        self._check_room(longest, p.max_tokens, room)
        layout = self._layout(1 + longest + new, room - (p.max_tokens - new))
        x, cond, start = make_canvas([i for i in ids for _ in range(p.n)], new, self.tok.mask_id, self.tok.pad_id, self.tok.eos_id, **layout)
        return x, cond, start, sum(map(len, ids))

    def _infill_canvas(self, p: Params) -> tuple[torch.Tensor, Conditioning, int, int]:
        """n rows [PAD.. ; EOS ; template]; returns (x, cond, start of the region, given template tokens)."""
        if len(p.prompts) != 1:
            raise RequestError("infill takes one prompt: a template with [MASK] or [MASK:n] spans", "prompt")
        if p.sampling.get("block_len") is not None:
            raise RequestError("block_length cannot be combined with infill (the spans are filled together)", "block_length")
        if p.stop:
            raise RequestError("stop cannot be combined with infill: the answer is the filled template, not a continuation to cut", "stop")
        template = p.prompts[0]
        if not INFILL.search(template):
            raise RequestError("infill: the prompt has no [MASK] or [MASK:n] span to fill", "prompt")
        ids = infill_ids(template, self.tok)
        holes = ids.count(self.tok.mask_id)
        if not 1 <= holes <= self.limits.max_tokens:
            raise RequestError(f"infill: the spans ask for {holes} tokens; this server fills 1 to {self.limits.max_tokens}", "prompt")
        self._check_room(len(ids), 0, self.context, "prompt template")
        x, cond, start = infill_canvas(ids, self.tok, p.n, **self._layout(1 + len(ids), self.context))
        return x, cond, start, len(ids) - holes

    # ---- decoding (in a worker thread) ----------------------------------------------------
    def region(self, job: Job, tokens: torch.Tensor) -> list[list[int]]:
        """The generation region of every row of a canvas (AR: MASK where not yet generated)."""
        part = tokens[:, job.start :].tolist()
        if self.causal:
            return [r + [self.tok.mask_id] * (job.length - len(r)) for r in part]
        return part

    def frame(self, job: Job, state: SamplerState, started: float) -> dict:
        """The canvas after a step: per row the token pieces (None: still MASK) and the step each was filled at."""
        rows = self.region(job, state.tokens)
        mask = self.tok.mask_id
        out = []
        for r, (ids, at) in enumerate(zip(rows, job.committed_at)):
            for i, token in enumerate(ids):
                if token != mask and at[i] < 0:
                    at[i] = state.step
            out.append({"index": r, "tokens": [None if t == mask else self.pieces[t] if t < len(self.pieces) else "" for t in ids],
                        "committed_at": list(at)})
        return {"step": state.step, "nfe": state.nfe, "seconds": time.perf_counter() - started, "ids": rows, "choices": out}

    def run(self, job: Job, ticket: Ticket, on_frame=None) -> tuple[list[Choice], dict]:
        """Decode a job to the end (blocking; ``on_frame(frame)`` after every step). Raises
        :class:`~unmask.serve.batcher.Cancelled` when the ticket is cancelled or times out."""
        started = time.perf_counter()
        model = self.scheduler.join(ticket)
        try:
            generator = sampling_generator(model, job.seed)
            callback = None if on_frame is None else (lambda state: on_frame(self.frame(job, state, started)))
            with torch.no_grad():
                out = job.decoding.run(model, job.x, generator, job.cond, callback, start=job.start, stop_token=job.stop_token)
        finally:
            self.scheduler.leave(ticket)
        choices = [self.finish(job, ids) for ids in self.region(job, out.tokens)]
        return choices, {"nfe": out.nfe, "steps": out.steps, "seconds": time.perf_counter() - started, "seed": job.seed}

    def text_of(self, job: Job, ids: list[int], final: bool) -> tuple[str, str | None, int]:
        """(text, finish_reason or None, tokens) of a row's region. Not final: the text that can no
        longer change (up to the first MASK; a piece that could begin a stop string is held back;
        none from a uniform-state model, whose every token may change until the last step)."""
        if not final and self.config.model.noise == "uniform":
            return "", None, 0
        tok = self.tok
        if job.params.infill:
            text, tokens = tok.decode(ids, mask_text=""), sum(1 for c in job.committed_at[0] if c != 0)
            open_ = tok.mask_id in ids
            if open_ and not final:
                text = tok.decode(ids[: ids.index(tok.mask_id)])
            return text, (None if open_ and not final else "length"), tokens
        eos = tok.eos_id
        mask_at = ids.index(tok.mask_id) if tok.mask_id in ids else len(ids)
        end = ids.index(eos) if eos in ids[:mask_at] else None
        settled = ids[: end if end is not None else mask_at]
        text, stopped = cut_text(tok.decode(settled), job.params.stop)
        if stopped or end is not None:
            return text, "stop", len(tok.encode(text)) if stopped else len(settled)
        if final or mask_at == len(ids):
            return text, "length", len(settled)
        hold = max((len(s) for s in job.params.stop), default=1) - 1
        text = text[: len(text) - hold] if hold else text
        while text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            text = text[:-1]
        return text, None, len(settled)

    def finish(self, job: Job, ids: list[int]) -> Choice:
        text, reason, tokens = self.text_of(job, ids, final=True)
        return Choice(text, reason or "length", tokens)
