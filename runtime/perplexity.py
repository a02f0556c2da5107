"""Perplexity of a compiled model on a text: non-overlapping windows of a fixed context.

Each window of ``context`` tokens is run once from an empty cache; the first token of a window
is only a condition, the other ``context - 1`` are predicted and scored. The result states the
context, the number of tokens read and the number scored, so figures can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LLMOptError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float
    context: int
    tokens: int  # tokens read from the text
    scored: int  # tokens predicted and scored
    windows: int

    def describe(self) -> str:
        return (f"perplexity {self.perplexity:.4f} over {self.scored} predicted tokens "
                f"({self.windows} windows of {self.context} tokens, first {self.tokens} tokens of the text)")


def windows(ids: np.ndarray, context: int) -> list[np.ndarray]:
    return [ids[start:start + context] for start in range(0, len(ids) - context + 1, context)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of window[1:] given the logits of window[:-1]."""
    logp = log_softmax(logits[:-1])
    return -logp[np.arange(len(window) - 1), window[1:]]


def perplexity(forward_logits, ids, context: int, max_tokens: int | None = None, progress=None) -> Perplexity:
    """``forward_logits(ids) -> [n, vocab]`` logits; ``ids`` the tokenized text."""
    ids = np.asarray(ids, dtype=np.int64)[:max_tokens]
    chunks = windows(ids, context)
    if context < 2 or not chunks:
        raise LLMOptError(f"the text has {len(ids)} tokens, too few for one window of {context} tokens.",
                          "Use a longer text or a smaller --context.")
    nll = []
    for index, window in enumerate(chunks):
        nll.append(window_nll(forward_logits(window), window))
        if progress is not None:
            progress(index + 1, len(chunks))
    nll = np.concatenate(nll)
    return Perplexity(float(np.exp(nll.mean())), float(nll.mean()), context, len(chunks) * context, len(nll), len(chunks))
