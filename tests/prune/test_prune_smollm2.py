"""Pruning SmolLM2-135M to 50% unstructured sparsity: Wanda and SparseGPT each close at least 60% of the
perplexity gap between magnitude pruning and the dense model (artifact perplexity on Persuasion, the
dense model measured here too; calibration on Pride and Prejudice, the default text).

Pruning runs where quantization would, after ``fuse-linears``: q/k/v and gate/up are pruned as one
weight each (one threshold over the fused weight for layer-wise magnitude; Wanda and SparseGPT compare
within output rows or column blocks, which fusion does not change). The LM head (tied to the
embeddings) stays dense.
"""

from pathlib import Path

import torch  # noqa: F401  (torch before tvm)

from llmopt.compiler import BuildOptions

from persuasion import artifact_perplexity as persuasion_perplexity, built

CONTEXT, TOKENS = 256, 4096  # 16 windows: the gaps here are large (magnitude ~10x dense)
CALIBRATION = (("samples", "16"), ("seq_len", "128"))


def artifact_perplexity(folder: Path, prune: str | None) -> float:
    built(folder, "smollm2", BuildOptions(prune=prune, calibration=CALIBRATION if prune else ()), prune or "dense")
    return persuasion_perplexity(folder, CONTEXT, TOKENS, prune or "dense")


def test_wanda_and_sparsegpt_close_most_of_the_magnitude_gap_at_half_sparsity(tmp_path):
    dense = artifact_perplexity(tmp_path / "dense", None)
    magnitude = artifact_perplexity(tmp_path / "magnitude", "magnitude:0.5")
    closed = {}
    for method in ("wanda", "sparsegpt"):
        pruned = artifact_perplexity(tmp_path / method, f"{method}:0.5")
        closed[method] = (magnitude - pruned) / (magnitude - dense)
        print(f"50%: dense {dense:.3f}, magnitude {magnitude:.3f}, {method} {pruned:.3f}: "
              f"{method} closes {closed[method]:.0%} of the gap")
    assert all(fraction >= 0.6 for fraction in closed.values()), closed
