"""Token generation over a loaded model: greedy or temperature / top-p sampling, streamed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def generate(
    model: Any,
    prompt_ids: Iterable[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids`, one at a time.

    `model` is a `CompiledModel` (anything with its `prefill`/`decode`/`tokenizer`). Greedy when
    `temperature` is 0; otherwise samples from softmax(logits / temperature) restricted to the
    top-p nucleus, with `np.random.default_rng(seed)`. Stops before yielding a stop id:
    `stop_ids`, or the tokenizer's EOS ids when None.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stop = set(model.tokenizer.eos_token_ids if stop_ids is None else stop_ids)
    prompt = np.asarray(list(prompt_ids), dtype=np.int32)
    return _generate(model, prompt, max_new_tokens, temperature, top_p, seed, stop)


def _generate(
    model: Any,
    prompt: np.ndarray,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: set[int],
) -> Iterator[int]:
    """The generator behind `generate` (which validates its arguments eagerly)."""
    if max_new_tokens <= 0:
        return
    rng = np.random.default_rng(seed)
    logits, cache = model.prefill(prompt)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_p=top_p, rng=rng)
        if token in stop:
            return
        yield token
        if step + 1 < max_new_tokens:
            logits, cache = model.decode(token, cache)


def sample_next(
    logits: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Pick the next token from one position's logits [vocab] (see `generate`)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep = (np.cumsum(sorted_probs) - sorted_probs) < top_p
    kept = sorted_probs[keep]
    return int(order[rng.choice(kept.size, p=kept / kept.sum())])
