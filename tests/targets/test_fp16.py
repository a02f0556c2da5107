"""`--dtype fp16`: the half-precision pass stores float weights as f16 and computes in f16 with f32
sums (the interpreter's f16 semantics), keeps logits f32 and an f16 KV cache; every GPU target
builds it (f16 device code, f16 weights in the manifest); the GPU graph, compiled for the CPU,
matches the interpreter. On the CPU, fp16 stores the weight matrices in f16 and computes in f32.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess

import numpy as np
import pytest
import tvm

import llmopt.compiler
from llmopt.codegen import cuda_toolchain, webgpu_toolchain
from llmopt.codegen.build import compile_module
from llmopt.compiler import BuildOptions, build, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import evaluate, run_module
from llmopt.ir.graph import Node
from llmopt.ir.printer import print_module
from llmopt.ir.types import TensorType
from llmopt.passes.half_precision import HalfPrecision, HalfPrecisionError
from llmopt.passes.quant.kv_cache import QuantizeKVCache
from llmopt.runtime.manifest import verify
from llmopt.targets import UnknownTargetError, get_target
from llmopt.targets.cpu import cpu_target

from device_code import amdgpu_code_objects, has_cuda_device, wgsl_kernels
from fatbin import fatbin_entries

IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33]
HALF_ATOL = 2e-3  # f16 model vs f32 model, tiny Llama logits of about +-0.5 (f16's step there: 2.4e-4)
KERNEL_ATOL = 1e-3  # compiled f16 graph vs the interpreter: sums in another order, then f16 rounding
GPU_FP16 = BuildOptions(target="cuda", dtype="fp16")  # f16 activations (optimize needs no nvcc)


def _run(module, entry="prefill"):
    ids, pos = np.array([IDS], np.int32), np.arange(len(IDS), dtype=np.int32)
    return run_module(module, entry, {"ids": ids, "pos": pos})


def test_f16_ops_compute_in_f32_and_round_their_result():
    """A sum of squares of f16 values overflows f16, not the op: rms_norm of 300s is 1 (times w)."""
    x = np.full((1, 64), 300, np.float16)
    w = np.full(64, 2, np.float16)
    node = Node("y", "rms_norm", ("x", "w"), (("eps", 1e-6),), TensorType("f16", (1, 64)))
    y = evaluate(node, [x, w], {})
    assert y.dtype == np.float16 and np.all(y == np.float16(2.0))
    add = Node("s", "add", ("a", "b"), (), TensorType("f16", (3,)))
    a, b = np.array([1, 2048, 0.1], np.float16), np.array([2 ** -11, 1, 0.2], np.float16)
    np.testing.assert_array_equal(evaluate(add, [a, b], {}), (a.astype(np.float32) + b).astype(np.float16))


def test_half_precision_module(tiny_llama):
    full = optimize(load_hf_folder(tiny_llama), BuildOptions())
    half = optimize(load_hf_folder(tiny_llama), GPU_FP16)
    assert half.meta["dtype"] == "f16" and half.meta["kv_cache"]["dtype"] == "f16"
    for name in half.weight_names():  # every float weight stored in f16: half the bytes
        assert half.weights.type(name).dtype == "f16"
        np.testing.assert_array_equal(half.weights.get(name), full.weights.get(name).astype(np.float16))
    for func in half.functions.values():
        assert all(p.type.dtype in ("i32", "f16") for p in func.params)
        assert all(n.type.dtype != "f32" or n.op == "cast" for n in func.nodes)
        outputs = dict(func.outputs)
        assert func.types()[outputs["logits"]].dtype == "f32"
        assert all(func.types()[v].dtype == "f16" for name, v in outputs.items() if name != "logits")
    last = print_module(half).split("func @logits")[1].splitlines()
    assert re.fullmatch(r"  %\d+ = cast\(%\d+\) \{dtype='f32'\} : f32\[1, seq, 128\]  # from=lm_head "
                        r"by=half-precision", last[-3]), last[-3]
    want, got = _run(full), _run(half)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=HALF_ATOL, rtol=0)
    assert np.argmax(got["logits"]) == np.argmax(want["logits"])
    np.testing.assert_allclose(got["k.1"].astype(np.float32), want["k.1"], atol=HALF_ATOL, rtol=0)


def test_quantized_half_model_keeps_f32_scales(tiny_llama):
    half = optimize(load_hf_folder(tiny_llama), dataclasses.replace(GPU_FP16, quant="w4g32"))
    types = {name: half.weights.type(name) for name in half.weight_names()}
    assert {t.dtype for n, t in types.items() if n.endswith(".packed")} == {"u32"}
    assert {t.dtype for n, t in types.items() if n.endswith(".scales")} == {"f32"}
    dequantizes = [n for f in half.functions.values() for n in f.nodes if n.op == "dequantize"]
    assert dequantizes and all(n.attr["dtype"] == "f16" and n.type.dtype == "f16" for n in dequantizes)
    full = optimize(load_hf_folder(tiny_llama), BuildOptions(quant="w4g32"))
    np.testing.assert_allclose(_run(half)["logits"], _run(full)["logits"], atol=HALF_ATOL, rtol=0)


def test_int8_designs_are_refused(tiny_llama):
    module = optimize(load_hf_folder(tiny_llama), BuildOptions())
    with pytest.raises(HalfPrecisionError, match="KV cache is i8"):
        HalfPrecision().run(QuantizeKVCache().run(module))
    w8a8 = optimize(load_hf_folder(tiny_llama), BuildOptions(quant="smoothquant:w8", calibration=(("samples", "2"), ("seq_len", "16"))))
    with pytest.raises(HalfPrecisionError, match="int8-activation op") as error:
        HalfPrecision().run(w8a8)
    assert "--quant w4g128" in error.value.hint
    with pytest.raises(HalfPrecisionError, match="already fp16"):
        HalfPrecision().run(HalfPrecision().run(module))


@pytest.mark.parametrize("quant", [None, "w4g32"], ids=lambda q: q or "fp16")
def test_the_gpu_graph_computes_the_f16_model(quant, tiny_llama):
    """The Relax graph every GPU target compiles (f16 linears summing in f32, attention in f32),
    compiled for the CPU instead, matches the interpreter's f16 semantics, prefill and decode."""
    on_cpu = dataclasses.replace(get_target("cuda"), tvm_target=lambda arch: cpu_target(None),
                                 schedule_rules=None, check_toolchain=None, compile_context=None)
    module = optimize(load_hf_folder(tiny_llama), dataclasses.replace(GPU_FP16, quant=quant))
    library = compile_module(module, on_cpu)
    vm = tvm.relax.VirtualMachine(library.executable, tvm.cpu())
    weights = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    ids, pos = np.array([IDS], np.int32), np.arange(len(IDS), dtype=np.int32)
    got = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)
    want = _run(module)
    assert got[0].numpy().dtype == np.float32 and got[1].numpy().dtype == np.float16
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=KERNEL_ATOL, rtol=0)
    cache = {name: array for name, array in want.items() if name != "logits"}
    capacity = 16
    buffers = {name: np.concatenate([a, np.zeros((1, capacity - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)
               for name, a in cache.items()}
    step = {"ids": np.array([[11]], np.int32), "pos": np.array([len(IDS)], np.int32), **buffers}
    want = run_module(module, "decode", step)
    names = [p.name for p in module.functions["decode"].params]
    got = vm["decode"](*(tvm.runtime.tensor(step[n]) for n in names), *weights)
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=KERNEL_ATOL, rtol=0)


_BUILT: dict = {}


def _build(tmp_path_factory, tiny_llama, target, **options):
    key = (target, tuple(sorted(options.items())))
    if key not in _BUILT:
        out = tmp_path_factory.mktemp(f"{target}_fp16") / "artifact"
        build(tiny_llama, out, BuildOptions(target=target, dtype="fp16", **options))
        _BUILT[key] = out
    return _BUILT[key]


def _check_f16_manifest(out):
    manifest = verify(out)
    assert manifest.kv_cache.dtype == "f16"
    assert {w.dtype for w in manifest.weights} == {"float16"}
    return manifest


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose linears are wider than 64 (dlight's Matmul rule uses tensor cores then)."""
    from tiny_models import save_tiny
    folder = tmp_path_factory.mktemp("wide_llama") / "hf"
    save_tiny("llama", folder, hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    return folder


def test_cuda_fp16_artifact_prefills_on_tensor_cores(monkeypatch, tmp_path_factory, wide_llama):
    sources = []
    compile_fatbin = cuda_toolchain.compile_fatbin
    monkeypatch.setattr(cuda_toolchain, "compile_fatbin",
                        lambda nvcc, code, archs: sources.append(code) or compile_fatbin(nvcc, code, archs))
    out = _build(tmp_path_factory, wide_llama, "cuda", arch="sm_80,sm_90")
    _check_f16_manifest(out)
    entries = fatbin_entries((out / "model.so").read_bytes())[0]
    assert sorted(e.arch for e in entries if e.kind == "elf") == ["sm_80", "sm_90"]
    code = "\n".join(sources)
    kernels = dict(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{", code))
    assert any("half* __restrict__ model_embed_tokens_weight_ptr" in params for params in kernels.values())
    # prefill's linears (a symbolic seq of rows): half operands on tensor cores, float accumulators
    prefill_linears = [name for name, params in kernels.items() if name.startswith("linear") and "int64_t seq" in params]
    assert prefill_linears
    for name in prefill_linears:
        body = code[re.search(rf"__global__ void (?:__launch_bounds__\(\d+\) )?{name}\([^)]*\) \{{", code).end():]
        body = body[:body.index("\n}\n")]
        assert "wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>" in body, name
        assert "wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half" in body, name
        assert "wmma::mma_sync" in body, name


def test_rocm_fp16_artifact(tmp_path_factory, tiny_llama):
    out = _build(tmp_path_factory, tiny_llama, "rocm", arch="gfx90a,gfx1100")
    _check_f16_manifest(out)
    assert sorted(o.arch for o in amdgpu_code_objects((out / "model.so").read_bytes())) == ["gfx1100", "gfx90a"]


def test_metal_fp16_artifact(tmp_path_factory, tiny_llama):
    out = _build(tmp_path_factory, tiny_llama, "metal")
    _check_f16_manifest(out)
    data = (out / "model.dylib").read_bytes()
    linear = data[data.index(b"kernel void linear"):]
    assert b"device half*" in linear[:linear.index(b") {")]  # f16 weights and activations as parameters


def test_webgpu_fp16_artifact(tmp_path_factory, tiny_llama):
    out = _build(tmp_path_factory, tiny_llama, "webgpu")
    _check_f16_manifest(out)
    kernels = wgsl_kernels((out / "model.wasm").read_bytes())
    half = [name for name, source in kernels.items() if "\nenable f16;\n" in source]
    assert any(name.startswith("linear") for name in half) and any(name.startswith("kv_write") for name in half)


def test_cpu_fp16_halves_the_matrices_and_computes_in_f32(tmp_path, tiny_llama):
    """On the CPU, fp16 means f16 weight matrices (linears widen them on load, the embedding casts its
    rows) and f32 everything else: the artifact computes the interpreter's model, prefill, decode
    and every position's logits, and stays within f16 weight rounding of fp32."""
    from llmopt.runtime import load
    options = BuildOptions(dtype="fp16")
    manifest = build(tiny_llama, tmp_path / "cpu", options)
    module = optimize(load_hf_folder(tiny_llama), options)
    assert module.meta["dtype"] == "f16-weights" and manifest.kv_cache.dtype == "f32"
    dtypes = {w.name: w.dtype for w in manifest.weights}
    assert {d for n, d in dtypes.items() if "norm" in n} == {"float32"}
    assert {d for n, d in dtypes.items() if "norm" not in n} == {"float16"}
    model = load(tmp_path / "cpu")
    ids = np.array([IDS], np.int32)
    want = run_module(module, "logits", {"ids": ids, "pos": np.arange(len(IDS), dtype=np.int32)})["logits"][0]
    np.testing.assert_allclose(model.forward_logits(np.array(IDS)), want, atol=1e-5, rtol=0)
    logits, cache = model.prefill(np.array(IDS[:-1]))
    np.testing.assert_allclose(logits, want[-2], atol=1e-5, rtol=0)
    logits, cache = model.decode(IDS[-1], cache)
    np.testing.assert_allclose(logits, want[-1], atol=1e-5, rtol=0)
    full = run_module(optimize(load_hf_folder(tiny_llama), BuildOptions()), "logits",
                      {"ids": ids, "pos": np.arange(len(IDS), dtype=np.int32)})["logits"][0]
    np.testing.assert_allclose(want, full, atol=HALF_ATOL, rtol=0)


def test_a_target_without_fp16_kernels_refuses_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    import llmopt.targets
    f32_only = dataclasses.replace(get_target("cuda"), dtypes=("fp32",), check_toolchain=None)
    monkeypatch.setattr(llmopt.targets, "get_target", lambda name: f32_only)
    monkeypatch.setattr(llmopt.compiler, "load", lambda model: pytest.fail("model work before the dtype check"))
    with pytest.raises(UnknownTargetError, match="target cuda: --dtype fp16 is not supported") as error:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="cuda", dtype="fp16"))
    assert "Leave out --dtype fp16" in error.value.hint and not (tmp_path / "out").exists()


def test_webgpu_page_refuses_fp16_on_an_adapter_without_shader_f16(tmp_path_factory, tiny_llama):
    """SwiftShader's adapter (the browser available here) has no shader-f16: the page says so and
    what to do, instead of failing inside WGSL compilation."""
    out = _build(tmp_path_factory, tiny_llama, "webgpu")
    driver = webgpu_toolchain.WEB_DIR / "run_in_chromium.cjs"
    done = subprocess.run(["node", str(driver), "--artifact", str(out), "--ids", "1,17,99", "--steps", "1",
                           "--timeout", "120"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "is an fp16 artifact, but this browser's WebGPU adapter has no shader-f16 feature" in done.stdout
    assert "build with --dtype fp32" in done.stdout and "Error while parsing WGSL" not in done.stdout


@pytest.mark.skipif(not has_cuda_device(), reason="needs a CUDA device and driver")
def test_cuda_fp16_artifact_on_a_gpu_computes_the_f16_model(tmp_path, tiny_llama):
    """On a CUDA GPU: the fp16 artifact's prefill and decode logits are the interpreter's f16 model's."""
    from llmopt.runtime import load
    gpu_arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    build(tiny_llama, tmp_path / "cuda", BuildOptions(target="cuda", arch=f"sm_{gpu_arch[3:-1]}0", dtype="fp16"))
    module = optimize(load_hf_folder(tiny_llama), GPU_FP16)
    model = load(tmp_path / "cuda")
    logits, cache = model.prefill(np.array(IDS))
    want = _run(module)
    np.testing.assert_allclose(logits, want["logits"][0, -1], atol=KERNEL_ATOL, rtol=0)
    np.testing.assert_allclose(model.forward_logits(np.array(IDS)), run_module(module, "logits", {
        "ids": np.array([IDS], np.int32), "pos": np.arange(len(IDS), dtype=np.int32)})["logits"][0], atol=KERNEL_ATOL)
