"""Generation over the toy artifact: greedy vs numpy, sampling, stopping, the KV cache."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_toy import EOS, HIDDEN, LAYERS, VOCAB, toy_greedy, toy_reference_logits

from llmopt.runtime import generate
from llmopt.runtime import model as runtime_model
from llmopt.runtime.generate import sample_next

PROMPT = [1, 4, 11, 7]


def test_greedy_matches_numpy_reference(toy_model):
    got = list(generate(toy_model, PROMPT, max_new_tokens=12, stop_ids=()))
    assert got == toy_greedy(PROMPT, 12)


def test_stops_before_stop_id(toy_model):
    expected = toy_greedy(PROMPT, 12)
    cut = next(i for i, t in enumerate(expected) if i > 0 and t not in expected[:i])
    got = list(generate(toy_model, PROMPT, max_new_tokens=12, stop_ids=[expected[cut]]))
    assert got == expected[:cut]


def test_default_stop_is_eos(toy_model):
    class EosAfterTwo:
        """Wraps the toy so that the third generated token is EOS."""

        tokenizer = toy_model.tokenizer

        def prefill(self, ids):
            self.steps = 0
            return toy_model.prefill(ids)

        def decode(self, token, cache):
            self.steps += 1
            logits, cache = toy_model.decode(token, cache)
            if self.steps == 2:
                logits = np.where(np.arange(VOCAB) == EOS, 1e9, logits)
            return logits, cache

    assert len(list(generate(EosAfterTwo(), PROMPT, max_new_tokens=10))) == 2


def test_sampling_is_reproducible_with_seed(toy_model):
    def run(seed):
        return list(
            generate(toy_model, PROMPT, max_new_tokens=16, temperature=2.0, seed=seed, stop_ids=())
        )

    assert run(123) == run(123)
    assert len({tuple(run(seed)) for seed in range(6)}) > 1


def test_tiny_top_p_is_greedy(toy_model):
    got = generate(
        toy_model, PROMPT, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0, stop_ids=()
    )
    assert list(got) == toy_greedy(PROMPT, 10)


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, rng=rng) for _ in range(300)}
    assert draws == {0, 1}


def test_kv_cache_is_written_in_place_and_doubles_when_full(toy_model, monkeypatch):
    monkeypatch.setattr(runtime_model, "MIN_CAPACITY", 2)
    logits, cache = toy_model.prefill(np.array(PROMPT))
    assert len(cache) == len(PROMPT) and len(cache.tensors) == 2 * LAYERS
    assert cache.capacity == len(PROMPT) + 2
    seq, capacities = list(PROMPT), []
    for step in range(1, 8):
        seq.append(3 + step)
        before = [t.data_ptr() for t in cache.tensors]
        full = len(cache) == cache.capacity
        logits, cache = toy_model.decode(seq[-1], cache)
        np.testing.assert_allclose(logits, toy_reference_logits(seq)[-1], rtol=1e-4, atol=1e-4)
        assert len(cache) == len(PROMPT) + step
        assert all(tuple(t.shape) == (1, cache.capacity, 1, HIDDEN) for t in cache.tensors)
        assert ([t.data_ptr() for t in cache.tensors] == before) != full  # same buffers unless they grew
        capacities.append(cache.capacity)
    n = len(PROMPT)
    assert capacities == [n + 2, n + 2, 2 * (n + 2), 2 * (n + 2), 2 * (n + 2), 2 * (n + 2), 2 * (n + 2)]


def test_invalid_ids_are_refused(toy_model):
    with pytest.raises(ValueError, match="token ids"):
        toy_model.prefill(np.array([1, VOCAB]))
    with pytest.raises(ValueError, match="1-D"):
        toy_model.prefill(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="top_p"):
        generate(toy_model, PROMPT, max_new_tokens=1, top_p=0.0)
