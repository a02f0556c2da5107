"""``--activations int8`` (``int8-activations``, the ``linear_w4a8`` op): prefill's symmetric 4-bit
linears take int8 activations; the op's reference, the rewrite, the built artifact against the IR
interpreter, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from llmopt.compiler import BuildOptions, build, load, optimize
from llmopt.compare import parse_variant
from llmopt.errors import LLMOptError
from llmopt.ir.interp import run_module
from llmopt.ir.parameters import logical_parameters
from llmopt.ir.int8_ops import linear_w4a8_reference, w4a8_scheme
from llmopt.ir.ops import OpError
from llmopt.ir.quant_schemes import get_scheme
from llmopt.runtime import load as load_artifact

RNG = np.random.default_rng(0)
IDS = np.array([1, 17, 99, 3, 42, 7, 64, 2], dtype=np.int32)


@pytest.mark.parametrize("scheme_name, k", [("w4g32", 96), ("w4g128", 576), ("w4g64", 160)])
def test_reference_is_int8_activations_times_the_dequantized_weight(scheme_name, k):
    """The op's result equals, to f32 rounding, x quantized per (row, group) and dequantized, times
    the dequantized weight; and it is not plain f32 activations (the rounding is really there)."""
    scheme = get_scheme(scheme_name)
    w = RNG.standard_normal((24, k)).astype(np.float32)
    q = scheme.quantize(w)
    packed = scheme.pack(q.codes)
    x = RNG.standard_normal((5, k)).astype(np.float32)
    x[:, 3] *= 20  # an outlier channel: its group's scale is coarse
    y = linear_w4a8_reference(x, packed, q.scales, scheme_name)
    group = scheme.group_of(k)
    x_dq = np.empty_like(x, dtype=np.float64)
    for start in range(0, k, group):
        part = x[:, start:start + group]
        sx = np.abs(part).max(axis=1, keepdims=True) / np.float32(127)
        x_dq[:, start:start + group] = np.clip(np.round(part / sx), -127, 127) * sx.astype(np.float64)
    w_dq = scheme.dequantize_packed(packed, q.scales, None, k).astype(np.float64)
    np.testing.assert_allclose(y, x_dq @ w_dq.T, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert np.abs(y - x @ w_dq.T).max() > 1e-4 * np.abs(y).max()


@pytest.mark.parametrize("scheme_name, k", [("w4g128-asym", 576), ("w8", 576), ("nf4g64", 576), ("w4", 576),
                                            ("w4g32", 80)])
def test_other_schemes_are_not_w4a8(scheme_name, k):
    with pytest.raises(OpError):
        w4a8_scheme(scheme_name, k)


def _ops(module, function):
    return [node.op for node in module.functions[function].nodes]


def test_the_rewrite_touches_every_quantized_linear(tiny_llama):
    plain = optimize(load(tiny_llama), BuildOptions(quant="w4g32"))
    int8 = optimize(load(tiny_llama), BuildOptions(quant="w4g32", activations="int8"))
    for function in ("prefill", "decode", "logits"):
        linears = _ops(plain, function).count("linear")
        assert _ops(int8, function).count("linear_w4a8") == linears - 1  # all but the float LM head
        assert _ops(int8, function).count("dequantize") == 0  # dce removed the ones nothing reads
    node = next(n for n in int8.functions["prefill"].nodes if n.op == "linear_w4a8")
    assert node.attr["scheme"] == "w4g32" and node.created_by == "int8-activations"
    assert logical_parameters(int8) == logical_parameters(plain)  # the codes still stand for [N, K] weights


def test_the_functions_option_limits_the_rewrite(tiny_llama):
    from llmopt.passes.quant.int8_activations import Int8Activations
    quantized = optimize(load(tiny_llama), BuildOptions(quant="w4g32"))
    result = Int8Activations(functions="prefill").apply(quantized)
    assert "linear_w4a8" in _ops(result.module, "prefill")
    assert _ops(result.module, "decode") == _ops(quantized, "decode")
    with pytest.raises(LLMOptError, match="names prefil,"):
        Int8Activations(functions="prefil, decode").apply(quantized)


def test_asymmetric_schemes_keep_f32_activations(tiny_llama):
    module = optimize(load(tiny_llama), BuildOptions(quant="w4g32-asym", activations="int8"))
    assert "linear_w4a8" not in _ops(module, "prefill")


@pytest.fixture(scope="module")
def int8_artifact(tiny_llama, tmp_path_factory):
    options = BuildOptions(quant="w4g32", activations="int8")
    out = tmp_path_factory.mktemp("w4a8") / "art"
    build(tiny_llama, out, options)
    return out, optimize(load(tiny_llama), options)


def test_the_artifact_computes_the_interpreters_w4a8_model(int8_artifact):
    out, module = int8_artifact
    model = load_artifact(out)
    pos = np.arange(len(IDS), dtype=np.int32)
    want = run_module(module, "logits", {"ids": IDS[None], "pos": pos})["logits"][0]
    np.testing.assert_allclose(model.forward_logits(IDS), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    logits, cache = model.prefill(IDS)
    np.testing.assert_allclose(logits, want[-1], atol=2e-5 * np.abs(want).max(), rtol=0)
    # decode (its W4A8 GEMVs) continues as the interpreter's logits over the longer prompt do
    longer = np.append(IDS, np.int32(11))
    want_next = run_module(module, "logits", {"ids": longer[None], "pos": np.arange(len(longer), dtype=np.int32)})
    step, _ = model.decode(11, cache)
    np.testing.assert_allclose(step, want_next["logits"][0, -1], atol=2e-5 * np.abs(want).max(), rtol=0)
    assert "linear_w4a8" in (out / "model.ir").read_text()


@pytest.mark.parametrize("options, message", [
    (BuildOptions(activations="int8"), "needs 4-bit weights"),
    (BuildOptions(quant="w4g32", activations="int8", target="cuda"), "no int8-activation"),
    (BuildOptions(quant="w4g32", activations="int8", dtype="fp16"), "defined on f32"),
    (BuildOptions(quant="w4g32", activations="int4"), "is unknown"),
])
def test_bad_combinations_are_refused_before_any_work(options, message, tiny_llama, tmp_path):
    with pytest.raises(LLMOptError, match=message):
        build(tiny_llama, tmp_path / "out", options)


def test_compare_takes_an_act_step():
    assert parse_variant("w4g128+act=int8").activations == "int8"
    with pytest.raises(LLMOptError, match="act=int4"):
        parse_variant("w4g128+act=int4")
