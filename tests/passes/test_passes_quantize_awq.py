"""quantize-awq: golden IR text, exact input scaling (norm fold and mul), the graph computing the
stream's effective weights, AWQ and its clipping against RTN on outlier activations, tiny Llama."""

import numpy as np
import pytest

from llmopt.compiler import quantization_pass
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import WeightStore, parse_module, print_module, run_module, verify_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant import SCHEMES, QuantizeAWQ, QuantizeRTN
from llmopt.passes.quant.awq import ClipSearch
from llmopt.passes.quant.smoothing import smooth_linears
from llmopt.passes.quant.rewrite import linear_weights
from passes_golden import assert_round_trips, assert_same_text, ir, without_memory

BEFORE = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %e = weight @embed.weight : f32[16, 32]
  %x = embedding(%ids, %e) : f32[1, seq, 32]  # from=embed
  %g = weight @norm.weight : f32[32]
  %h = rms_norm(%x, %g) {eps=1e-05} : f32[1, seq, 32]  # from=norm
  %w1 = weight @blk.up.weight : f32[24, 32]
  %y = linear(%h, %w1) : f32[1, seq, 24]  # from=blk.up
  %w2 = weight @blk.down.weight : f32[8, 24]
  %z = linear(%y, %w2) : f32[1, seq, 8]  # from=blk.down
  return z=%z
}
"""

EXPECTED = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %0 = weight @embed.weight : f32[16, 32]
  %1 = embedding(%ids, %0) : f32[1, seq, 32]  # from=embed
  %2 = weight @norm.weight.smoothquant : f32[32]  # by=quantize-awq
  %3 = rms_norm(%1, %2) {eps=1e-05} : f32[1, seq, 32]  # from=norm
  %4 = weight @blk.up.weight : f32[24, 32]
  %5 = weight @blk.up.weight.smoothquant : f32[24, 32]  # from=blk.up by=quantize-awq
  %6 = weight @blk.up.weight.smoothquant.w4g8.packed : u32[24, 4]  # from=blk.up by=quantize-awq
  %7 = weight @blk.up.weight.smoothquant.w4g8.scales : f32[24, 4]  # from=blk.up by=quantize-awq
  %8 = dequantize(%6, %7) {in_features=32, out_features=24, scheme='w4g8'} : f32[24, 32]  # from=blk.up by=quantize-awq
  %9 = linear(%3, %8) : f32[1, seq, 24]  # from=blk.up
  %10 = weight @blk.down.weight : f32[8, 24]
  %11 = weight @blk.down.weight.smoothquant.inv_scale : f32[24]  # from=blk.down by=quantize-awq
  %12 = mul(%9, %11) : f32[1, seq, 24]  # from=blk.down by=quantize-awq
  %13 = weight @blk.down.weight.smoothquant : f32[8, 24]  # from=blk.down by=quantize-awq
  %14 = weight @blk.down.weight.smoothquant.w4g8.packed : u32[8, 3]  # from=blk.down by=quantize-awq
  %15 = weight @blk.down.weight.smoothquant.w4g8.scales : f32[8, 3]  # from=blk.down by=quantize-awq
  %16 = dequantize(%14, %15) {in_features=24, out_features=8, scheme='w4g8'} : f32[8, 24]  # from=blk.down by=quantize-awq
  %17 = linear(%12, %16) : f32[1, seq, 8]  # from=blk.down
  return z=%17
}
"""

TOKENS = np.random.default_rng(1).integers(0, 16, (4, 16)).astype(np.int32)


def outlier_module():
    """BEFORE with two embedding channels and two rows of ``blk.up`` 50x larger, so both linears'
    inputs have outlier channels."""
    rng = np.random.default_rng(0)
    store = WeightStore()
    embed = rng.standard_normal((16, 32)).astype(np.float32)
    embed[:, [3, 17]] *= 50
    up = rng.standard_normal((24, 32)).astype(np.float32)
    up[[5, 11]] *= 50
    store.add_array("embed.weight", embed)
    store.add_array("norm.weight", (1 + 0.1 * rng.standard_normal(32)).astype(np.float32))
    store.add_array("blk.up.weight", up)
    store.add_array("blk.down.weight", rng.standard_normal((8, 24)).astype(np.float32))
    return parse_module(ir(BEFORE), store)


def feed(seq=16):
    return {"ids": np.random.default_rng(2).integers(0, 16, (1, seq)).astype(np.int32),
            "pos": np.arange(seq, dtype=np.int32)}


def test_golden_text_folds_into_the_norm_and_scales_the_other_input():
    module = outlier_module()
    result = QuantizeAWQ(scheme="w4g8").apply_with_tokens(module, TOKENS)
    assert_same_text(print_module(result.module), ir(EXPECTED))
    verify_module(result.module)
    assert_round_trips(result.module)
    assert without_memory(result.stats) == {"quantized": 2, "skipped_shape": 0, "weights_quantized": 2, "smoothed": 2,
                            "scaled": 1, "folded": 1, "calibrated": 2}


def test_chosen_scales_leave_the_fp32_function_unchanged():
    """AWQ's scales applied with the weights W * s kept in float: norm fold and mul path are exact."""
    module = outlier_module()
    results = QuantizeAWQ(scheme="w4g8").calibrate(module, TOKENS)
    factors = {name: result.input_scale for (name, _), result in results.items()}
    assert all(s is not None and np.ptp(s) > 0 for s in factors.values())  # both linears rescaled
    scaled = smooth_linears(module, factors, "quantize-awq")
    assert scaled.stats == {"smoothed": 2, "scaled": 1, "folded": 1}
    verify_module(scaled.module)
    want, got = (run_module(m, "prefill", feed())["z"] for m in (module, scaled.module))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_graph_computes_the_effective_weights_the_stream_continued_with():
    module = outlier_module()
    awq = QuantizeAWQ(scheme="w4g8")
    results = awq.calibrate(module, TOKENS)
    quantized = awq.apply_with_tokens(module, TOKENS).module
    up, down = (awq.effective_weight(results[name, "w4g8"], get_scheme("w4g8"))
                for name in ("blk.up.weight", "blk.down.weight"))
    inputs = feed()
    x = module.weights.get("embed.weight")[inputs["ids"]]
    g = module.weights.get("norm.weight")
    h = g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)
    want = (h @ up.T) @ down.T
    got = run_module(quantized, "prefill", inputs)["z"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


TIE = 1 + 1e-5  # the pass sums errors in float32 through X^T X, the test in float64 through X


def outlier_linear(seed=0, tokens=256, in_features=256, out_features=64):
    """A weight and its inputs, four input channels of which are 50x larger than the rest."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, in_features)).astype(np.float32)
    x[:, rng.choice(in_features, 4, replace=False)] *= 50
    w = (rng.standard_normal((out_features, in_features)) * 0.05).astype(np.float32)
    return w, x


def awq_error(awq: QuantizeAWQ, w, x, scheme_name: str) -> float:
    scheme = get_scheme(scheme_name)
    quantized = awq.quantize_weight(w, [x[None]], scheme)
    return output_error(x, w - awq.effective_weight(quantized, scheme))


def output_error(x, delta) -> float:
    return float(np.square(x.astype(np.float64) @ delta.T.astype(np.float64)).sum())


def rtn_error(w, x, scheme_name: str) -> float:
    return awq_error(QuantizeAWQ(n_grid=1, clip_grid=0), w, x, scheme_name)


@pytest.mark.parametrize("scheme", ["w4g128", "w3g128", "w4g32-asym"])
def test_awq_beats_rtn_on_activation_outliers(scheme):
    w, x = outlier_linear()
    rtn = rtn_error(w, x, scheme)
    np.testing.assert_allclose(rtn, output_error(x, w - SCHEMES[scheme].dequantize(SCHEMES[scheme].quantize(w))))
    scaled_only = awq_error(QuantizeAWQ(clip_grid=0), w, x, scheme)
    full = awq_error(QuantizeAWQ(), w, x, scheme)
    print(f"{scheme}: output error RTN {rtn:.4g}, AWQ scales {scaled_only:.4g}, AWQ scales + clip {full:.4g}")
    assert scaled_only <= 0.8 * rtn
    assert full <= 0.8 * rtn


@pytest.mark.parametrize("scheme", ["w4g128", "w3g128-asym", "nf4g64", "w4"])
@pytest.mark.parametrize("outliers", [True, False])
def test_clipping_never_increases_the_calibration_error(scheme, outliers):
    w, x = outlier_linear(out_features=32)
    if not outliers:  # clipping has less to win
        x = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    rtn = rtn_error(w, x, scheme) * TIE
    scaled_only = awq_error(QuantizeAWQ(clip_grid=0), w, x, scheme)
    independent_clips = awq_error(QuantizeAWQ(n_grid=1, clip_sweeps=0), w, x, scheme)
    assert awq_error(QuantizeAWQ(n_grid=1), w, x, scheme) <= independent_clips * TIE
    assert independent_clips <= rtn
    assert awq_error(QuantizeAWQ(), w, x, scheme) <= scaled_only * TIE
    assert scaled_only <= rtn  # alpha = 0 is RTN


@pytest.mark.parametrize("scheme", ["w4g128", "w4g64-asym", "nf4g128"])
def test_ragged_groups_awq_beats_rtn_and_clipping_never_hurts(scheme):
    """K = 200: the last group is short (72 or 8 columns); its clipping is searched like the others."""
    w, x = outlier_linear(in_features=200)
    rtn = rtn_error(w, x, scheme)
    np.testing.assert_allclose(rtn, output_error(x, w - get_scheme(scheme).dequantize(get_scheme(scheme).quantize(w))))
    scaled_only = awq_error(QuantizeAWQ(clip_grid=0), w, x, scheme)
    full = awq_error(QuantizeAWQ(), w, x, scheme)
    print(f"{scheme} K=200: output error RTN {rtn:.4g}, AWQ scales {scaled_only:.4g}, AWQ scales + clip {full:.4g}")
    assert scaled_only <= 0.8 * rtn
    assert full <= scaled_only * TIE
    # with the one ratio 1 the clip search is round-to-nearest, short last group included
    h = (x.T @ x).astype(np.float32)
    unclipped = ClipSearch(w, h, get_scheme(scheme), np.array([1.0])).run(sweeps=1)
    rtn_codes = get_scheme(scheme).quantize(w)
    np.testing.assert_array_equal(unclipped.codes, rtn_codes.codes)
    np.testing.assert_array_equal(unclipped.scales, rtn_codes.scales)


def test_options_and_the_quant_spec():
    pass_ = quantization_pass("awq:w3g128", calibration=(("samples", "4"), ("seq_len", "64")))
    assert pass_ == QuantizeAWQ(scheme="w3g128", samples=4, seq_len=64)
    (parsed,) = build_pipeline("quantize-awq{scheme=w4g32,n_grid=10,clip_grid=0}")
    assert parsed == QuantizeAWQ(scheme="w4g32", n_grid=10, clip_grid=0)
    with pytest.raises(LLMOptError, match="max_shrink"):
        QuantizeAWQ(max_shrink=0)


def test_tiny_llama_folds_norms_and_is_closer_to_fp32_than_rtn(tiny_llama):
    module = PassManager(build_pipeline("fuse-linears,fold-constants")).run(load_hf_folder(tiny_llama))
    tokens = np.random.default_rng(0).integers(0, 128, (8, 64)).astype(np.int32)
    result = QuantizeAWQ(scheme="w4g32").apply_with_tokens(module, tokens)
    verify_module(result.module)
    stats = result.stats
    assert stats["calibrated"] == 8 and stats["weights_quantized"] == 8  # 4 fused linears per layer
    assert stats["folded"] == 4  # the norms in front of q/k/v and gate/up
    inputs = {"ids": np.random.default_rng(1).integers(0, 128, (1, 32)).astype(np.int32),
              "pos": np.arange(32, dtype=np.int32)}
    want = run_module(module, "logits", inputs)["logits"]
    errors = {name: float(np.abs(run_module(m, "logits", inputs)["logits"] - want).mean())
              for name, m in (("awq", result.module), ("rtn", QuantizeRTN(scheme="w4g32").run(module)))}
    print(f"tiny llama mean |logits - fp32|: {errors}, stats {stats}")
    assert errors["awq"] < errors["rtn"]
    float_linears = {w.attr["name"] for w in linear_weights(result.module.functions["decode"]).values()}
    assert float_linears == {"lm_head.weight"}  # decode reads the same quantized weights as prefill
