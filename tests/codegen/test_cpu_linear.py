"""Numerics and pipeline behaviour of the hand-scheduled CPU linear kernels."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from llmopt.codegen.kernels import cpu_linear
from llmopt.codegen.kernels.cpu_linear import (
    BLOCK_N,
    WEIGHT_LAYOUT,
    emit_linear,
    host_cpu_target,
    pack_weight_for_gemm,
)

TARGET = host_cpu_target()

# (name, N, K, bias, weight pre-packed, x has leading [1, seq] dims)
CASES = [
    ("tiny_bias_unpacked", 48, 64, True, False, True),
    ("odd_nobias_packed_2d", 130, 129, False, True, False),
    ("model_bias_packed", 576, 576, True, True, True),
]
ROWS = [1, 3, 17, 128]


def _linear_module(n: int, k: int, bias: bool, packed: bool, leading: bool, decode: bool):
    """relu -> linear -> add 1: the linear sits between ops that FuseOps could fuse."""
    rows = 1 if decode else tirx.Var("seq", "int64")
    x_shape = [1, rows, k] if leading else [rows, k]
    w_shape = list(WEIGHT_LAYOUT.packed_shape(n, k)) if packed else [n, k]
    bb = relax.BlockBuilder()
    params = [
        relax.Var("x", relax.TensorType(x_shape, "float32")),
        relax.Var("w", relax.TensorType(w_shape, "float32")),
    ]
    if bias:
        params.append(relax.Var("b", relax.TensorType([n], "float32")))
    with bb.function("main", params):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(params[0]))
            b = params[2] if bias else None
            y = emit_linear(bb, h, params[1], b, TARGET, out_features=None if bias else n)
            out = bb.emit_output(relax.op.add(y, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _lower(mod: tvm.IRModule) -> tvm.IRModule:
    return relax.get_pipeline("zero")(relax.transform.LegalizeOps()(mod))


@pytest.fixture(scope="module")
def compiled():
    """One VM per (case, decode?) : 6 builds shared by all numeric tests."""
    dev = tvm.cpu()
    vms = {}
    for name, n, k, bias, packed, leading in CASES:
        for decode in (True, False):
            mod = _lower(_linear_module(n, k, bias, packed, leading, decode))
            vms[name, decode] = relax.VirtualMachine(tvm.compile(mod, target=TARGET), dev)
    return vms


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_linear_matches_numpy(compiled, case, m):
    name, n, k, bias, packed, leading = case
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((1, m, k) if leading else (m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dev = tvm.cpu()
    args = [x, pack_weight_for_gemm(w) if packed else w] + ([b] if bias else [])
    y = compiled[name, m == 1]["main"](*[tvm.runtime.tensor(a, dev) for a in args]).numpy()

    h = np.maximum(x, 0).astype(np.float64)
    ref = h @ w.T.astype(np.float64) + (b if bias else 0) + 1
    scale = np.abs(h) @ np.abs(w.T.astype(np.float64)) + (np.abs(b) if bias else 0) + 1
    assert y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-6)


def test_pack_roundtrip_pads_with_zeros():
    w = np.arange(130 * 7, dtype=np.float32).reshape(130, 7)
    wp = pack_weight_for_gemm(w)
    assert wp.shape == (3, 7, BLOCK_N) == WEIGHT_LAYOUT.packed_shape(130, 7)
    assert wp[1, 4, 5] == w[BLOCK_N + 5, 4]
    assert not wp[2, :, 130 - 2 * BLOCK_N :].any()
    np.testing.assert_array_equal(WEIGHT_LAYOUT.unpack(wp, 130), w)


def test_kernels_survive_fusion_unchanged():
    """FuseOps/FuseTIR must neither fuse nor rewrite the opaque, scheduled kernels."""
    for decode, kind in ((True, "gemv"), (False, "gemm")):
        mod = _linear_module(576, 576, True, True, True, decode)
        name = f"linear_{kind}_n576_k576_bias"
        lowered = _lower(mod)
        assert name in [gv.name_hint for gv in lowered.functions]
        tvm.ir.assert_structural_equal(lowered[name], mod[name])


@pytest.mark.parametrize(
    "decode, kernel", [(True, "linear_gemv_n48_k64"), (False, "linear_gemm_n48_k64")]
)
def test_decode_picks_gemv_and_prefill_picks_gemm(decode, kernel):
    mod = _linear_module(48, 64, False, True, True, decode)
    assert kernel in {gv.name_hint for gv in mod.functions}


def test_packed_weight_without_bias_needs_out_features():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 64], "float32"))
    w = relax.Var("w", relax.TensorType(list(WEIGHT_LAYOUT.packed_shape(48, 64)), "float32"))
    with bb.function("main", [x, w]):
        with pytest.raises(ValueError, match="out_features"):
            emit_linear(bb, x, w, None, TARGET)
        bb.emit_func_output(x)


def test_host_cpu_target_names_the_cpu():
    target = host_cpu_target(2)
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu() != "generic"
    assert int(target.attrs["num-cores"]) == 2


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_accumulators_live_on_the_stack(kernel):
    """A heap-workspace accumulator tile halves GEMM speed in the VM build (see HALF)."""
    assert cpu_linear.GEMM_ROWS <= 7 and cpu_linear.GEMM_ROWS * cpu_linear.HALF * 4 < 1024
    func = cpu_linear.make_gemv(130, 129, True) if kernel == "gemv" else (
        cpu_linear.make_gemm(130, 129, True, threads=2)
    )
    lib = tvm.tirx.build(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), TARGET)
    assert "AllocWorkspace" not in lib.inspect_source("ll")
