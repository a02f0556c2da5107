"""The fused low-bit CPU linear kernels, their TE definition, and when codegen uses them."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

from llmopt.codegen.build import compile_module
from llmopt.codegen.kernels.cpu_linear import host_cpu_target
from llmopt.codegen.kernels.cpu_quant_linear import STORED_LAYOUT, emit_quant_linear, supports
from llmopt.codegen.kernels.quant_linear_te import quant_linear_te
from llmopt.ir.graph import Builder, Module
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.ir.types import TensorType
from llmopt.ir.weights import WeightStore
from llmopt.targets import get_target

TARGET = host_cpu_target()
RNG = np.random.default_rng(0)

# (scheme, N, K, bias): N not a multiple of the 64-row block in three cases; per-channel w8,
# symmetric and asymmetric 4-bit groups, 2-bit codes (16 per word), NF4 codebook levels. Then
# ragged groups (K not a multiple of the group: the last group short): SmolLM2's K = 576 with
# groups of 128 (4 full + 64), 8-bit codes with K = 200 (1 full group + 72), and K < group (no
# full group at all).
CASES = [("w4g128", 130, 256, True), ("w8", 64, 96, False), ("w4g32-asym", 70, 96, True), ("w2g64", 40, 128, False),
         ("nf4g64", 100, 128, True),
         ("w4g128", 70, 576, True), ("w4g128-asym", 64, 576, False), ("nf4g128", 40, 576, True),
         ("w8g128-asym", 40, 200, True), ("w4g128", 20, 64, False)]


def _quantized(scheme_name: str, n: int, k: int):
    """(scheme, [packed, scales(, zeros)] in the IR layout, the dequantized f32 weight)."""
    scheme = get_scheme(scheme_name)
    q = scheme.quantize(RNG.standard_normal((n, k)).astype(np.float32))
    parts = [scheme.pack(q.codes), q.scales] + ([q.zeros] if scheme.has_zeros else [])
    return scheme, parts, scheme.dequantize_packed(parts[0], q.scales, q.zeros, k)


def _kernel_module(scheme, n: int, k: int, bias: bool, decode: bool, blocked: bool) -> tvm.IRModule:
    """``main(x[1, rows, k], packed, scales[, zeros][, bias])`` around emit_quant_linear."""
    rows = 1 if decode else tirx.Var("seq", "int64")
    columns = [(scheme.packed_width(k), "uint32"), (scheme.groups(k), "float32")]
    columns += [(scheme.groups(k), "float32")] if scheme.has_zeros else []
    shapes = [STORED_LAYOUT.packed_shape(n, c) if blocked else (n, c) for c, _ in columns]
    params = [relax.Var("x", relax.TensorType([1, rows, k], "float32"))]
    params += [relax.Var(f"p{i}", relax.TensorType(list(shape), dtype)) for i, (shape, (_, dtype))
               in enumerate(zip(shapes, columns))]
    params += [relax.Var("b", relax.TensorType([n], "float32"))] if bias else []
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            parts = params[1:1 + len(columns)]
            zeros = parts[2] if scheme.has_zeros else None
            y = emit_quant_linear(bb, params[0], parts[0], parts[1], zeros, params[-1] if bias else None,
                                  scheme=scheme, out_features=n, in_features=k, target=TARGET)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _compile(mod: tvm.IRModule):
    """``main`` of the compiled module, taking and returning numpy arrays."""
    with TARGET:
        executable = tvm.compile(relax.get_pipeline("zero")(relax.transform.LegalizeOps()(mod)), target=TARGET)
    main = relax.VirtualMachine(executable, tvm.cpu())["main"]
    return lambda *args: main(*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("decode", [True, False], ids=["gemv", "gemm"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-k{c[2]}" for c in CASES])
def test_kernel_matches_dequantize_then_matmul(case, decode):
    name, n, k, bias = case
    scheme, parts, weight = _quantized(name, n, k)
    if not supports(scheme, n, k, TARGET):
        pytest.skip(f"{name} needs AVX-512 ({TARGET.attrs['mcpu']})")
    b = RNG.standard_normal(n).astype(np.float32)
    stored = [STORED_LAYOUT.pack(p) for p in parts]
    main = _compile(_kernel_module(scheme, n, k, bias, decode, blocked=True))
    for rows in [1] if decode else [7, 10, 33]:  # 6-row tiles, then remainder tiles of 1; 4; 2 and 1 rows
        x = RNG.standard_normal((1, rows, k)).astype(np.float32)
        want = x @ weight.T + (b if bias else 0)
        got = main(x, *stored, *([b] if bias else []))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_parts_in_the_ir_layout_are_blocked_in_the_graph():
    scheme, parts, weight = _quantized("w4g32-asym", 70, 96)
    x = RNG.standard_normal((1, 1, 96)).astype(np.float32)
    got = _compile(_kernel_module(scheme, 70, 96, False, True, blocked=False))(x, *parts)
    np.testing.assert_allclose(got, x @ weight.T, rtol=0, atol=2e-5 * np.abs(x @ weight.T).max())


@pytest.mark.parametrize("name, k", [("w4g32-asym", 128), ("nf4g64", 128), ("fp8", 128), ("w3g64", 128),
                                     ("w4g128-asym", 576), ("nf4g128", 200), ("w3g64", 200)])  # ragged
def test_te_definition_matches_the_reference(name, k):
    """The target-independent compute (what a GPU schedule would start from), default-scheduled."""
    scheme, parts, weight = _quantized(name, 24, k)
    x = RNG.standard_normal((3, k)).astype(np.float32)
    b = RNG.standard_normal(24).astype(np.float32)
    tensors = [te.placeholder((3, k), "float32", "x")]
    tensors += [te.placeholder(p.shape, "uint32" if p.dtype == np.uint32 else "float32", f"p{i}")
                for i, p in enumerate(parts)]
    codebook = te.placeholder((2 ** scheme.bits,), "float32", "codebook") if scheme.codebook else None
    bias = te.placeholder((24,), "float32", "b")
    zeros = tensors[3] if scheme.has_zeros else None
    y = quant_linear_te(tensors[0], tensors[1], tensors[2], zeros, codebook, bias, scheme=scheme, in_features=k)
    inputs = tensors + ([codebook] if codebook is not None else []) + [bias]
    func = tvm.tirx.build(te.create_prim_func(inputs + [y]), target="llvm")
    arrays = [x, *parts] + ([np.asarray(scheme.codebook, np.float32)] if codebook is not None else []) + [b]
    out = tvm.runtime.tensor(np.zeros((3, 24), np.float32))
    func(*[tvm.runtime.tensor(a) for a in arrays], out)
    np.testing.assert_allclose(out.numpy(), x @ weight.T + b, rtol=0, atol=1e-5 * np.abs(x @ weight.T).max())


def test_supported_schemes():
    assert supports(get_scheme("w4g128"), 576, 1536, TARGET)
    assert supports(get_scheme("w8"), 576, 576, TARGET)
    assert supports(get_scheme("w4g32-asym"), 10, 96, TARGET)
    assert supports(get_scheme("w3"), 10, 90, TARGET)  # one group per row: whole 10-code words
    assert not supports(get_scheme("w3g128"), 576, 1536, TARGET)  # 128 codes are not whole 10-code words
    assert not supports(get_scheme("fp8"), 576, 576, TARGET)  # 256 codebook levels: generic dequantize
    assert supports(get_scheme("w4g128"), 576, 576, TARGET)  # 4 groups of 128 and a short one of 64
    assert not supports(get_scheme("w4g128"), 576, 572, TARGET)  # the short last group is not whole words
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert supports(get_scheme("w4g64"), 576, 576, avx2) and not supports(get_scheme("nf4g64"), 576, 576, avx2)


# ---- codegen: which dequantize nodes are fused, on a one-linear IR module --------------------

def _linear_module(name: str, n: int, k: int, dequantized_is_output: bool) -> Module:
    """``f(x[1, seq, k]) -> linear(x, dequantize(...), bias)`` (and the dequantized weight itself)."""
    scheme, parts, _ = _quantized(name, n, k)
    store = WeightStore()
    for part, array in zip(["packed", "scales", "zeros"], parts):
        store.add_array(f"w.{part}", array)
    store.add_array("b", RNG.standard_normal(n).astype(np.float32))
    builder = Builder("f")
    x = builder.param("x", TensorType("f32", (1, "seq", k)))
    operands = [builder.weight(name, store.type(name)) for name in store.names() if name.startswith("w.")]
    weight = builder.add("dequantize", *operands, scheme=name, out_features=n, in_features=k)
    builder.output("y", builder.add("linear", x, weight, builder.weight("b", store.type("b"))))
    builder.output("x2", builder.add("add", x, x))  # (a second buffer size: codegen/shape_func_order.py
    # fails on a shape function of one store)
    if dequantized_is_output:
        builder.output("w", weight)
    return Module({"f": builder.finish()}, store)


@pytest.mark.parametrize("name, dequantized_is_output, fused, k", [
    ("w4g32-asym", False, True, 128),
    ("w4g32-asym", True, False, 128),  # the f32 weight is a result: materialized, the linear reads it
    ("nf4g64", False, supports(get_scheme("nf4g64"), 70, 128, TARGET), 128),  # fused where AVX-512 is
    ("fp8", False, False, 128),  # 256 codebook levels: the generic dequantize (table lookup), then the f32 kernel
    ("w4g64-asym", False, True, 200),  # ragged: 3 groups of 64 and one of 8, fused
    ("w3g64", False, False, 200),  # ragged, 64 codes are not whole 10-code words: the generic dequantize
])
def test_codegen_fuses_only_dequantizes_read_by_linears(name, dequantized_is_output, fused, k):
    module = _linear_module(name, 70, k, dequantized_is_output)
    library = compile_module(module, get_target("cpu"))
    assert {"w.packed", "w.scales"} <= library.packed if fused else not library.packed & {"w.packed", "w.scales"}
    stored = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    vm = relax.VirtualMachine(library.executable, tvm.cpu())
    x = RNG.standard_normal((1, 5, k)).astype(np.float32)
    got = vm["f"](tvm.runtime.tensor(x), *stored)
    want = run_module(module, "f", {"x": x})
    np.testing.assert_allclose(got[0].numpy(), want["y"], rtol=0, atol=1e-5 * np.abs(want["y"]).max())
    if dequantized_is_output:
        np.testing.assert_array_equal(got[2].numpy(), want["w"])
