"""Weight-quantized linears on the GPU targets with a Matmul rule (cuda, rocm, metal): decode (one
row) keeps the fused dequantize-GEMV kernel; prefill and logits (``seq`` rows) dequantize the weight
in their own kernel, then run the plain NT matmul, which dlight's Matmul rule tiles through shared
memory (tensor cores for f16), where the fused form got the Fallback's one-thread-per-output loop.
The CUDA source of a wide tiny Llama (linears wider than 64) shows which rule scheduled each
kernel; the graph, compiled for the CPU instead, computes the interpreter's model (integer schemes,
an asymmetric one, NF4 on the generic path, and fp16). WebGPU (no Matmul rule) keeps the fused form.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm import relax

from llmopt.codegen import cuda_toolchain
from llmopt.codegen.build import compile_module, relax_pipeline
from llmopt.codegen.kernels.gpu_linear import emit_fused_quant_linear
from llmopt.codegen.relax_module import Kernels, to_relax
from llmopt.compiler import BuildOptions, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.targets import get_target
from llmopt.targets.cpu import cpu_target

IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33]
ARCH = "sm_80"  # one arch: the CUDA source is what these tests read
KERNEL = re.compile(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose linears are wider than 64 (dlight's Matmul rule uses tensor cores then)."""
    from tiny_models import save_tiny
    folder = tmp_path_factory.mktemp("wide_llama") / "hf"
    save_tiny("llama", folder, hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    return folder


def _optimized(folder, quant, dtype="fp32"):
    return optimize(load_hf_folder(folder), BuildOptions(target="cuda", quant=quant, dtype=dtype))


# ---- which kernels the graph calls ----------------------------------------------------------

def _calls(relax_mod, function: str) -> list[str]:
    """The PrimFuncs ``function`` calls (call_tir), in order, numbering suffixes dropped."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    names = []
    for block in relax_mod[function].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                names.append(re.sub(r"\d+$", "", value.args[0].name_hint))
    return names


def _quantized_linears(module, function: str) -> tuple[int, int]:
    """(one-row, more-row) counts of the linears of ``function`` that read a ``dequantize``."""
    func = module.functions[function]
    dequantized = {n.name for n in func.nodes if n.op == "dequantize"}
    types = func.types()
    rows = [types[n.inputs[0]].shape[:-1] for n in func.nodes if n.op == "linear" and n.inputs[1] in dequantized]
    one = sum(all(d == 1 for d in shape) for shape in rows)
    return one, len(rows) - one


def _relax(module, target: str):
    spec = get_target(target)
    with tvm.target.Target(cpu_target(None)):
        return to_relax(module, Kernels(spec.emit_linear, spec.emit_attention, spec.emit_quant_linear,
                                        spec.quant_linear_supports))


@pytest.mark.parametrize("target", ["cuda", "rocm", "metal"])
def test_prefill_dequantizes_then_multiplies_and_decode_keeps_the_fused_gemv(target, wide_llama):
    module = _optimized(wide_llama, "w4g32")
    relax_mod = _relax(module, target)
    for function in ("prefill", "logits", "decode"):
        one_row, more_rows = _quantized_linears(module, function)
        calls = _calls(relax_mod, function)
        assert calls.count("quant_linear") == one_row, (function, calls)
        assert calls.count("dequantize_weight") == more_rows, (function, calls)
        assert "dequantize" not in calls  # the generic lowering: never for an integer scheme
        for at, name in enumerate(calls):  # each dense weight goes straight to its matmul
            if name == "dequantize_weight":
                assert "linear" in calls[at + 1:at + 3], (function, calls)
    assert _quantized_linears(module, "decode") == (4, 0)
    assert _quantized_linears(module, "prefill")[1] == _quantized_linears(module, "logits")[1] == 4


def test_webgpu_keeps_the_fused_form_everywhere(wide_llama):
    """WebGPU leaves out dlight's Matmul rule (targets/webgpu.py): a dense weight would buy its
    prefill no better schedule, so every quantized linear stays one fused kernel."""
    module = _optimized(wide_llama, "w4g32")
    relax_mod = _relax(module, "webgpu")
    for function in ("prefill", "logits", "decode"):
        calls = _calls(relax_mod, function)
        assert calls.count("quant_linear") == sum(_quantized_linears(module, function)) > 0
        assert not any(name.startswith("dequantize") for name in calls)


def test_codebook_schemes_take_the_generic_path(wide_llama):
    """NF4: dequantize materialized by the generic lowering, then the plain linear, in every entry."""
    module = _optimized(wide_llama, "nf4g64")
    relax_mod = _relax(module, "cuda")
    for function in ("prefill", "logits", "decode"):
        calls = _calls(relax_mod, function)
        assert calls.count("dequantize") == sum(_quantized_linears(module, function)) > 0
        assert "quant_linear" not in calls and "dequantize_weight" not in calls


# ---- which dlight rule scheduled each CUDA kernel -------------------------------------------

@dataclasses.dataclass(frozen=True)
class CudaKernel:
    name: str
    params: str
    body: str

    @property
    def prefill(self) -> bool:
        """Launched for ``seq`` rows (prefill, logits): ``seq`` is one of its parameters."""
        return bool(re.search(r"\bint64_t seq\b", self.params))

    @property
    def tiled(self) -> bool:
        """dlight's Matmul rule: tiles staged in shared memory, no warp-shuffle reduction."""
        return "__shared__" in self.body and "__syncthreads()" in self.body and "__shfl" not in self.body

    @property
    def gemv(self) -> bool:
        """dlight's GEMV rule: a reduction split over threads, combined by warp shuffles."""
        return "__shfl" in self.body

    @property
    def fallback_loop(self) -> bool:
        """dlight's Fallback on a reduction: each thread loops over the whole reduction on its
        own (a loop, and neither shared memory nor warp shuffles)."""
        return "for (" in self.body and "__shared__" not in self.body and "__shfl" not in self.body

    @property
    def tensor_cores(self) -> bool:
        """f16 operands, f32 accumulators, on tensor cores (wmma)."""
        return ("wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half" in self.body
                and "wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>" in self.body
                and "wmma::mma_sync" in self.body)


def _kernels(code: str) -> dict[str, CudaKernel]:
    kernels = {}
    for match in KERNEL.finditer(code):
        body = code[match.end():]
        kernels[match.group(1)] = CudaKernel(match.group(1), match.group(2), body[:body.index("\n}\n")])
    return kernels


def _capture_cuda(monkeypatch) -> list[str]:
    """The CUDA source of every compile from now on (nvcc still compiles it)."""
    sources = []
    compile_fatbin = cuda_toolchain.compile_fatbin
    monkeypatch.setattr(cuda_toolchain, "compile_fatbin",
                        lambda nvcc, code, archs: sources.append(code) or compile_fatbin(nvcc, code, archs))
    return sources


def _cuda_kernels(monkeypatch, module) -> dict[str, CudaKernel]:
    sources = _capture_cuda(monkeypatch)
    compile_module(module, get_target("cuda"), ARCH)
    return _kernels("\n".join(sources))


def test_the_fused_form_at_seq_rows_is_the_fallbacks_loop(monkeypatch):
    """The control: the fused dequantize-matmul for ``seq`` rows, alone, gets dlight's Fallback
    schedule (what prefill ran before); :attr:`CudaKernel.fallback_loop` recognizes it."""
    scheme, n, k = get_scheme("w4g32"), 256, 128
    seq = tvm.tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([seq, k], "float32"))
    packed = relax.Var("packed", relax.TensorType([n, k // scheme.codes_per_word], "uint32"))
    scales = relax.Var("scales", relax.TensorType([n, k // 32], "float32"))
    with bb.function("main", [x, packed, scales]):
        with bb.dataflow():
            y = bb.emit_output(emit_fused_quant_linear(bb, x, packed, scales, None, None, scheme, n, k))
        bb.emit_func_output(y)
    sources = _capture_cuda(monkeypatch)
    spec = get_target("cuda")
    target = tvm.target.Target(spec.tvm_target(ARCH))
    with target, cuda_toolchain.compile_context((ARCH,)):
        tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(spec, target))
    kernels = _kernels("\n".join(sources))
    assert [kernel.name for kernel in kernels.values()] == ["quant_linear_kernel"]
    kernel = kernels["quant_linear_kernel"]
    assert kernel.prefill and kernel.fallback_loop and not kernel.tiled


def _check_prefill_kernels(kernels: dict[str, CudaKernel], dense_weight: str):
    """No prefill kernel is the Fallback's loop; prefill's matmuls are tiled; decode's quantized
    linears are GEMVs; ``dense_weight``: the kernels that dequantize whole weights."""
    prefill = [k for k in kernels.values() if k.prefill]
    assert prefill and not [k.name for k in prefill if k.fallback_loop]
    matmuls = [k for k in prefill if k.name.startswith("linear")]
    assert len(matmuls) >= 4 and all(k.tiled for k in matmuls), [k.name for k in matmuls if not k.tiled]
    dequantizes = [k for k in kernels.values() if re.fullmatch(rf"{dense_weight}\d*_kernel", k.name)]
    assert len(dequantizes) == 4  # qkv, o, gate+up, down: one each, shared by prefill and logits
    assert all("uint* __restrict__" in k.params and "for (" not in k.body for k in dequantizes)  # elementwise
    return matmuls, dequantizes


def test_cuda_w4g32_prefill_is_tiled_and_decode_is_gemv(monkeypatch, wide_llama):
    kernels = _cuda_kernels(monkeypatch, _optimized(wide_llama, "w4g32"))
    matmuls, dequantizes = _check_prefill_kernels(kernels, "dequantize_weight")
    assert all(k.params.startswith("float* __restrict__") for k in dequantizes)  # f32 weights for f32 x
    fused = [k for k in kernels.values() if k.name.startswith("quant_linear")]
    assert len(fused) == 4 and all(not k.prefill and k.gemv for k in fused)  # decode only


def test_cuda_w4g32_fp16_prefill_runs_on_tensor_cores(monkeypatch, wide_llama):
    kernels = _cuda_kernels(monkeypatch, _optimized(wide_llama, "w4g32", "fp16"))
    matmuls, dequantizes = _check_prefill_kernels(kernels, "dequantize_weight")
    assert all(k.params.startswith("half* __restrict__") for k in dequantizes)  # the weight in f16, as x
    assert all(k.tensor_cores for k in matmuls), [k.name for k in matmuls if not k.tensor_cores]
    fused = [k for k in kernels.values() if k.name.startswith("quant_linear")]
    assert len(fused) == 4 and all(not k.prefill and k.gemv for k in fused)


def test_cuda_nf4_prefill_is_tiled(monkeypatch, wide_llama):
    """NF4 (generic path): the generic ``dequantize`` kernels, then tiled matmuls; decode's linears
    read the dense weight through the GEMV rule."""
    kernels = _cuda_kernels(monkeypatch, _optimized(wide_llama, "nf4g64"))
    _check_prefill_kernels(kernels, "dequantize")
    assert not any(k.name.startswith("quant_linear") for k in kernels.values())
    decode_linears = [k for k in kernels.values() if k.name.startswith("linear") and not k.prefill]
    assert decode_linears and all(k.gemv for k in decode_linears)


# ---- numerics: the graph the GPU targets compile, compiled for the CPU ----------------------

TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3}  # fp16: about 2 f16 steps at the logits' size (~0.9)


@pytest.mark.parametrize("quant, dtype", [("w4g32", "fp32"), ("w4g128-asym", "fp32"), ("nf4g64", "fp32"),
                                          ("w4g32", "fp16")], ids=lambda v: v)
def test_the_gpu_graph_computes_the_quantized_model(quant, dtype, wide_llama):
    """prefill, logits (the dequantize-then-matmul form) and decode (the fused GEMV) of the cuda
    graph, compiled for the CPU, match the IR interpreter."""
    on_cpu = dataclasses.replace(get_target("cuda"), tvm_target=lambda arch: cpu_target(None), schedule_rules=None,
                                 check_toolchain=None, compile_context=None)
    module = _optimized(wide_llama, quant, dtype)
    library = compile_module(module, on_cpu)
    vm = tvm.relax.VirtualMachine(library.executable, tvm.cpu())
    weights = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    atol = TOLERANCE[dtype]
    ids, pos = np.array([IDS], np.int32), np.arange(len(IDS), dtype=np.int32)
    inputs = {"ids": ids, "pos": pos}

    got = vm["logits"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)[0].numpy()
    want = run_module(module, "logits", inputs)["logits"]
    assert np.abs(want).max() > 0.1  # logits worth comparing
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)

    got = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)
    want = run_module(module, "prefill", inputs)
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=atol, rtol=0)
    cache_names = [name for name, _ in module.functions["prefill"].outputs if name != "logits"]
    for name, value in zip(cache_names, got[1:]):
        np.testing.assert_allclose(value.numpy().astype(np.float32), want[name].astype(np.float32), atol=atol, rtol=0)

    capacity = 16
    step = {"ids": np.array([[11]], np.int32), "pos": np.array([len(IDS)], np.int32)}
    for name in cache_names:
        a = want[name]
        step[name] = np.concatenate([a, np.zeros((1, capacity - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)
    names = [p.name for p in module.functions["decode"].params]
    got = vm["decode"](*(tvm.runtime.tensor(step[n]) for n in names), *weights)[0].numpy()
    np.testing.assert_allclose(got, run_module(module, "decode", step)["logits"], atol=atol, rtol=0)
