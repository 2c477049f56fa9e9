"""Text in, text out from a checkpoint: :func:`generate` loads it, lays out the prompts (of different
lengths) or an infilling template, decodes through the one decoding path
(:mod:`unmask.sampling.decoding`) and returns the decoded samples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.classifier import guidance_report, with_classifier_guide
from unmask.compiled import compile_for_decoding
from unmask.constraints.decode import automata_for, constrain
from unmask.device import pick_device
from unmask.errors import OptionError
from unmask.sampling.base import Conditioning, StepCallback
from unmask.sampling.canvas import infill_canvas, infill_ids, make_canvas, trim_at_eos
from unmask.sampling.decoding import decoding_for, sampling_generator
from unmask.steering.registry import NUMBERS as GUIDE_NUMBERS
from unmask.steering.steering import SteeredOutput, steer


def generate(
    checkpoint: str | Path,
    prompt: str = "",
    num_samples: int = 2,
    length: int = 64,
    *,
    seed: int = 0,
    device: str = "auto",
    prompts: Sequence[str] | None = None,
    infill: str | None = None,
    stop_at_eos: bool = False,
    kv_cache: bool | None = None,
    callback: StepCallback | None = None,
    weights: str = "auto",
    constraint=None,
    classifier=None, label: str | None = None, gamma: float | None = None, dcbg: str = "auto",
    guide=None, reward=None, energy=None, compile: bool = False,
    **options,
) -> dict:
    """Samples from a checkpoint, each canvas starting with EOS (the document separator every
    document follows in training, also used by the lm-eval adapter), then the prompt; the
    generated tokens and text exclude it.

    ``options`` are the sampler options of the table (:mod:`unmask.sampling.options`; the
    command-line flags of every sampling command): sampler, steps, block_len, cache, cache_refresh,
    k, score, allocation, tau, cfg_scale, temperature, top_k, top_p, precision (and schedule). None
    or absent means the sampler's own default (threshold decodes at temperature 0, the others at 1).
    MDM: any sampler (default ancestral) over [EOS ; prompt ; MASK x length] (or [EOS ; ``infill``
    template]); ``steps`` defaults to ``length``; a block model decodes with its exact cache.
    AR: token by token after [EOS ; prompt], with an exact KV cache unless ``kv_cache=False``;
    temperature, top_k, top_p, precision and stop_at_eos apply, MDM-only options are refused (an
    error names them) and ``steps``, if given, must equal ``length``.

    ``classifier`` (a run trained with objective classifier), ``label``, ``gamma``, ``dcbg``: D-CBG,
    every MDM sampler's draws tilted by p(label | x)^gamma, exactly or to first order (auto, exact,
    first-order; :mod:`unmask.classifier_guidance`); the result then holds "dcbg" (the form used).

    ``prompts`` gives one prompt per sample (different lengths allowed); otherwise ``prompt`` is
    repeated ``num_samples`` times. ``constraint``: structured output, a
    :class:`~unmask.constraints.Constraint` (regex, JSON Schema, choice, JSON object) for every
    sample or one per sample (None: free); the generated text matches it (up to its first EOS,
    after which only EOS follows), and a length too short for it is refused before decoding.

    ``guide``: best-of, svdd, smc (with a ``reward``) or edlm (with an ``energy``), a score spec or a
    :class:`~unmask.steering.Score`, its options (particles, alpha, ess, window) among ``options``
    (:mod:`unmask.steering`); it adds "guide", "score_calls", "score_seconds", "network_rows". ``compile``: the network runs
    compiled (:mod:`unmask.compiled`), and "compiled" counts its calls. Returns {"samples": [{"tokens", "text"}], "nfe", "steps", "seconds", ...}.
    """
    if num_samples < 1:
        raise OptionError("num_samples", "{num_samples}={_n} must be a positive integer", _n=num_samples)
    if infill is not None and stop_at_eos:
        raise OptionError("stop_at_eos", "{stop_at_eos} cannot be combined with {infill}: an EOS inside a span would cut off the fixed "
                          "text after it")
    if length < 1:
        raise OptionError("length", "{length}={_n} must be a positive integer", _n=length)
    model, cfg, dev = _network(checkpoint, device, weights, compile)
    guided = {name: options.pop(name) for name in GUIDE_NUMBERS if name in options}  # the guide's options, the rest the sampler's
    decoding = decoding_for(cfg.model, length, options, cfg.train.schedule, kv_cache, infill is not None)
    tok = checkpoint_tokenizer(checkpoint)
    texts = list(prompts) if prompts else [prompt] * num_samples
    start_time = time.perf_counter()
    x, cond, start = _canvas(cfg.model, tok, texts, infill, num_samples, length, dev)
    automata = automata_for(constraint, tok, x.shape[0])
    if automata is not None:
        cond = constrain(cond, x, start, automata, length if cfg.model.causal else None, "length" if infill is None else "infill")
    cond = with_classifier_guide(cond, x, cfg, dev, classifier, label, gamma, dcbg)
    cond = steer(cond, guide, reward, energy, tok, dev, **guided)
    stop_token = tok.eos_id if stop_at_eos else None
    out = decoding.run(model, x, sampling_generator(model, seed), cond, callback, start=start, stop_token=stop_token)
    seconds = time.perf_counter() - start_time
    samples = []
    for text, row in zip(texts if infill is None else [""] * num_samples, out.tokens[:, start:].cpu().tolist()):
        ids = trim_at_eos(row, tok.eos_id) if stop_at_eos else row
        samples.append({"tokens": ids, "text": text + tok.decode(ids)})
    cache = {} if decoding.spec is None or not cfg.model.block_causal else {"cache": decoding.spec.cache_for(cfg.model).kind}
    return {
        "checkpoint": str(checkpoint), "objective": cfg.train.objective, "sampler": decoding.sampler, "nfe": out.nfe,
        "steps": out.steps, "seconds": seconds, "generated_tokens": num_samples * length, "samples": samples, **cache, **guidance_report(cond),
        **_steered(out, cond), **({"compiled": dict(model.stats)} if compile else {}),
    }


def _network(checkpoint, device: str, weights: str, compile: bool):
    """(model, run config, device) of a checkpoint on ``device`` (auto: CUDA when available): its weights' moving
    average when the run kept one (``weights`` auto), ema or raw; with ``compile`` compiled for decoding (:mod:`unmask.compiled`)."""
    dev = pick_device(device)
    model, cfg = load_model(checkpoint, dev, weights=weights)
    return compile_for_decoding(model, compile), cfg, dev


def _steered(out, cond) -> dict:
    """What a guided decoding adds to :func:`generate`'s result (nothing for an unguided one)."""
    if not isinstance(out, SteeredOutput):
        return {}
    return {"guide": cond.steering.guide.name, "score_calls": out.score_calls, "scored_sequences": out.scored_sequences,
            "score_seconds": out.score_seconds, "network_rows": int(out.row_nfe.sum())}


def _canvas(model_config, tok, texts: list[str], infill: str | None, rows: int, length: int,
            device) -> tuple[torch.Tensor, Conditioning, int]:
    """The canvas of :func:`generate` on ``device``: [EOS ; infill template] x ``rows``, or
    [EOS ; prompt ; MASK x length] per text (an AR model's without the MASKs), refused when it does
    not fit the model's context (a block model slides a window over a longer one)."""
    ctx = model_config.context_len
    if infill is not None:
        x, cond, start = infill_canvas(infill_ids(infill, tok), tok, rows, device=device)
        if x.shape[1] > ctx:
            raise OptionError("infill", "{infill} template of {_n} tokens (+ the EOS before it) exceeds the model's context of {_ctx} tokens",
                              _n=x.shape[1] - 1, _ctx=ctx)
        return x, cond, start
    encoded = [tok.encode(t) if t else [] for t in texts]
    # the AR model never reads its last new token back, so its canvas may hold one token more
    room = ctx + int(model_config.causal) - 1
    longest = max(map(len, encoded))
    if longest + length > room and not model_config.block_causal:
        raise OptionError("prompt", "{prompt} of {_n} tokens + {length} {_length} (+ the EOS before the prompt) exceeds the model's "
                          "context of {_ctx} tokens; shorten one of them", _n=longest, _length=length, _ctx=ctx)
    return make_canvas(encoded, 0 if model_config.causal else length, tok.mask_id, tok.pad_id, tok.eos_id, device=device)
