"""quantize-rtn: golden IR text, lazy shared quantization, exclusion, the dequantize op, tiny Llama error."""

import numpy as np
import pytest

from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import WeightStore, parse_module, run_module, verify_module
from llmopt.ir.ops import OpError, infer_type
from llmopt.ir.types import TensorType
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant import SCHEMES, QuantizeRTN
from passes_golden import check_pass, ir, random_store

BEFORE = """
func @f(%x: f32[2, 64]) {
  %w = weight @blk.up.weight : f32[4, 64]
  %h = weight @lm_head.weight : f32[3, 4]
  %y = linear(%x, %w) : f32[2, 4]  # from=blk.up
  %z = linear(%y, %h) : f32[2, 3]  # from=lm_head
  return z=%z
}
"""

EXPECTED_ASYM = """
func @f(%x: f32[2, 64]) {
  %0 = weight @blk.up.weight : f32[4, 64]
  %1 = weight @lm_head.weight : f32[3, 4]
  %2 = weight @blk.up.weight.w4g32-asym.packed : u32[4, 8]  # from=blk.up by=quantize-rtn
  %3 = weight @blk.up.weight.w4g32-asym.scales : f32[4, 2]  # from=blk.up by=quantize-rtn
  %4 = weight @blk.up.weight.w4g32-asym.zeros : f32[4, 2]  # from=blk.up by=quantize-rtn
  %5 = dequantize(%2, %3, %4) {in_features=64, out_features=4, scheme='w4g32-asym'} : f32[4, 64]  # from=blk.up by=quantize-rtn
  %6 = linear(%x, %5) : f32[2, 4]  # from=blk.up
  %7 = linear(%6, %1) : f32[2, 3]  # from=lm_head
  return z=%7
}
"""

EXPECTED_W8_NO_EXCLUDE = """
func @f(%x: f32[2, 64]) {
  %0 = weight @blk.up.weight : f32[4, 64]
  %1 = weight @lm_head.weight : f32[3, 4]
  %2 = weight @blk.up.weight.w8.packed : u32[4, 16]  # from=blk.up by=quantize-rtn
  %3 = weight @blk.up.weight.w8.scales : f32[4, 1]  # from=blk.up by=quantize-rtn
  %4 = dequantize(%2, %3) {in_features=64, out_features=4, scheme='w8'} : f32[4, 64]  # from=blk.up by=quantize-rtn
  %5 = linear(%x, %4) : f32[2, 4]  # from=blk.up
  %6 = weight @lm_head.weight.w8.packed : u32[3, 1]  # from=lm_head by=quantize-rtn
  %7 = weight @lm_head.weight.w8.scales : f32[3, 1]  # from=lm_head by=quantize-rtn
  %8 = dequantize(%6, %7) {in_features=4, out_features=3, scheme='w8'} : f32[3, 4]  # from=lm_head by=quantize-rtn
  %9 = linear(%5, %8) : f32[2, 3]  # from=lm_head
  return z=%9
}
"""

SHAPES = dict(blk__up__weight=(4, 64), lm_head__weight=(3, 4))


def dequantized(scheme, w):
    return scheme.dequantize(scheme.quantize(w))


def test_golden_text_asymmetric_and_lm_head_excluded_by_default():
    store = random_store(**SHAPES)
    result = check_pass(QuantizeRTN(scheme="w4g32-asym"), BEFORE, EXPECTED_ASYM, store, inputs={})
    assert result.stats == {"quantized": 1, "skipped_shape": 0, "weights_quantized": 1}
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    w = dequantized(SCHEMES["w4g32-asym"], store.get("blk.up.weight"))
    want = (x @ w.T) @ store.get("lm_head.weight").T
    np.testing.assert_allclose(run_module(result.module, "f", {"x": x})["z"], want, atol=1e-5, rtol=0)


def test_golden_text_symmetric_nothing_excluded():
    store = random_store(**SHAPES)
    result = check_pass(QuantizeRTN(scheme="w8", rules=""), BEFORE, EXPECTED_W8_NO_EXCLUDE, store, inputs={})
    assert result.stats["weights_quantized"] == 2
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    up, head = (dequantized(SCHEMES["w8"], store.get(n)) for n in ("blk.up.weight", "lm_head.weight"))
    np.testing.assert_allclose(run_module(result.module, "f", {"x": x})["z"], (x @ up.T) @ head.T, atol=1e-5, rtol=0)


def test_weights_narrower_than_a_group_get_one_short_group():
    """K = 64 < 128: quantized with one (short) group per row, no longer skipped."""
    store = random_store(**SHAPES)
    result = QuantizeRTN(scheme="w4g128").apply(parse_module(ir(BEFORE), store))
    assert result.stats == {"quantized": 1, "skipped_shape": 0, "weights_quantized": 1}
    assert result.module.weights.type("blk.up.weight.w4g128.scales") == TensorType("f32", (4, 1))
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    w = dequantized(SCHEMES["w4g128"], store.get("blk.up.weight"))
    want = (x @ w.T) @ store.get("lm_head.weight").T
    np.testing.assert_allclose(run_module(result.module, "f", {"x": x})["z"], want, atol=1e-5, rtol=0)


def test_quantization_is_lazy_and_shared_by_the_parts_of_a_weight():
    source, loads, store = random_store(**SHAPES), [], WeightStore()
    for name in source:
        store.add(name, source.type(name), lambda name=name: loads.append(name) or source.get(name))
    new = QuantizeRTN(scheme="w4g32-asym").run(parse_module(ir(BEFORE), store)).weights
    assert loads == []
    parts = [new.get(f"blk.up.weight.w4g32-asym.{part}") for part in ("packed", "scales", "zeros")]
    assert loads == ["blk.up.weight"]
    q = SCHEMES["w4g32-asym"].quantize(source.get("blk.up.weight"))
    np.testing.assert_array_equal(parts[0], SCHEMES["w4g32-asym"].pack(q.codes))
    np.testing.assert_array_equal(parts[2], q.zeros)
    new.get("blk.up.weight.w4g32-asym.scales")  # every part was handed out: the cache was freed
    assert loads == ["blk.up.weight"] * 2


def test_dequantize_op_checks_its_operands():
    attrs = dict(scheme="w4g32-asym", out_features=4, in_features=64)
    packed, groups = TensorType("u32", (4, 8)), TensorType("f32", (4, 2))
    assert infer_type("dequantize", [packed, groups, groups], attrs) == TensorType("f32", (4, 64))
    with pytest.raises(OpError, match="expected operands"):
        infer_type("dequantize", [packed, groups], attrs)
    with pytest.raises(OpError, match="unknown quantization scheme"):
        infer_type("dequantize", [packed, groups], {**attrs, "scheme": "int5"})
    ragged = dict(scheme="w4g128", out_features=4, in_features=200)  # 128 + a short group of 72
    assert infer_type("dequantize", [TensorType("u32", (4, 25)), groups], ragged) == TensorType("f32", (4, 200))
    with pytest.raises(OpError, match="expected operands"):
        infer_type("dequantize", [TensorType("u32", (4, 25)), TensorType("f32", (4, 1))], ragged)


def test_pipeline_spec_and_unknown_scheme():
    (pass_,) = build_pipeline("quantize-rtn{scheme=w8,rules=up=skip;lm_head=w4g128}")
    assert pass_ == QuantizeRTN(scheme="w8", rules="up=skip;lm_head=w4g128")
    with pytest.raises(LLMOptError, match="w4g128"):
        build_pipeline("quantize-rtn{scheme=int4}")[0].apply(parse_module(ir(BEFORE), random_store(**SHAPES)))


def test_rules_choose_a_scheme_per_layer_first_match_wins():
    store = random_store(**SHAPES)
    module = parse_module(ir(BEFORE), store)
    result = QuantizeRTN(scheme="w4g32-asym", rules="lm_head=w8;blk.*=skip").apply(module)
    schemes = {n.source: n.attr["scheme"] for n in result.module.functions["f"].nodes if n.op == "dequantize"}
    assert schemes == {"lm_head": "w8"}  # blk.up matched the glob and stays float
    result = QuantizeRTN(scheme="w8", rules="*.up.weight=w4g32-asym;up=skip").apply(module)
    schemes = {n.source: n.attr["scheme"] for n in result.module.functions["f"].nodes if n.op == "dequantize"}
    assert schemes == {"blk.up": "w4g32-asym", "lm_head": "w8"}  # the weight name matched first


def test_bad_rules_are_user_errors():
    with pytest.raises(LLMOptError, match="pattern=scheme"):
        QuantizeRTN(rules="lm_head").apply(parse_module(ir(BEFORE), random_store(**SHAPES)))
    with pytest.raises(LLMOptError, match="unknown quantization scheme 'int2'"):
        QuantizeRTN(rules="lm_head=int2").apply(parse_module(ir(BEFORE), random_store(**SHAPES)))


def logits_error(module, spec: str) -> tuple[float, dict]:
    manager = PassManager(build_pipeline(spec))
    quantized = manager.run(module)
    verify_module(quantized)
    feed = {"ids": np.array([[1, 17, 99, 3, 42, 7, 64, 5]], np.int32), "pos": np.arange(8, dtype=np.int32)}
    want, got = (run_module(m, "logits", feed)["logits"] for m in (module, quantized))
    return float(np.abs(got - want).max()), dict(manager.stats)


def test_tiny_llama_w8_is_close_and_w4g32_asym_is_further(tiny_llama):
    module = load_hf_folder(tiny_llama)
    error_w8, stats = logits_error(module, "quantize-rtn{scheme=w8}")
    error_w4, _ = logits_error(module, "quantize-rtn{scheme=w4g32-asym}")
    print(f"tiny llama max |logits - fp32|: w8 {error_w8:.2e}, w4g32-asym {error_w4:.2e}")
    assert stats["quantize-rtn"] == {"quantized": 42, "skipped_shape": 0, "weights_quantized": 14}  # 7 per layer
    assert 0 < error_w8 < 1e-2
    assert error_w8 < error_w4 < 1.0
