"""Scoring and completing short answers after a prompt, for MDM and AR alike.

Every pair is laid out as [EOS ; prompt ; answer] (EOS: the separator every training document
follows). Pairs of equal total length go through the network together, so nothing is padded.

* :func:`answer_logprobs`: log p(answer | prompt). AR: exact, one forward. MDM: the exact chain
  rule with the answer decoded left to right (:func:`unmask.likelihood.chain_rule`), optionally
  with unsupervised classifier-free guidance of scale w (the prompt replaced by MASK in the
  unconditional pass, the EOS separator kept, as the samplers do; docs/algorithms.md, 'Unsupervised classifier-free guidance').
* :func:`complete`: the greedy answer of a given length. AR: argmax token by token. MDM:
  confidence decoding at temperature 0, one token per network call, with guidance scale w, in
  any order or left to right.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from unmask.likelihood import chain_rule
from unmask.device import device_of
from unmask.sampling.canvas import make_canvas
from unmask.sampling.decoding import decoding_for


def _groups(keys: list) -> dict:
    groups = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


@torch.no_grad()
def answer_logprobs(model, pairs: list[tuple[list[int], list[int]]], eos: int, cfg_scale: float = 0.0, batch_size: int = 64,
                    pad_to: int | None = None) -> list[float]:
    """log p(answer | prompt) in nats for each (prompt ids, answer ids) pair (answers non-empty).

    ``pad_to``: an MDM's rows continue with MASK up to this length, positions that are neither
    scored nor given (their tokens are marginalised): the layout of a fine-tuned row, whose
    response region runs to the end of the row."""
    dev = device_of(model)
    out = [0.0] * len(pairs)
    causal = model.config.causal
    hidden = 0 if causal or pad_to is None else pad_to
    for _, idx in _groups([1 + len(p) + len(a) for p, a in pairs]).items():
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            x = torch.tensor([[eos, *pairs[i][0], *pairs[i][1]] for i in rows], device=dev)
            if hidden > x.shape[1]:
                x = torch.cat([x, torch.full((len(rows), hidden - x.shape[1]), model.config.mask_id, device=dev)], dim=1)
            scored = torch.zeros_like(x, dtype=torch.bool)
            prompt = torch.zeros_like(x, dtype=torch.bool)
            for r, i in enumerate(rows):
                scored[r, 1 + len(pairs[i][0]) : 1 + len(pairs[i][0]) + len(pairs[i][1])] = True
                prompt[r, 1 : 1 + len(pairs[i][0])] = True
            if causal:
                logp = torch.log_softmax(model(x[:, :-1]).double(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
                values = (logp * scored[:, 1:]).sum(dim=1)
            else:
                values = chain_rule(model, x, score_mask=scored, cfg_scale=cfg_scale, prompt_mask=prompt).logprob
            for r, i in enumerate(rows):
                out[i] = float(values[r])
    return out


@torch.no_grad()
def complete(model, prompts: list[list[int]], lengths: list[int], eos: int, cfg_scale: float = 0.0, batch_size: int = 64,
             left_to_right: bool = False) -> list[list[int]]:
    """The greedy completion of ``lengths[i]`` tokens after each prompt (ids, no EOS). An MDM decodes
    its most confident position first, or with ``left_to_right`` the leftmost (blocks of one token)."""
    dev, causal = device_of(model), model.config.causal
    out: list[list[int]] = [[] for _ in prompts]
    for (_, a_len), idx in _groups([(len(p), n) for p, n in zip(prompts, lengths)]).items():
        options = {"temperature": 0.0} if causal else {"sampler": "confidence", "steps": a_len, "temperature": 0.0, "cfg_scale": cfg_scale,
                                                      "block_len": 1 if left_to_right else None}
        decoding = decoding_for(model.config, a_len, options, kv_cache=False if causal else None)
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            # the rows of a group have prompts of one length: nothing is padded
            x, cond, begin = make_canvas([prompts[i] for i in rows], 0 if causal else a_len, model.config.mask_id, eos, eos, device=dev)
            tokens = decoding.run(model, x, torch.Generator(device=dev).manual_seed(0), cond, start=begin).tokens[:, -a_len:]
            for r, i in enumerate(rows):
                out[i] = tokens[r].tolist()
    return out
