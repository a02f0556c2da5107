"""quantize-kv-cache: golden IR text, the int8-rows ops against numpy, the tiny Llama's decode with an
int8 cache against fp32 and against a hand-computed int8-cache reference, composition, errors."""

import numpy as np
import pytest

from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import cache_buffers, parse_module, print_module, run_module, verify_module
from llmopt.ir.ops import OPS, OpError, infer_type
from llmopt.ir.printer import HEADER
from llmopt.ir.types import TensorType
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant.kv_cache import QuantizeKVCache
from passes_golden import assert_round_trips, assert_same_text, ir, random_store

BEFORE = """
meta {"kv_cache": {"dtype": "f32", "head_dim": 4, "kv_heads": 1, "layers": 1}}

func @prefill(%x: f32[1, seq, 8]) {
  %wk = weight @k.weight : f32[4, 8]
  %wv = weight @v.weight : f32[4, 8]
  %q = reshape(%x) {shape=(1, 'seq', 2, 4)} : f32[1, seq, 2, 4]
  %k = linear(%x, %wk) : f32[1, seq, 4]
  %kh = reshape(%k) {shape=(1, 'seq', 1, 4)} : f32[1, seq, 1, 4]  # from=attn.k
  %v = linear(%x, %wv) : f32[1, seq, 4]
  %vh = reshape(%v) {shape=(1, 'seq', 1, 4)} : f32[1, seq, 1, 4]  # from=attn.v
  %a = attention(%q, %kh, %vh) {scale=0.5} : f32[1, seq, 2, 4]
  return y=%a, k.0=%kh, v.0=%vh
}

func @decode(%x: f32[1, 1, 8], %pos: i32[1], %k.0: f32[1, capacity, 1, 4], %v.0: f32[1, capacity, 1, 4]) {
  %wk = weight @k.weight : f32[4, 8]
  %wv = weight @v.weight : f32[4, 8]
  %q = reshape(%x) {shape=(1, 1, 2, 4)} : f32[1, 1, 2, 4]
  %k = linear(%x, %wk) : f32[1, 1, 4]
  %kh = reshape(%k) {shape=(1, 1, 1, 4)} : f32[1, 1, 1, 4]
  %v = linear(%x, %wv) : f32[1, 1, 4]
  %vh = reshape(%v) {shape=(1, 1, 1, 4)} : f32[1, 1, 1, 4]
  %kc = kv_write(%k.0, %kh, %pos) : f32[1, capacity, 1, 4]  # from=attn
  %vc = kv_write(%v.0, %vh, %pos) : f32[1, capacity, 1, 4]  # from=attn
  %a = attention(%q, %kc, %vc, %pos) {scale=0.5} : f32[1, 1, 2, 4]
  return y=%a, k.0=%kc, v.0=%vc
}

func @logits(%x: f32[1, seq, 8]) {
  %y = relu(%x) : f32[1, seq, 8]
  return y=%y
}
"""

EXPECTED = """
meta {"kv_cache": {"dtype": "i8", "head_dim": 4, "kv_heads": 1, "layers": 1, "tensors": ["k.{i}", "k.{i}.scale", "v.{i}", "v.{i}.scale"]}}

func @prefill(%x: f32[1, seq, 8]) {
  %0 = weight @k.weight : f32[4, 8]
  %1 = weight @v.weight : f32[4, 8]
  %2 = reshape(%x) {shape=(1, 'seq', 2, 4)} : f32[1, seq, 2, 4]
  %3 = linear(%x, %0) : f32[1, seq, 4]
  %4 = reshape(%3) {shape=(1, 'seq', 1, 4)} : f32[1, seq, 1, 4]  # from=attn.k
  %5 = row_scale_i8(%4) : f32[1, seq, 1]  # from=attn.k by=quantize-kv-cache
  %6 = quantize_rows_i8(%4, %5) : i8[1, seq, 1, 4]  # from=attn.k by=quantize-kv-cache
  %7 = linear(%x, %1) : f32[1, seq, 4]
  %8 = reshape(%7) {shape=(1, 'seq', 1, 4)} : f32[1, seq, 1, 4]  # from=attn.v
  %9 = row_scale_i8(%8) : f32[1, seq, 1]  # from=attn.v by=quantize-kv-cache
  %10 = quantize_rows_i8(%8, %9) : i8[1, seq, 1, 4]  # from=attn.v by=quantize-kv-cache
  %11 = attention(%2, %4, %8) {scale=0.5} : f32[1, seq, 2, 4]
  return y=%11, k.0=%6, k.0.scale=%5, v.0=%10, v.0.scale=%9
}

func @decode(%x: f32[1, 1, 8], %pos: i32[1], %k.0: i8[1, capacity, 1, 4], %k.0.scale: f32[1, capacity, 1], %v.0: i8[1, capacity, 1, 4], %v.0.scale: f32[1, capacity, 1]) {
  %0 = weight @k.weight : f32[4, 8]
  %1 = weight @v.weight : f32[4, 8]
  %2 = reshape(%x) {shape=(1, 1, 2, 4)} : f32[1, 1, 2, 4]
  %3 = linear(%x, %0) : f32[1, 1, 4]
  %4 = reshape(%3) {shape=(1, 1, 1, 4)} : f32[1, 1, 1, 4]
  %5 = linear(%x, %1) : f32[1, 1, 4]
  %6 = reshape(%5) {shape=(1, 1, 1, 4)} : f32[1, 1, 1, 4]
  %7 = row_scale_i8(%4) : f32[1, 1, 1]  # from=attn by=quantize-kv-cache
  %8 = quantize_rows_i8(%4, %7) : i8[1, 1, 1, 4]  # from=attn by=quantize-kv-cache
  %9 = kv_write(%k.0, %8, %pos) : i8[1, capacity, 1, 4]  # from=attn by=quantize-kv-cache
  %10 = kv_write(%k.0.scale, %7, %pos) : f32[1, capacity, 1]  # from=attn by=quantize-kv-cache
  %11 = row_scale_i8(%6) : f32[1, 1, 1]  # from=attn by=quantize-kv-cache
  %12 = quantize_rows_i8(%6, %11) : i8[1, 1, 1, 4]  # from=attn by=quantize-kv-cache
  %13 = kv_write(%v.0, %12, %pos) : i8[1, capacity, 1, 4]  # from=attn by=quantize-kv-cache
  %14 = kv_write(%v.0.scale, %11, %pos) : f32[1, capacity, 1]  # from=attn by=quantize-kv-cache
  %15 = attention_i8_cache(%2, %9, %10, %4, %13, %14, %6, %pos) {scale=0.5} : f32[1, 1, 2, 4]  # by=quantize-kv-cache
  return y=%15, k.0=%9, k.0.scale=%10, v.0=%13, v.0.scale=%14
}

func @logits(%x: f32[1, seq, 8]) {
  %y = relu(%x) : f32[1, seq, 8]
  return y=%y
}
"""

def ir_with_meta(body: str) -> str:
    """``ir(body)`` for a body starting with a meta line (printed right under the header)."""
    return ir(body).replace(HEADER + "\n\n", HEADER + "\n", 1)


SPEC = "fuse-linears,fold-constants,quantize-kv-cache,cse,dce"


def scale_rows(x):
    """The int8-rows scale written out: max |x| over the last axis / 127, 1 for a zero row."""
    absmax = np.abs(x).max(axis=-1)
    return np.where(absmax == 0, 1, absmax / np.float32(127)).astype(np.float32)


def quantize_rows(x, scale):
    return np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)


def dequantize_rows(codes, scale):
    return codes.astype(np.float32) * scale[..., None]


def test_golden_text_and_small_decoder_numerics():
    store = random_store(k__weight=(4, 8), v__weight=(4, 8))
    before = parse_module(ir_with_meta(BEFORE), store)
    verify_module(before)
    result = QuantizeKVCache().apply(before)
    assert_same_text(print_module(result.module), ir_with_meta(EXPECTED))
    verify_module(result.module)
    assert_round_trips(result.module)
    assert print_module(before) == print_module(parse_module(ir_with_meta(BEFORE), store)), "the pass changed its input"
    assert result.module.functions["logits"] == before.functions["logits"]
    assert result.stats == {"stored": 4, "loaded": 2, "fused_attention": 1}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    want, got = (run_module(m, "prefill", {"x": x}) for m in (before, result.module))
    np.testing.assert_array_equal(got["y"], want["y"])  # prefill attends over its own float k/v
    for name in ("k.0", "v.0"):
        np.testing.assert_array_equal(got[name + ".scale"], scale_rows(want[name]))
        np.testing.assert_array_equal(got[name], quantize_rows(want[name], scale_rows(want[name])))
    x1, pos = rng.standard_normal((1, 1, 8)).astype(np.float32), np.array([5], np.int32)
    past = cache_buffers({name: dequantize_rows(got[name], got[name + ".scale"]) for name in ("k.0", "v.0")}, 6)
    want = run_module(before, "decode", {"x": x1, "pos": pos, **past})
    step = run_module(result.module, "decode",
                      {"x": x1, "pos": pos, **cache_buffers({k: v for k, v in got.items() if k != "y"}, 6)})
    np.testing.assert_allclose(step["y"], want["y"], atol=1e-6, rtol=0)
    for name in ("k.0", "v.0"):
        np.testing.assert_array_equal(step[name][:, :5], got[name])  # past codes carried, not re-quantized
        np.testing.assert_array_equal(step[name + ".scale"][:, :5], got[name + ".scale"])
        new = want[name][:, 5:]
        np.testing.assert_array_equal(step[name + ".scale"][:, 5:], scale_rows(new))
        np.testing.assert_array_equal(step[name][:, 5:], quantize_rows(new, scale_rows(new)))


def test_a_written_cache_another_node_reads_is_dequantized_for_it_alone():
    """attention reads the codes either way; a second reader of the written key cache, and an output
    returning the written value cache under another name, get it dequantized whole with the step's
    f32 row written over its own (as attention sees it)."""
    attend = "  %a = attention(%q, %kc, %vc, %pos) {scale=0.5} : f32[1, 1, 2, 4]\n"
    text = BEFORE.replace(attend + "  return y=%a,",
                          attend + "  %r = relu(%kc) : f32[1, capacity, 1, 4]\n  return y=%a, r=%r, vf=%vc,")
    before = parse_module(ir_with_meta(text), random_store(k__weight=(4, 8), v__weight=(4, 8)))
    result = QuantizeKVCache().apply(before)
    verify_module(result.module)
    decode = result.module.functions["decode"]
    nodes = decode.node_map()
    assert [n.op for n in decode.nodes].count("attention_i8_cache") == 1
    assert [n.op for n in decode.nodes].count("dequantize_rows_i8") == 2 and "attention" not in [n.op for n in decode.nodes]
    relu = next(n for n in decode.nodes if n.op == "relu")
    written = nodes[relu.inputs[0]]
    assert written.op == "kv_write" and nodes[written.inputs[0]].op == "dequantize_rows_i8"
    rng = np.random.default_rng(3)
    codes = {name: rng.integers(-127, 128, (1, 7, 1, 4)).astype(np.int8) for name in ("k.0", "v.0")}
    scales = {name: rng.uniform(0.01, 0.1, (1, 7, 1)).astype(np.float32) for name in ("k.0", "v.0")}
    x1, pos = rng.standard_normal((1, 1, 8)).astype(np.float32), np.array([5], np.int32)
    want = run_module(before, "decode", {"x": x1, "pos": pos, **{n: dequantize_rows(codes[n], scales[n]) for n in codes}})
    got = run_module(result.module, "decode", {"x": x1, "pos": pos, **codes, **{n + ".scale": scales[n] for n in codes}})
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got["r"], want["r"])
    np.testing.assert_array_equal(got["vf"], want["vf"])  # returned under another name: dequantized too


def test_int8_rows_ops_match_numpy_with_ties_half_to_even_and_zero_rows():
    x = np.array([[[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]],
                  [[0, 0, 0, 0, 0, 0, 0, 0]]], np.float32)  # [2, 1, 8]
    scale = OPS["row_scale_i8"].ref([x], {}, {})
    np.testing.assert_array_equal(scale, np.array([[1], [1]], np.float32))
    codes = OPS["quantize_rows_i8"].ref([x, scale], {}, {})
    np.testing.assert_array_equal(codes[0, 0], [127, 0, 2, 2, 0, -2, -2, 3])
    assert codes.dtype == np.int8 and not codes[1].any()
    y = np.random.default_rng(1).standard_normal((3, 4, 16)).astype(np.float32) * 5
    scale = OPS["row_scale_i8"].ref([y], {}, {})
    np.testing.assert_array_equal(scale, scale_rows(y))
    codes = OPS["quantize_rows_i8"].ref([y, scale], {}, {})
    np.testing.assert_array_equal(codes, quantize_rows(y, scale))
    assert np.abs(codes).max(axis=-1).min() == 127  # every row uses the full range
    back = OPS["dequantize_rows_i8"].ref([codes, scale], {}, {})
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, dequantize_rows(codes, scale))
    assert np.all(np.abs(back - y) <= scale[..., None] / 2 * (1 + 1e-6))
    # clipping: a scale too small for its row saturates at +-127
    clipped = OPS["quantize_rows_i8"].ref([y, scale / 2], {}, {})
    assert clipped.max() == 127 and clipped.min() == -127


def test_int8_rows_ops_check_their_operands():
    x, s = TensorType("f32", (1, "past", 2, 4)), TensorType("f32", (1, "past", 2))
    assert infer_type("row_scale_i8", [x], {}) == s
    assert infer_type("quantize_rows_i8", [x, s], {}) == x.with_dtype("i8")
    assert infer_type("dequantize_rows_i8", [x.with_dtype("i8"), s], {}) == x
    with pytest.raises(OpError, match="scales of its rows"):
        infer_type("quantize_rows_i8", [x, TensorType("f32", (1, "past", 4))], {})
    with pytest.raises(OpError, match="expected i8"):
        infer_type("dequantize_rows_i8", [x, s], {})
    with pytest.raises(OpError, match="expected f32"):
        infer_type("row_scale_i8", [x.with_dtype("i32")], {})


def decode_steps(module, prompt, steps, cache_names, past_of=None):
    """Prefill, then ``steps`` greedy decodes; (logits of each step, tokens, last outputs). The cache
    buffers hold ``len(prompt) + steps`` rows. ``past_of(outputs, rows) -> cache inputs`` turns one
    step's outputs (their first ``rows`` rows filled) into the next's cache buffers."""
    capacity = len(prompt) + steps
    past_of = past_of or (lambda out, rows: cache_buffers({name: out[name] for name in cache_names}, capacity))
    out = run_module(module, "prefill", {"ids": np.array([prompt], np.int32),
                                         "pos": np.arange(len(prompt), dtype=np.int32)})
    logits, tokens = [out["logits"][0, -1]], list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        feed = {"ids": np.array([[tokens[-1]]], np.int32), "pos": np.array([len(tokens) - 1], np.int32)}
        out = run_module(module, "decode", {**feed, **past_of(out, len(tokens) - 1)})
        logits.append(out["logits"][0, 0])
    return np.stack(logits), tokens, out


PROMPT = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8]
STEPS = 6


def test_tiny_llama_int8_cache_against_fp32_and_a_hand_computed_reference(tiny_llama):
    module = load_hf_folder(tiny_llama)
    fp32 = PassManager(build_pipeline(SPEC.replace("quantize-kv-cache,", ""))).run(module)
    manager = PassManager(build_pipeline(SPEC))
    quantized = manager.run(module)
    verify_module(quantized)
    assert dict(manager.stats)["quantize-kv-cache"] == {"stored": 8, "loaded": 4, "fused_attention": 2}  # 4 per entry point storing it
    layers = quantized.meta["kv_cache"]["layers"]
    f32_names = [f"{r}.{i}" for i in range(layers) for r in "kv"]
    i8_names = [t.format(i=i) for i in range(layers) for t in quantized.meta["kv_cache"]["tensors"]]
    assert [p.name for p in quantized.functions["decode"].params] == ["ids", "pos"] + i8_names
    assert [name for name, _ in quantized.functions["prefill"].outputs] == ["logits"] + i8_names

    got, got_tokens, last = decode_steps(quantized, PROMPT, STEPS, i8_names)
    want, want_tokens, _ = decode_steps(fp32, PROMPT, STEPS, f32_names)
    np.testing.assert_array_equal(got[0], want[0])  # prefill attends over float k/v
    error = float(np.abs(got - want).max())
    print(f"tiny llama int8 KV cache: max |logits - fp32| over {STEPS} decode steps {error:.2e} "
          f"(|logits| up to {np.abs(want).max():.2f})")
    assert 0 < error < 3e-3
    assert got_tokens == want_tokens

    # The int8-cache semantics by hand: the fp32 graph fed the dequantized cache, the new row quantized in numpy.
    stored = {}

    def past_of(out, rows):
        for name in f32_names:
            new = out[name][:, rows - 1:rows] if name in stored else out[name]
            codes, scale = quantize_rows(new, scale_rows(new)), scale_rows(new)
            old = stored.get(name, (codes[:, :0], scale[:, :0]))
            stored[name] = (np.concatenate([old[0], codes], 1), np.concatenate([old[1], scale], 1))
        return cache_buffers({name: dequantize_rows(*stored[name]) for name in f32_names}, len(PROMPT) + STEPS)

    hand, hand_tokens, hand_last = decode_steps(fp32, PROMPT, STEPS, f32_names, past_of)
    past_of(hand_last, len(PROMPT) + STEPS)
    np.testing.assert_allclose(got, hand, atol=1e-6, rtol=0)
    assert got_tokens == hand_tokens
    for name in f32_names:
        np.testing.assert_array_equal(last[name], stored[name][0])
        np.testing.assert_array_equal(last[name + ".scale"], stored[name][1])
        assert last[name].shape == (1, len(PROMPT) + STEPS, 2, 16) and last[name].dtype == np.int8


def test_composes_with_weight_quantization(tiny_llama):
    module = PassManager(build_pipeline("fuse-linears,fold-constants,quantize-rtn{scheme=w8},quantize-kv-cache,"
                                        "cse,dce")).run(load_hf_folder(tiny_llama))
    verify_module(module)
    ops = {n.op for f in module.functions.values() for n in f.nodes}
    assert {"dequantize", "attention_i8_cache", "quantize_rows_i8"} <= ops
    names = [t.format(i=i) for i in range(2) for t in module.meta["kv_cache"]["tensors"]]
    logits, tokens, last = decode_steps(module, PROMPT, 2, names)
    assert np.isfinite(logits).all() and last["k.1"].dtype == np.int8


def test_only_8_bits_and_only_once():
    with pytest.raises(LLMOptError, match="bits=4 is not supported"):
        build_pipeline("quantize-kv-cache{bits=4}")
    module = parse_module(ir_with_meta(BEFORE), random_store(k__weight=(4, 8), v__weight=(4, 8)))
    once = QuantizeKVCache().run(module)
    with pytest.raises(LLMOptError, match="already i8"):
        QuantizeKVCache().run(once)


def test_modules_off_the_cache_convention_are_refused():
    store = random_store(k__weight=(4, 8), v__weight=(4, 8))
    no_meta = BEFORE.replace('meta {"kv_cache": {"dtype": "f32", "head_dim": 4, "kv_heads": 1, "layers": 1}}', "")
    with pytest.raises(LLMOptError, match="no KV cache"):
        QuantizeKVCache().run(parse_module(ir_with_meta(no_meta), store))
    not_concat = BEFORE.replace("return y=%a, k.0=%kc, v.0=%vc", "return y=%a, k.0=%kc, v.0=%v.0")
    with pytest.raises(LLMOptError, match=r"output v\.0 is not kv_write\(%v\.0, new, pos\)"):
        QuantizeKVCache().run(parse_module(ir_with_meta(not_concat), store))
    partial = BEFORE.replace("return y=%a, k.0=%kh, v.0=%vh", "return y=%a, k.0=%kh")
    with pytest.raises(LLMOptError, match=r"@prefill takes cache params \[\] and returns cache outputs \['k.0'\]"):
        QuantizeKVCache().run(parse_module(ir_with_meta(partial), store))
