"""quantize-smoothquant: golden IR text, the linear_w8a8 op's semantics, smoothing keeps the float
function (folded into norms or as a mul), smoothing beats plain W8A8 on activation outliers, tiny Llama."""

import numpy as np
import pytest

from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import parse_module, print_module, run_module, verify_module
from llmopt.ir.ops import OPS, OpError, infer_type
from llmopt.ir.quant_schemes import get_scheme
from llmopt.ir.types import TensorType
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant import SmoothQuant
from llmopt.passes.quant.smoothing import smooth_linears
from llmopt.passes.quant.w8a8 import w8a8_linears
from passes_golden import assert_round_trips, assert_same_text, ir, random_store, without_memory

BEFORE = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %e = weight @embed.weight : f32[16, 8]
  %x = embedding(%ids, %e) : f32[1, seq, 8]  # from=embed
  %g = weight @norm.weight : f32[8]
  %h = rms_norm(%x, %g) {eps=1e-06} : f32[1, seq, 8]  # from=norm
  %wq = weight @blk.q.weight : f32[8, 8]
  %wk = weight @blk.k.weight : f32[4, 8]
  %q = linear(%h, %wq) : f32[1, seq, 8]  # from=blk.q
  %k = linear(%h, %wk) : f32[1, seq, 4]  # from=blk.k
  %a = mul(%q, %q) : f32[1, seq, 8]  # from=blk.act
  %wo = weight @blk.o.weight : f32[8, 8]
  %o = linear(%a, %wo) : f32[1, seq, 8]  # from=blk.o
  %wh = weight @lm_head.weight : f32[16, 8]
  %z = linear(%o, %wh) : f32[1, seq, 16]  # from=lm_head
  return logits=%z, k=%k
}
"""

EXPECTED = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %0 = weight @embed.weight : f32[16, 8]
  %1 = embedding(%ids, %0) : f32[1, seq, 8]  # from=embed
  %2 = weight @norm.weight.smoothquant : f32[8]  # by=quantize-smoothquant
  %3 = rms_norm(%1, %2) {eps=1e-06} : f32[1, seq, 8]  # from=norm
  %4 = weight @blk.q.weight : f32[8, 8]
  %5 = weight @blk.k.weight : f32[4, 8]
  %6 = weight @blk.q.weight.smoothquant : f32[8, 8]  # from=blk.q by=quantize-smoothquant
  %7 = weight @blk.q.weight.smoothquant.w8.packed : u32[8, 2]  # from=blk.q by=quantize-smoothquant
  %8 = weight @blk.q.weight.smoothquant.w8.scales : f32[8, 1]  # from=blk.q by=quantize-smoothquant
  %9 = linear_w8a8(%3, %7, %8) : f32[1, seq, 8]  # from=blk.q by=quantize-smoothquant
  %10 = weight @blk.k.weight.smoothquant : f32[4, 8]  # from=blk.k by=quantize-smoothquant
  %11 = weight @blk.k.weight.smoothquant.w8.packed : u32[4, 2]  # from=blk.k by=quantize-smoothquant
  %12 = weight @blk.k.weight.smoothquant.w8.scales : f32[4, 1]  # from=blk.k by=quantize-smoothquant
  %13 = linear_w8a8(%3, %11, %12) : f32[1, seq, 4]  # from=blk.k by=quantize-smoothquant
  %14 = mul(%9, %9) : f32[1, seq, 8]  # from=blk.act
  %15 = weight @blk.o.weight : f32[8, 8]
  %16 = weight @blk.o.weight.smoothquant.inv_scale : f32[8]  # from=blk.o by=quantize-smoothquant
  %17 = mul(%14, %16) : f32[1, seq, 8]  # from=blk.o by=quantize-smoothquant
  %18 = weight @blk.o.weight.smoothquant : f32[8, 8]  # from=blk.o by=quantize-smoothquant
  %19 = weight @blk.o.weight.smoothquant.w8.packed : u32[8, 2]  # from=blk.o by=quantize-smoothquant
  %20 = weight @blk.o.weight.smoothquant.w8.scales : f32[8, 1]  # from=blk.o by=quantize-smoothquant
  %21 = linear_w8a8(%17, %19, %20) : f32[1, seq, 8]  # from=blk.o by=quantize-smoothquant
  %22 = weight @lm_head.weight : f32[16, 8]
  %23 = linear(%21, %22) : f32[1, seq, 16]  # from=lm_head
  return logits=%23, k=%13
}
"""

SHAPES = dict(embed__weight=(16, 8), norm__weight=(8,), blk__q__weight=(8, 8), blk__k__weight=(4, 8),
              blk__o__weight=(8, 8), lm_head__weight=(16, 8))
TOKENS = np.arange(16, dtype=np.int32).reshape(2, 8)


def feed(ids) -> dict:
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    return {"ids": ids, "pos": np.arange(ids.shape[1], dtype=np.int32)}


def test_golden_text_norm_folded_other_input_scaled_lm_head_float():
    module = parse_module(ir(BEFORE), random_store(**SHAPES))
    result = SmoothQuant().apply_with_tokens(module, TOKENS)
    assert_same_text(print_module(result.module), ir(EXPECTED))
    verify_module(result.module)
    assert_round_trips(result.module)
    assert without_memory(result.stats) == {"quantized": 3, "weights_quantized": 3, "smoothed": 3, "scaled": 1, "folded": 1,
                            "calibrated": 2}  # groups {q, k} (one input) and {o}


def test_linear_w8a8_reference_is_per_token_int8_times_per_channel_int8():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    x[..., 5] *= 50
    x[0, 1] = 0  # an all-zero token
    w, bias = rng.standard_normal((6, 40)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    scheme = get_scheme("w8")
    q = scheme.quantize(w)
    got = OPS["linear_w8a8"].ref([x, scheme.pack(q.codes), q.scales, bias], {}, {})
    x_scale = np.abs(x).max(-1, keepdims=True).astype(np.float64) / 127
    x_scale[x_scale == 0] = 1
    xq = np.clip(np.rint(x / x_scale), -127, 127).astype(np.int64)
    acc = np.einsum("btk,nk->btn", xq, q.codes.astype(np.int64) - 128)
    want = acc * x_scale * q.scales[:, 0] + bias
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert np.abs(xq).max() == 127


def test_linear_w8a8_checks_its_operands():
    x, codes, scales = TensorType("f32", (1, "seq", 70)), TensorType("u32", (6, 18)), TensorType("f32", (6, 1))
    assert infer_type("linear_w8a8", [x, codes, scales], {}) == TensorType("f32", (1, "seq", 6))
    with pytest.raises(OpError, match="expected codes, scales"):
        infer_type("linear_w8a8", [x, TensorType("u32", (6, 17)), scales], {})
    with pytest.raises(OpError, match="expected codes, scales"):
        infer_type("linear_w8a8", [x, codes, scales, TensorType("f32", (5,))], {})


BLOCKED_NORM = BEFORE.replace("  return logits=%z, k=%k",  # the norm weight is also read by an add: no fold
                              "  %s = add(%x, %g) : f32[1, seq, 8]\n  return logits=%z, k=%k, s=%s")


@pytest.mark.parametrize("before, folded, scaled", [(BEFORE, 1, 1), (BLOCKED_NORM, 0, 2)])
def test_smoothing_keeps_the_float_function(before, folded, scaled):
    module = parse_module(ir(before), random_store(**SHAPES))
    rng = np.random.default_rng(1)
    s_qk, s_o = (np.exp(rng.uniform(-2, 2, 8)).astype(np.float32) for _ in range(2))
    result = smooth_linears(module, {"blk.q.weight": s_qk, "blk.k.weight": s_qk, "blk.o.weight": s_o}, "test")
    verify_module(result.module)
    assert result.stats == {"smoothed": 3, "scaled": scaled, "folded": folded}
    ids = rng.integers(0, 16, 9)
    want, got = run_module(module, "prefill", feed(ids)), run_module(result.module, "prefill", feed(ids))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max())


OUTLIERS = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %e = weight @embed.weight : f32[64, 64]
  %x = embedding(%ids, %e) : f32[1, seq, 64]
  %g = weight @norm.weight : f32[64]
  %h = rms_norm(%x, %g) {eps=1e-06} : f32[1, seq, 64]
  %w = weight @blk.up.weight : f32[32, 64]
  %y = linear(%h, %w) : f32[1, seq, 32]  # from=blk.up
  return y=%y
}
"""


def test_smoothing_lowers_the_w8a8_error_on_activation_outliers():
    store = random_store(embed__weight=(64, 64), norm__weight=(64,), blk__up__weight=(32, 64))
    table = store.get("embed.weight")
    table[:, [3, 40]] *= 60  # two outlier channels, as in LLM activations
    store.add_array("embed.weight", table)
    module = parse_module(ir(OUTLIERS), store)
    ids = np.arange(64, dtype=np.int32)
    want = run_module(module, "prefill", feed(ids))["y"]
    smooth = SmoothQuant(rules="").apply_with_tokens(module, ids.reshape(4, 16))
    plain = w8a8_linears(module, {"blk.up.weight"}, "test")
    assert smooth.stats["folded"] == 1 and plain.stats["quantized"] == 1
    errors = {name: np.abs(run_module(result.module, "prefill", feed(ids))["y"] - want).mean()
              for name, result in (("smooth", smooth), ("plain", plain))}
    print(errors)
    assert errors["smooth"] < 0.5 * errors["plain"]


def test_tiny_llama_verifies_and_stays_close_to_fp32(tiny_llama):
    module = PassManager(build_pipeline("fuse-linears,fold-constants")).run(load_hf_folder(tiny_llama))
    tokens = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)
    pass_ = SmoothQuant(alpha=0.5)
    factors = pass_.calibrate(module, tokens)
    smoothed = smooth_linears(module, factors, pass_.name)
    result = pass_.apply_with_tokens(module, tokens)
    verify_module(result.module)
    assert result.stats["quantized"] == 3 * 8 and result.stats["folded"] == 4  # 8 linears in each of 3 functions
    ops = [node.op for node in result.module.functions["prefill"].nodes]
    assert ops.count("linear_w8a8") == 8 and ops.count("linear") == 1  # the LM head stays float
    ids = np.random.default_rng(1).integers(0, 128, 12)
    want = run_module(module, "logits", feed(ids))["logits"]
    np.testing.assert_allclose(run_module(smoothed.module, "logits", feed(ids))["logits"], want, atol=1e-5, rtol=0)
    got = run_module(result.module, "logits", feed(ids))["logits"]
    print(f"max |W8A8 - fp32| = {np.abs(got - want).max():.2e} of max |logit| {np.abs(want).max():.2f}")
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_pipeline_options_and_errors():
    (pass_,) = build_pipeline("quantize-smoothquant{alpha=0.8,samples=2,seq_len=16,rules=}")
    assert pass_ == SmoothQuant(alpha=0.8, samples=2, seq_len=16, rules="")
    module = parse_module(ir(BEFORE), random_store(**SHAPES))
    with pytest.raises(LLMOptError, match="w8 only"):
        SmoothQuant(scheme="w4g128").apply_with_tokens(module, TOKENS)
    with pytest.raises(LLMOptError, match="alpha"):
        SmoothQuant(alpha=1.5).apply_with_tokens(module, TOKENS)
    with pytest.raises(LLMOptError, match="w4g128; W8A8 layers are w8 or float"):
        SmoothQuant(rules="blk.o=w4g128").apply_with_tokens(module, TOKENS)
