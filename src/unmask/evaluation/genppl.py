"""Generation quality: generative perplexity under a judge AR model, always with unigram entropy
and distinct-n (lower temperature lowers gen-PPL AND entropy; docs/algorithms.md, 'Generative perplexity and entropy')."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from unmask.errors import OptionError, UnmaskError
from unmask.device import device_of
from unmask.losses import token_nll


def unigram_entropy(samples: Sequence[Sequence[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's own token frequencies (MDLM's metric)."""
    values = []
    for sample in samples:
        counts = torch.tensor(list(Counter(int(t) for t in sample).values()), dtype=torch.float64)
        if counts.numel():
            p = counts / counts.sum()
            values.append(-(p * p.log()).sum().item())
    return sum(values) / max(len(values), 1)


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over the samples."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def judge_nll(judge, samples: torch.Tensor, bos: int, batch_size: int = 16) -> float:
    """Mean NLL (nats/token) of token samples (N, L) under an AR judge of the same tokenizer,
    each sample preceded by ``bos`` (the EOS/document separator)."""
    ctx = judge.config.context_len
    if samples.shape[1] > ctx:
        raise UnmaskError(f"samples of {samples.shape[1]} tokens exceed the judge's context of {ctx}")
    total, count = 0.0, 0
    device = device_of(judge)
    for start in range(0, samples.shape[0], batch_size):
        x = samples[start : start + batch_size].to(device)
        full = torch.cat([torch.full((x.shape[0], 1), bos, device=device), x], dim=1)
        total += token_nll(judge(full[:, :-1]), full[:, 1:]).double().sum().item()
        count += x.numel()
    return total / count


class HFJudge:
    """A causal LM from a local HF folder (e.g. GPT-2) as judge; texts are re-tokenised with its tokenizer."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise OptionError("judge_hf", "{judge_hf} needs `transformers`: pip install transformers") from None
        if not Path(path).is_dir():
            raise OptionError("judge_hf", "{judge_hf} {_path!r} is not a local model folder", _path=str(path))
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def nll(self, texts: Sequence[str]) -> float:
        total, count = 0.0, 0
        bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        for text in texts:
            ids = torch.tensor([[bos] + self.tok(text)["input_ids"]], device=self.model.device)
            logits = self.model(ids).logits
            total += token_nll(logits[:, :-1], ids[:, 1:]).double().sum().item()
            count += ids.shape[1] - 1
        return total / max(count, 1)


def quality_report(tokens: Sequence[Sequence[int]], nll: float) -> dict:
    """The numbers reported together: gen-PPL, entropy and distinct-1/2/3."""
    return {
        "gen_ppl": math.exp(nll), "gen_nll": nll, "unigram_entropy": unigram_entropy(tokens),
        "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2), "distinct_3": distinct_n(tokens, 3),
        "num_samples": len(tokens),
    }
