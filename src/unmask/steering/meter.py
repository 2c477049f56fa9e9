"""What a guided decoding spends on its score, apart from the MDM's network calls: the score's calls
(batched invocations), the sequences they scored, and the wall seconds inside them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from unmask.steering.rewards import Candidates, Score


@dataclass
class ScoreMeter:
    """Counters of one decoding's score calls; :meth:`reward` and :meth:`log_density` call the score."""

    calls: int = 0
    rows: int = 0
    seconds: float = 0.0

    def reward(self, score: Score, candidates: Candidates) -> torch.Tensor:
        """r(x) (B,) float64 on the CPU."""
        return self._timed(score.__call__, candidates)

    def log_density(self, score: Score, candidates: Candidates) -> torch.Tensor:
        """-E(x) (B,) float64 on the CPU."""
        return self._timed(score.log_density, candidates)

    def _timed(self, fn, candidates: Candidates) -> torch.Tensor:
        cuda = candidates.tokens.is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(candidates).double().cpu()
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += len(candidates)
        return out

    def report(self) -> dict:
        return {"score_calls": self.calls, "scored_sequences": self.rows, "score_seconds": self.seconds}
