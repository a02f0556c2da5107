"""The W4A8 CPU GEMM and GEMV (codegen/kernels/cpu_w4a8_linear.py) compute their numpy reference, with VNNI
and portably, and the reference is the stated semantics: int8 activations per group times the 4-bit levels."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from llmopt.codegen.build import relax_pipeline
from llmopt.codegen.kernels.cpu_linear import host_cpu_target
from llmopt.codegen.kernels.cpu_quant_linear import STORED_LAYOUT
from llmopt.codegen.kernels.cpu_w4a8_linear import (
    W4A8Shape,
    emit_w4a8_linear,
    has_vnni,
    make_w4a8_gemv,
    quantize_activations,
    supports_w4a8,
    w4a8_reference,
)
from llmopt.errors import LLMOptError
from llmopt.ir.quant_schemes import get_scheme
from llmopt.targets import get_target

TARGET = host_cpu_target(2)  # two row parts per N block: the parallel split is exercised
NO_VNNI = pytest.mark.skipif(not has_vnni(TARGET), reason="no AVX-512 VNNI")
ROWS = (1, 5, 7, 128)  # remainder tiles of 4, 2 and 1 rows, and full tiles


def _case(n: int, k: int, group: int, vnni: bool = True, blocked: bool = True):
    kind = ("vnni" if vnni else "portable") + ("" if blocked else "-ir-layout")
    return pytest.param(n, k, group, vnni, blocked, id=f"n{n}-k{k}-g{group}-{kind}", marks=[NO_VNNI] if vnni else [])


# SmolLM2-135M's linears (K = 576 with groups of 128: 4 full groups and a short one of 64), then N not a
# multiple of the 64-channel blocks (nor of 16), the codes in the IR's [N, K/8] layout, the portable kernel.
CASES = [_case(n, k, group) for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)) for group in (32, 128)]
CASES += [_case(100, 192, 64, blocked=False), _case(80, 96, 32), _case(100, 576, 128, vnni=False),
          _case(192, 128, 32, vnni=False, blocked=False)]


def _weights(n: int, k: int, group: int, seed: int):
    """(codes [N, K/8], scales [N, ceil(K/group)]) of a random weight in ``w4g<group>``."""
    scheme = get_scheme(f"w4g{group}")
    q = scheme.quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32))
    return scheme.pack(q.codes), q.scales


def _activations(m: int, k: int, seed: int, special_rows: bool = True) -> np.ndarray:
    """Real-looking x: normal, two outlier channels x20; with ``special_rows``, an all-zero row (scale 1)
    and a row of ties (scale 1 in its first group, values n + 1/2: round half to even)."""
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[:, [3, k // 2 + 1]] *= 20
    if special_rows and m > 3:
        x[2] = 0
        x[3] = np.arange(k) % 11 - 4.5
        x[3, 1] = -127
    return x


def _compile(n: int, k: int, group: int, vnni: bool, blocked: bool, rows: int | None = None):
    """``main(x[m, k], codes, scales) -> y[m, n]`` through the CPU target's pipeline: m symbolic, or the
    constant ``rows``. Returns the executable, ``main`` and the names of the module's functions."""
    groups = -(-k // group)
    shapes = [STORED_LAYOUT.packed_shape(n, c) if blocked else (n, c) for c in (k // 8, groups)]
    m = tirx.Var("m", "int64") if rows is None else rows
    params = [relax.Var("x", relax.TensorType([m, k], "float32")),
              relax.Var("codes", relax.TensorType(list(shapes[0]), "uint32")),
              relax.Var("scales", relax.TensorType(list(shapes[1]), "float32"))]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = emit_w4a8_linear(bb, *params, out_features=n, group=group, target=TARGET, vnni=vnni)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    module = bb.get()
    names = {gv.name_hint for gv in module.functions}
    with TARGET:
        executable = tvm.compile(module, TARGET, relax_pipeline=relax_pipeline(get_target("cpu"), TARGET))
    return executable, relax.VirtualMachine(executable, tvm.cpu())["main"], names


@pytest.mark.parametrize("n,k,group,vnni,blocked", CASES)
def test_kernel_computes_the_reference(n, k, group, vnni, blocked):
    codes, scales = _weights(n, k, group, seed=n + k)
    executable, main, names = _compile(n, k, group, vnni, blocked)
    assert any(name.startswith("linear_gemm_") for name in names)
    stored = [STORED_LAYOUT.pack(a) for a in (codes, scales)] if blocked else [codes, scales]
    for m in ROWS:
        x = _activations(m, k, seed=m)
        got = main(*[tvm.runtime.tensor(a) for a in (x, *stored)]).numpy()
        want = w4a8_reference(x, codes, scales, group)
        # the reference's f64-emulated fma may round a group's sum differently by an ulp, in rare ties
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=f"M={m}")
    asm = "".join(lib.inspect_source("asm") for lib in executable.mod.imports)
    assert ("vpdpbusd" in asm) == vnni  # the int8 x u4 products run as vpdpbusd, or without it


# Decode: SmolLM2-135M's M = 1 linears (qkv fused 960, o_proj 576, gate+up 3072, down_proj; the 49152-row
# LM head as 4096 rows) in groups of 32 and 128 (K = 576: a short last group of 64), groups of 64, then N
# not a multiple of 64 nor of 16, the IR's layout, the portable kernel.
GEMV_CASES = [_case(n, k, group) for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 576))
              for group in (32, 128)]
GEMV_CASES += [_case(576, 576, 64), _case(100, 576, 128), _case(72, 192, 64, blocked=False),
               _case(80, 96, 32, vnni=False), _case(100, 576, 128, vnni=False)]


@pytest.mark.parametrize("n,k,group,vnni,blocked", GEMV_CASES)
def test_gemv_computes_the_reference(n, k, group, vnni, blocked):
    """A constant M of 1 selects the GEMV, which computes the op exactly as the reference does: x with
    outliers, an all-zero x (scale 1), and ties (round half to even), over seeds."""
    codes, scales = _weights(n, k, group, seed=n + k + group)
    executable, main, names = _compile(n, k, group, vnni, blocked, rows=1)
    assert any(name.startswith("linear_gemv_") for name in names)
    assert not any(name.startswith("linear_gemm_") for name in names)
    stored = [STORED_LAYOUT.pack(a) for a in (codes, scales)] if blocked else [codes, scales]
    stored = [tvm.runtime.tensor(a) for a in stored]
    special = _activations(4, k, seed=0)
    for name, x in [(f"seed {seed}", _activations(1, k, seed=seed)) for seed in range(4)] + [
            ("zeros", special[2:3]), ("ties", special[3:4])]:
        got = main(tvm.runtime.tensor(x), *stored).numpy()
        want = w4a8_reference(x, codes, scales, group)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(np.abs(want).max(), 1e-30), err_msg=name)
    asm = "".join(lib.inspect_source("asm") for lib in executable.mod.imports)
    assert ("vpdpbusd" in asm) == vnni


@NO_VNNI
@pytest.mark.parametrize("high_nibbles,prefetch", [(False, 0), (True, 16)])
def test_gemv_options_compute_the_reference(high_nibbles, prefetch):
    """The GEMV's other variants (odd codes shifted down; software prefetch, across blocks) are exact too."""
    n, k, group = 200, 576, 128
    codes, scales = _weights(n, k, group, seed=3)
    stored = [STORED_LAYOUT.pack(a) for a in (codes, scales)]
    params = [relax.Var("x", relax.TensorType([1, k], "float32"))]
    params += [relax.Var(name, relax.TensorType(list(a.shape), str(a.dtype))) for name, a in zip(("q", "s"), stored)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(make_w4a8_gemv(W4A8Shape(n, k, group), True, high_nibbles, prefetch), "gemv")
            out = bb.emit_output(bb.emit(relax.call_tir(gv, params, relax.TensorType([1, n], "float32"))))
        bb.emit_func_output(out)
    with TARGET:
        executable = tvm.compile(bb.get(), TARGET, relax_pipeline=relax_pipeline(get_target("cpu"), TARGET))
    main = relax.VirtualMachine(executable, tvm.cpu())["main"]
    for seed in range(3):
        x = _activations(1, k, seed=seed)
        got = main(*[tvm.runtime.tensor(a) for a in (x, *stored)]).numpy()
        want = w4a8_reference(x, codes, scales, group)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("group", [32, 128])
def test_reference_is_int8_activations_times_the_dequantized_weight(group):
    """w4a8_reference equals, in float64, x quantized per (row, group) and dequantized, times the
    scheme's dequantized weight; and stays close to the f32-activation product."""
    n, k, m = 96, 576, 9
    codes, scales = _weights(n, k, group, seed=1)
    x = _activations(m, k, seed=2, special_rows=False)
    weight = get_scheme(f"w4g{group}").dequantize_packed(codes, scales, None, k).astype(np.float64)
    xq, sx = quantize_activations(x, group)
    assert xq.dtype == np.int8 and np.abs(xq).max() == 127 and sx.shape == (m, -(-k // group))
    x_dequantized = xq.astype(np.float64) * np.repeat(sx, group, axis=1)[:, :k]
    want = x_dequantized @ weight.T
    got = w4a8_reference(x, codes, scales, group)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    f32_activations = x.astype(np.float64) @ weight.T
    assert 1e-3 < np.linalg.norm(got - f32_activations) / np.linalg.norm(f32_activations) < 5e-2


def test_unsupported_shapes_are_refused():
    assert supports_w4a8(get_scheme("w4g128"), 576) and supports_w4a8(get_scheme("w4g32"), 1536)
    assert not supports_w4a8(get_scheme("w4g128-asym"), 576)  # zero points
    assert not supports_w4a8(get_scheme("w3g128"), 576)
    assert not supports_w4a8(get_scheme("w4"), 576)  # one group per row
    assert not supports_w4a8(get_scheme("w4g32"), 600)  # K not a multiple of 32
    with pytest.raises(LLMOptError, match="group=256"):
        W4A8Shape(64, 512, 256)
