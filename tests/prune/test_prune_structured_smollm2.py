"""Structured pruning of SmolLM2-135M: 20% of the decoder layers' linear parameters removed as whole kv
groups and MLP channels by FLaP and by Wanda-SP. Artifact perplexity on Persuasion (the dense model
measured here too; calibration on Pride and Prejudice, the default text), each against a random-structure
baseline of the same shapes: the method's per-layer kv head and channel counts, with the kv groups and
channels picked at random (no compensation). The importance metric has to land far closer to dense than
that baseline: each method's log-perplexity gap to dense must be at most a third of its baseline's. FLaP
(global allocation, bias compensation) must also beat Wanda-SP, as in the FLaP paper.
"""

import math
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before tvm)

from llmopt.compiler import BuildOptions, load
from llmopt.passes.prune.blocks import find_blocks
from llmopt.passes.prune.shrink import shrink_module
from llmopt.passes.prune.structure_plan import Removal
from llmopt.runtime.manifest import read_manifest

from persuasion import artifact_perplexity, built

CONTEXT, TOKENS = 256, 4096  # 16 windows, as the unstructured pruning test
CALIBRATION = (("samples", "16"), ("seq_len", "128"))
FRACTION = 0.2


def decoder_params(folder: Path) -> int:
    """The q/k/v/o/gate/up/down weight parameters of the artifact's layers, from its recorded shapes."""
    model = read_manifest(folder).model
    h, d = model["hidden_size"], model["head_dim"]
    layers = model.get("layers") or [{"num_heads": model["num_heads"], "num_kv_heads": model["num_kv_heads"],
                                      "intermediate_size": model["intermediate_size"]}] * model["num_layers"]
    return sum(2 * h * d * (layer["num_heads"] + layer["num_kv_heads"]) + 3 * h * layer["intermediate_size"]
               for layer in layers)


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in (folder / "weights").iterdir())


def random_structure(like: Path, seed: int = 0):
    """SmolLM2 shrunk to the per-layer shapes of the artifact ``like``, its kv groups and channels random."""
    module = load("smollm2")
    attention, mlp = find_blocks(module.functions["prefill"])
    rng = np.random.default_rng(seed)
    removal = Removal()
    for a, m, layer in zip(attention, mlp, read_manifest(like).model["layers"]):
        removal.groups[a.key] = tuple(sorted(rng.choice(a.kv_heads, a.kv_heads - layer["num_kv_heads"], replace=False)))
        removal.channels[m.key] = tuple(sorted(rng.choice(m.intermediate, m.intermediate - layer["intermediate_size"],
                                                          replace=False)))
    return shrink_module(module, attention, mlp, removal, None, "random-structure")


def test_flap_and_wanda_sp_remove_a_fifth_of_the_parameters_far_better_than_random(tmp_path):
    folders = {"dense": built(tmp_path / "dense", "smollm2", BuildOptions())}
    for method in ("flap", "wanda-sp"):
        folders[method] = built(tmp_path / method, "smollm2",
                                BuildOptions(prune=f"{method}:{FRACTION}", calibration=CALIBRATION))
    for method in ("flap", "wanda-sp"):
        folders[f"random-{method}"] = built(tmp_path / f"random-{method}", random_structure(folders[method]),
                                            BuildOptions())
    ppl = {name: artifact_perplexity(folder, CONTEXT, TOKENS) for name, folder in folders.items()}
    params = {name: decoder_params(folder) for name, folder in folders.items()}
    sizes = {name: weight_bytes(folder) for name, folder in folders.items()}
    for name in folders:
        print(f"{name:16s} perplexity {ppl[name]:9.3f} (x{ppl[name] / ppl['dense']:.3f} dense)  decoder linear "
              f"params {params[name] / 1e6:.2f} M ({1 - params[name] / params['dense']:.1%} removed)  weights "
              f"{sizes[name] / 2**20:.1f} MiB")
    gap = {name: math.log(ppl[name] / ppl["dense"]) for name in ppl}
    for method in ("flap", "wanda-sp"):
        assert abs(1 - params[method] / params["dense"] - FRACTION) < 0.01
        assert params[f"random-{method}"] == params[method]
        assert sizes[method] < sizes["dense"] - 0.15 * 4 * params["dense"]  # f32: ~20% of 106 M params gone
        assert 0 < gap[method] <= gap[f"random-{method}"] / 3, (method, ppl)
    assert ppl["flap"] < ppl["wanda-sp"], ppl
