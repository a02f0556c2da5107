"""The W8A8 CPU kernels (codegen/kernels/cpu_int8_linear.py) compute the ``linear_w8a8`` op's reference,
with VNNI and portably; the generic TE lowering too; and a SmoothQuant tiny Llama artifact matches the
interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from llmopt.codegen.build import relax_pipeline
from llmopt.codegen.kernels.cpu_int8_linear import emit_w8a8_linear, has_vnni
from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT, host_cpu_target
from llmopt.codegen.lower_int8 import w8a8_linear_te
from llmopt.compiler import BuildOptions, build
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.ops import OPS
from llmopt.ir.quant_schemes import get_scheme
from llmopt.passes import PassManager, build_pipeline
from llmopt.runtime import load
from llmopt.targets import get_target

TARGET = host_cpu_target(2)
KERNELS = [pytest.param(True, id="vnni", marks=pytest.mark.skipif(not has_vnni(TARGET), reason="no AVX-512 VNNI")),
           pytest.param(False, id="portable")]
# (N, K, bias, codes stored blocked): N not a multiple of the 64-channel tiles, K not of 16 or 4
SHAPES = [(100, 72, True, True), (70, 70, False, False)]


def _compile(n: int, k: int, bias: bool, blocked: bool, emit):
    """A VM with ``prefill`` (symbolic rows: the GEMM) and ``decode`` (one row: the GEMV), each
    ``(x[1, rows, k], codes, scales[, bias]) -> emit(bb, x, codes, scales, bias)``; and its library."""
    codes_shape = WEIGHT_LAYOUT.packed_shape(n, -(-k // 4)) if blocked else (n, -(-k // 4))
    bb = relax.BlockBuilder()
    for name, rows in (("prefill", tirx.Var("seq", "int64")), ("decode", 1)):
        params = [relax.Var("x", relax.TensorType([1, rows, k], "float32")),
                  relax.Var("codes", relax.TensorType(list(codes_shape), "uint32")),
                  relax.Var("scales", relax.TensorType([n, 1], "float32"))]
        params += [relax.Var("bias", relax.TensorType([n], "float32"))] if bias else []
        with bb.function(name, params):
            with bb.dataflow():
                out = bb.emit_output(emit(bb, *params[:3], params[3] if bias else None))
            bb.emit_func_output(out)
    with TARGET:
        executable = tvm.compile(bb.get(), TARGET, relax_pipeline=relax_pipeline(get_target("cpu"), TARGET))
    return executable, relax.VirtualMachine(executable, tvm.cpu())


def _operands(n: int, k: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    x[0, :, 3] *= 30  # an outlier channel
    x[0, 0] = 0  # an all-zero row (scale 1)
    scheme = get_scheme("w8")
    q = scheme.quantize(rng.standard_normal((n, k)).astype(np.float32))
    return x, scheme.pack(q.codes), q.scales, rng.standard_normal(n).astype(np.float32)


def _check(function, n, k, rows, bias, blocked):
    x, codes, scales, b = _operands(n, k, rows, seed=rows)
    args = [x, codes, scales] + ([b] if bias else [])
    want = OPS["linear_w8a8"].ref(args, {}, {})
    stored = [x, WEIGHT_LAYOUT.pack(codes) if blocked else codes, scales] + ([b] if bias else [])
    got = function(*[tvm.runtime.tensor(a) for a in stored]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("n,k,bias,blocked", SHAPES)
def test_kernels_compute_the_op_reference(vnni, n, k, bias, blocked):
    def emit(bb, x, codes, scales, b):
        return emit_w8a8_linear(bb, x, codes, scales, b, out_features=n, target=TARGET, vnni=vnni)

    executable, vm = _compile(n, k, bias, blocked, emit)
    for rows in (1, 7, 33):
        _check(vm["prefill"], n, k, rows, bias, blocked)
    _check(vm["decode"], n, k, 1, bias, blocked)
    asm = "".join(lib.inspect_source("asm") for lib in executable.mod.imports)
    assert ("vpdpbusd" in asm) == vnni  # the int8 products run as vpdpbusd, or without it


def test_generic_te_lowering_computes_the_op_reference():
    n, k = 70, 70

    def emit(bb, x, codes, scales, b):
        x2d = bb.emit(relax.op.reshape(x, [-1, k]))
        y = bb.emit_te(w8a8_linear_te, x2d, codes, scales, b, primfunc_name_hint="linear_w8a8")
        return relax.op.reshape(y, [1, x.ty.shape.values[1], n])

    _, vm = _compile(n, k, True, False, emit)
    for rows in (1, 7):
        _check(vm["prefill"], n, k, rows, True, False)


def test_smoothquant_tiny_llama_artifact_matches_the_interpreter(tiny_llama, tmp_path):
    text = tmp_path / "calibration.txt"  # the tiny tokenizer's words, in random order
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 128, 300)))
    pipeline = f"fuse-linears,fold-constants,quantize-smoothquant{{calibration={text},samples=4,seq_len=32}},cse,dce"
    quantized = PassManager(build_pipeline(pipeline)).run(load_hf_folder(tiny_llama))
    assert sum(node.op == "linear_w8a8" for node in quantized.functions["decode"].nodes) == 8
    build(load_hf_folder(tiny_llama), tmp_path / "artifact", BuildOptions(pipeline=pipeline))
    model = load(tmp_path / "artifact")
    from llmopt.runtime.manifest import read_manifest
    w8a8_parts = {name for node in quantized.functions["decode"].nodes if node.op == "linear_w8a8"
                  for name in node.inputs[1:3]}
    w8a8_weights = {n.attr["name"] for n in quantized.functions["decode"].nodes
                    if n.op == "weight" and n.name in w8a8_parts}
    stored = {w.name: w.shape for w in read_manifest(tmp_path / "artifact").weights}
    assert w8a8_weights and all(len(stored[name]) == 3 for name in w8a8_weights)  # kept in the kernel's blocks
    ids = np.array([1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8])
    feed = {"ids": ids[None, :].astype(np.int32), "pos": np.arange(len(ids), dtype=np.int32)}
    want = run_module(quantized, "logits", feed)["logits"][0]
    np.testing.assert_allclose(model.forward_logits(ids), want, atol=1e-5, rtol=0)
    _, cache = model.prefill(ids[:-1])
    logits, _ = model.decode(int(ids[-1]), cache)  # the GEMV kernels
    np.testing.assert_allclose(logits.reshape(-1), want[-1], atol=1e-5, rtol=0)
