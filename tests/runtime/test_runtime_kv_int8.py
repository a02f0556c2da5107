"""An artifact with an int8 KV cache (quantize-kv-cache): the compiled int8-rows ops against numpy, and
the tiny Llama's prefill + decode against the interpreter's run of the same quantized IR."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from llmopt.codegen.build import compile_module
from llmopt.compiler import BuildOptions, build, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import WeightStore, cache_buffers, parse_module, run_module
from llmopt.ir.printer import HEADER, print_module
from llmopt.passes import PassManager, build_pipeline
from llmopt.runtime import KVCache, generate, load
from llmopt.targets import get_target

SPEC = "fuse-linears,fold-constants,quantize-kv-cache,cse,dce"
PROMPT = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8]
DECODE_STEPS = 16

ROWS_IR = f"""{HEADER}

func @f(%x: f32[n, 8], %y: f32[n, 8], %scale: f32[n]) {{
  %0 = row_scale_i8(%x) : f32[n]
  %1 = quantize_rows_i8(%x, %0) : i8[n, 8]
  %2 = dequantize_rows_i8(%1, %0) : f32[n, 8]
  %3 = quantize_rows_i8(%y, %scale) : i8[n, 8]
  return scale=%0, codes=%1, back=%2, clipped=%3
}}
"""


def test_compiled_int8_rows_ops_equal_the_interpreter_bit_for_bit():
    module = parse_module(ROWS_IR, WeightStore())
    vm = tvm.relax.VirtualMachine(compile_module(module, get_target("cpu")).executable, tvm.cpu())
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array([[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49], [0] * 8], np.float32),
                        rng.standard_normal((37, 8)).astype(np.float32) * 3])
    inputs = {"x": x, "y": x * 2, "scale": np.full(len(x), 0.05, np.float32)}  # y saturates
    want = run_module(module, "f", inputs)
    got = vm["f"](*(tvm.runtime.tensor(inputs[name]) for name in ("x", "y", "scale")))
    for index, name in enumerate(("scale", "codes", "back", "clipped")):
        assert got[index].numpy().dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[index].numpy(), want[name], err_msg=name)
    np.testing.assert_array_equal(want["codes"][0], [127, 0, 2, 2, 0, -2, -2, 3])  # ties to even
    assert want["scale"][1] == 1 and want["clipped"].min() == -127 and want["clipped"].max() == 127


@pytest.fixture(scope="module")
def int8_cache(tiny_llama, tmp_path_factory):
    """(the artifact built with an int8 KV cache, the quantized IR it was compiled from)."""
    out = tmp_path_factory.mktemp("kv_int8") / "artifact"
    build(load_hf_folder(tiny_llama), out, BuildOptions(kv_cache="int8"))
    return load(out), optimize(load_hf_folder(tiny_llama), BuildOptions(kv_cache="int8"))


def test_the_pipeline_spelled_out_builds_the_same_ir(int8_cache, tiny_llama):
    """``--kv-cache int8`` is the default pipeline with quantize-kv-cache where quantization goes."""
    assert print_module(PassManager(build_pipeline(SPEC)).run(load_hf_folder(tiny_llama))) == print_module(int8_cache[1])


def test_decode_attends_over_the_codes(int8_cache):
    """No dequantized copy of the cache: decode's attentions read the codes (attention_i8_cache, the
    CPU kernel decode_attention_i8)."""
    model, module = int8_cache
    ops = [n.op for n in module.functions["decode"].nodes]
    layers = model.manifest.kv_cache.layers
    assert ops.count("attention_i8_cache") == layers and "dequantize_rows_i8" not in ops and "attention" not in ops
    assert (model.path / "model.ir").read_text().count("attention_i8_cache(") == layers


def test_targets_without_an_int8_cache_kernel_lower_it_generically(int8_cache):
    """A target with no attention kernel of its own (the GPU targets) dequantizes the cache, writes
    the step's rows over it and attends with Relax ops: the CPU target stripped of its kernels,
    prefill then decode against the interpreter."""
    model, module = int8_cache
    library = compile_module(module, dataclasses.replace(get_target("cpu"), emit_attention=None))
    vm = tvm.relax.VirtualMachine(library.executable, tvm.cpu())
    weights = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    names = model.manifest.kv_cache.names()
    ids, pos = np.array([PROMPT], np.int32), np.arange(len(PROMPT), dtype=np.int32)
    out = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)
    past = cache_buffers({name: out[1 + i].numpy() for i, name in enumerate(names)}, len(PROMPT) + 4)
    step = {"ids": np.array([[7]], np.int32), "pos": np.array([len(PROMPT)], np.int32)}
    got = vm["decode"](*(tvm.runtime.tensor(a) for a in (step["ids"], step["pos"], *past.values())), *weights)
    want = run_module(module, "decode", {**step, **past})
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=1e-4, rtol=0)


def test_prefill_and_decode_match_the_interpreter_on_the_quantized_ir(int8_cache):
    model, module = int8_cache
    info = model.manifest.kv_cache
    assert info.dtype == "i8" and info.tensors == ("k.{i}", "k.{i}.scale", "v.{i}", "v.{i}.scale")
    names = info.names()
    logits, cache = model.prefill(np.array(PROMPT))
    out = run_module(module, "prefill", {"ids": np.array([PROMPT], np.int32),
                                         "pos": np.arange(len(PROMPT), dtype=np.int32)})
    np.testing.assert_allclose(logits, out["logits"][0, -1], atol=1e-4, rtol=0)
    ids, worst_codes = list(PROMPT), 0
    for _ in range(DECODE_STEPS):
        ids.append(int(np.argmax(logits)))
        assert ids[-1] == int(np.argmax(out["logits"].reshape(-1)))
        logits, cache = model.decode(ids[-1], cache)
        out = run_module(module, "decode", {"ids": np.array([[ids[-1]]], np.int32),
                                            "pos": np.array([len(ids) - 1], np.int32),
                                            **cache_buffers({name: out[name] for name in names}, cache.capacity)})
        np.testing.assert_allclose(logits, out["logits"][0, 0], atol=1e-4, rtol=0)
        assert len(cache) == len(ids)
        for name, tensor in zip(names, cache.tensors):
            array = tensor.numpy()
            assert array.dtype == out[name].dtype and array.shape == out[name].shape, name
            assert not array[:, len(ids):].any(), name  # rows past the filled ones stay zero
            if name.endswith(".scale"):
                np.testing.assert_allclose(array, out[name], rtol=1e-5, atol=0, err_msg=name)
            else:  # codes may differ by one where float noise moves a value across a rounding boundary
                worst_codes = max(worst_codes, int(np.abs(array.astype(np.int32) - out[name]).max()))
    assert worst_codes <= 1


def test_cache_tensors_are_int8_codes_plus_f32_scales(int8_cache):
    model, _ = int8_cache
    _, cache = model.prefill(np.array(PROMPT))
    tokens, heads, dim = len(PROMPT), model.manifest.kv_cache.kv_heads, model.manifest.kv_cache.head_dim
    arrays = [t.numpy()[:, :tokens] for t in cache.tensors]
    assert [str(a.dtype) for a in arrays] == ["int8", "float32"] * 4
    assert [a.shape for a in arrays] == [(1, tokens, heads, dim), (1, tokens, heads)] * 4
    f32_bytes = 4 * tokens * heads * dim * 4  # 2 layers x k, v
    int8_bytes = sum(a.nbytes for a in arrays)
    assert int8_bytes == f32_bytes // 4 + 4 * tokens * heads * 4  # a quarter, plus one f32 scale per row
    print(f"tiny llama KV cache per token: f32 {f32_bytes // tokens} B, int8 {int8_bytes // tokens} B")


def test_greedy_generation_equals_the_interpreter(int8_cache):
    model, module = int8_cache
    names = model.manifest.kv_cache.names()
    out = run_module(module, "prefill", {"ids": np.array([PROMPT], np.int32),
                                         "pos": np.arange(len(PROMPT), dtype=np.int32)})
    want = []
    for step in range(DECODE_STEPS):
        want.append(int(np.argmax(out["logits"].reshape(-1))))
        out = run_module(module, "decode", {"ids": np.array([[want[-1]]], np.int32),
                                            "pos": np.array([len(PROMPT) + step], np.int32),
                                            **cache_buffers({name: out[name] for name in names},
                                                            len(PROMPT) + DECODE_STEPS)})
    assert list(generate(model, PROMPT, max_new_tokens=DECODE_STEPS, stop_ids=[])) == want


def test_a_cache_of_the_wrong_layout_is_a_clear_error(int8_cache):
    model, _ = int8_cache
    _, cache = model.prefill(np.array(PROMPT))
    f32_layout = KVCache(cache.tensors[::2], cache.length)  # 2 per layer, as an f32 cache has
    with pytest.raises(ValueError, match=r"cache has 4 tensors, this model needs 8 \(k.0, k.0.scale, v.0, "
                                         r"v.0.scale, ...\): pass a cache returned by this model"):
        model.decode(3, f32_layout)
    with pytest.raises(ValueError, match="cache has tuple"):
        model.decode(3, cache.tensors)
