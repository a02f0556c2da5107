"""Quantized tiny Llamas built for CPU with the fused low-bit kernels: the artifact computes what the
interpreter computes on the same quantized IR (prefill and decode), and stores only the packed
codes and scales of the quantized linears, in the kernels' blocked layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import transformers

from llmopt.compiler import BuildOptions, build, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.runtime import load
from llmopt.runtime.manifest import read_manifest

from tiny_models import VOCAB, word_tokenizer

IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8, 77, 2]
PROMPT = 9  # tokens prefilled; the rest are decoded one by one
PARTS = (".packed", ".scales", ".zeros")


def _save_wide_tiny(folder):
    """A tiny Llama whose linears all have K a multiple of 128 (hidden 128, intermediate 256)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    word_tokenizer(folder / "tokenizer.json")


@pytest.fixture(scope="module", params=["w8", "w4g128", "w4g64-asym"])
def quantized_build(request, tmp_path_factory, tiny_llama):
    """(scheme, quantized IR, artifact dir): w8 on the shared tiny Llama (K = 64, 96), w4g128 on one
    with K = 128, 256 (whole groups), w4g64-asym on the shared one again: down_proj's K = 96 is a
    full group of 64 and a short one of 32 (ragged groups, fused GEMV and GEMM)."""
    folder = tiny_llama
    if request.param == "w4g128":
        folder = tmp_path_factory.mktemp("wide_tiny") / "hf"
        _save_wide_tiny(folder)
    options = BuildOptions(quant=request.param)
    out = tmp_path_factory.mktemp(f"artifact_{request.param}") / "artifact"
    build(load_hf_folder(folder), out, options)
    return get_scheme(request.param), optimize(load_hf_folder(folder), options), out


def test_prefill_and_decode_match_the_interpreter(quantized_build):
    _, quantized, out = quantized_build
    feed = {"ids": np.array([IDS], np.int32), "pos": np.arange(len(IDS), dtype=np.int32)}
    want = run_module(quantized, "logits", feed)["logits"][0]
    model = load(out)
    np.testing.assert_allclose(model.forward_logits(np.array(IDS)), want, atol=1e-4, rtol=0)
    logits, cache = model.prefill(np.array(IDS[:PROMPT]))
    np.testing.assert_allclose(logits, want[PROMPT - 1], atol=1e-4, rtol=0)
    for position in range(PROMPT, len(IDS)):  # decode: the GEMV kernels
        logits, cache = model.decode(IDS[position], cache)
        np.testing.assert_allclose(logits, want[position], atol=1e-4, rtol=0)


def test_only_packed_low_bit_weights_are_stored(quantized_build):
    """Every quantized linear is stored as its codes and scales only, blocked by 64 rows, at
    ``bits/8 + 4/group`` bytes per parameter (plus zero padding of the last block), and the
    weight files hold nothing else than what the manifest lists."""
    scheme, quantized, out = quantized_build
    manifest = read_manifest(out)
    stored = {w.name: w for w in manifest.weights}
    assert set(stored) == set(quantized.weight_names())
    quantized_shapes = [quantized.weights.type(name).shape for name in stored if name.endswith(".packed")]
    assert quantized_shapes and not any(name.endswith(".weight") and "proj" in name for name in stored)
    part_bytes = 0
    for name, info in stored.items():
        if name.endswith(PARTS):
            n, columns = quantized.weights.type(name).shape
            assert info.shape == (math.ceil(n / 64), columns, 64)
            part_bytes += math.prod(info.shape) * 4
    expected = params = 0
    for n, words in quantized_shapes:
        k = words * scheme.codes_per_word
        params += n * k
        expected += math.ceil(n / 64) * 64 * (k * scheme.bits // 8 + 4 * scheme.groups(k) * (1 + scheme.has_zeros))
    assert part_bytes == expected
    print(f"{scheme.name}: {part_bytes / params:.4f} bytes per quantized parameter")
    payload = sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in manifest.weights)
    files = sum((out / f).stat().st_size for f in {w.file for w in manifest.weights})
    assert payload <= files < payload + 64 * 1024  # safetensors headers only
