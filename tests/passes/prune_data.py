"""Shared data for the pruning pass tests: a weight, correlated calibration and held-out inputs,
token ids and a feed for the tiny Llama, and helpers to read what a pruning pass produced."""

from __future__ import annotations

import numpy as np

N, K = 48, 256


def correlated_inputs(seed: int, samples: int = 4, tokens: int = 96) -> list[np.ndarray]:
    """Inputs ``Z @ A`` with an ill-conditioned ``A`` and features of unequal scale (as in LLMs)."""
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((K, K)))
    right, _ = np.linalg.qr(rng.standard_normal((K, K)))
    mixing = (left * np.logspace(0, -2, K)) @ right * (1 + 4 * rng.random(K))
    data = np.random.default_rng(seed)
    return [(data.standard_normal((1, tokens, K)) @ mixing).astype(np.float32) for _ in range(samples)]


WEIGHT = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
CALIBRATION = correlated_inputs(seed=2)
HELD_OUT = np.concatenate(correlated_inputs(seed=3)).reshape(-1, K)


def output_error(pruned: np.ndarray) -> float:
    """``||X W^T - X W_pruned^T||`` on inputs calibration did not see."""
    return float(np.linalg.norm(HELD_OUT @ (WEIGHT - pruned).T))


TOKENS = np.random.default_rng(0).integers(0, 128, (4, 24)).astype(np.int32)
FEED = {"ids": np.array([[1, 17, 99, 3, 42, 7, 64, 5]], np.int32), "pos": np.arange(8, dtype=np.int32)}


def pruned_weights(module) -> dict[str, np.ndarray]:
    """Source weight name -> its pruned copy, for every pruned weight the module's graphs read."""
    read = {n.attr["name"] for f in module.functions.values() for n in f.nodes if n.op == "weight"}
    return {name.partition(".pruned-")[0]: module.weights.get(name) for name in read if ".pruned-" in name}
