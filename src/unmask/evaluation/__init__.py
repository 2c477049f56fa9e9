"""Evaluation: perplexity of checkpoints on held-out data (and more in sibling modules)."""

from unmask.evaluation.perplexity import evaluate_checkpoint, format_likelihood

__all__ = ["evaluate_checkpoint", "format_likelihood"]
