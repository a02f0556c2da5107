"""SparseGPT then GPTQ w4g128 on SmolLM2-135M at 2:4 (50% unstructured measured as well): mask-aware GPTQ
(the default, ``keep_zeros``) keeps every pruned weight at exactly 0 where plain GPTQ
(``keep_zeros=false``) refills some of them, and it costs about as much perplexity over the sparse
model as plain GPTQ does (artifact perplexity on Persuasion as in ``test_prune_smollm2.py``;
calibration on Pride and Prejudice, the default text, 16 x 128 tokens for both passes).

Each level is pruned once (``fuse-linears``, ``fold-constants``, ``prune-sparsegpt``: what ``llmopt
build --prune`` runs before quantization); the sparse model alone, plain GPTQ and mask-aware GPTQ are
built from that pruned module, so the three share one set of pruned weights.

Measured (2026-12-01, perplexity; sparse alone / + plain GPTQ / + mask-aware GPTQ; pruned weights
still 0 after plain GPTQ): 50%: 74.72 / 85.24 / 87.18, 91.0%; 2:4: 116.45 / 128.38 / 127.18, 91.4%.
With the default calibration (32 x 256 tokens) at 50%:
66.77 / 73.93 / 73.45. So the mask-aware method costs about as much perplexity over the sparse model
as the plain sequence (from 10% less to 19% more here), not clearly less, while it keeps every pruned
weight at 0; the assertions are those: all zeros kept (plain: under 95%), and a cost at most 1.4
times plain's.
"""

import time
from pathlib import Path

import torch  # noqa: F401  (torch before tvm)

from llmopt.compiler import BuildOptions, load, optimize
from llmopt.ir.quant_schemes import get_scheme

from persuasion import artifact_perplexity as persuasion_perplexity, built
from test_prune_smollm2 import CALIBRATION, CONTEXT, TOKENS

OPTIONS = ",".join(f"{key}={value}" for key, value in CALIBRATION)
LEVELS = {"2:4": "nm=2:4"}  # the structure a sparse kernel needs kept (50% measured too, see above)
GPTQ = {"plain": "keep_zeros=false", "joint": "keep_zeros=true"}


def artifact_perplexity(module, folder: Path) -> float:
    """Perplexity of the artifact of ``module`` as it is (no further passes)."""
    built(folder, module, BuildOptions(pipeline="none"))
    return persuasion_perplexity(folder, CONTEXT, TOKENS)


def zeros_kept(pruned, quantized) -> float:
    """Of the weights ``pruned`` left at 0 in the linears ``quantized`` dequantizes, the fraction that
    dequantize to exactly 0 (the ``dequantize`` op's reference semantics on the stored codes)."""
    kept = total = 0
    func = quantized.functions["prefill"]
    nodes = func.node_map()
    for node in func.nodes:
        if node.op != "dequantize":
            continue
        names = [nodes[name].attr["name"] for name in node.inputs]
        source = names[0].removesuffix(f".{node.attr['scheme']}.packed")
        zero = pruned.weights.get(source) == 0
        parts = [quantized.weights.get(name) for name in names]
        dequantized = get_scheme(node.attr["scheme"]).dequantize_packed(
            parts[0], parts[1], parts[2] if len(parts) == 3 else None, node.attr["in_features"])
        kept, total = kept + int((dequantized[zero] == 0).sum()), total + int(zero.sum())
    assert total > 0
    return kept / total


def test_mask_aware_gptq_keeps_the_sparsity_at_about_plain_gptqs_perplexity(tmp_path):
    measured = {}
    for level, option in LEVELS.items():
        start = time.perf_counter()
        pruned = optimize(load("smollm2"), BuildOptions(
            pipeline=f"fuse-linears,fold-constants,prune-sparsegpt{{{option},{OPTIONS}}},cse,dce"))
        print(f"{level}: pruned in {time.perf_counter() - start:.0f} s")
        tag = level.replace(":", "of").replace("%", "")
        ppl = {"sparse": artifact_perplexity(pruned, tmp_path / f"{tag}-sparse")}
        kept = {}
        for variant, keep in GPTQ.items():
            start = time.perf_counter()
            quantized = optimize(pruned, BuildOptions(pipeline=f"quantize-gptq{{scheme=w4g128,{keep},{OPTIONS}}},dce"))
            kept[variant] = zeros_kept(pruned, quantized)
            print(f"{level} {variant}: quantized in {time.perf_counter() - start:.0f} s, "
                  f"{kept[variant]:.1%} of the pruned weights still 0")
            ppl[variant] = artifact_perplexity(quantized, tmp_path / f"{tag}-{variant}")
        measured[level] = ppl, kept
        print(f"SparseGPT {level}: alone {ppl['sparse']:.3f}, + plain GPTQ w4g128 {ppl['plain']:.3f}, "
              f"+ mask-aware GPTQ w4g128 {ppl['joint']:.3f}")
    for level, (ppl, kept) in measured.items():
        assert kept["joint"] == 1.0 and kept["plain"] < 0.95, (level, kept)
        assert ppl["sparse"] < ppl["joint"] < ppl["sparse"] + 1.4 * (ppl["plain"] - ppl["sparse"]), (level, ppl)
