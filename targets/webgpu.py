"""WebGPU in a browser: WGSL kernels, host code in wasm32 linked with TVM's web runtime.

The artifact is a folder a web server can serve as it is: ``model.wasm`` (the model's host code
and TVM's C++ web runtime, with the WGSL kernels inside), ``manifest.json`` (also the weights
index: name, shape, dtype and safetensors shard of each weight, in the order the library takes
them), ``weights/*.safetensors``, ``tokenizer.json``, and ``web/``: ``index.html`` and
``llmopt_webgpu.js`` (llmopt's loader: it fetches the shards, runs prefill and greedy decode),
with tvmjs (TVM's JS runtime, npm ``@mlc-ai/web-runtime`` 0.27.0-dev0) as ``tvmjs.bundle.js``.
Serve the folder and open ``web/index.html?ids=1,2,3&steps=8``; the page takes token ids (no
tokenizer in the browser yet).

Kernels are the CUDA target's: a linear is one TE compute reading the weight as stored ``[N, K]``
and a quantized linear the same with the dequantize inlined (codegen/kernels/gpu_linear.py),
scheduled by dlight's GPU rules except Matmul (see ``_schedule_rules``); the rest is legalized Relax. The graph holds no int64 values (ids
and positions are int32, masks additive floats; WGSL has no i64). The build needs emscripten and
Node.js, and tvmjs from npm (codegen/webgpu_toolchain.py); no GPU.
"""

from __future__ import annotations

from pathlib import Path

from . import gpu
from .base import TargetSpec

TVM_TARGET = {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}
PAGE_DIR = "web"  # the page's folder inside the artifact


def webgpu_target(arch: str | None) -> dict:
    """TVM's target: WebGPU kernels, a wasm32 host (no arch to choose)."""
    return {**TVM_TARGET, "host": dict(TVM_TARGET["host"])}


def _schedule_rules():
    """dlight's GPU rules without Matmul: its tiled, unrolled prefill kernels (up to 80 kB of WGSL
    each) crash SwiftShader's shader compiler (Chromium's CPU adapter, which the tests run on), so
    prefill matmuls get the Reduction/Fallback schedules; decode's GEMV is unaffected."""
    from tvm.s_tir import dlight
    return [dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]


def _check_toolchain(arch: str | None) -> None:
    from ..codegen.webgpu_toolchain import check_toolchain
    check_toolchain()


class WebGPULibrary:
    """The compiled module as the artifact stores it: ``export_library(path)`` links ``path`` (the
    .wasm) and writes the page that runs it into ``web/`` beside it."""

    def __init__(self, executable):
        self.executable = executable

    def export_library(self, path: str, **_) -> None:
        from ..codegen import webgpu_toolchain as toolchain
        emcc = toolchain.check_toolchain()

        def fcompile(output, objects, options=None, **__):
            toolchain.link_wasm(emcc, list(objects), Path(output))

        fcompile.object_format = "o"  # wasm object files: Debian's emscripten (LLVM 14) cannot read LLVM 22 bitcode
        self.executable.export_library(str(path), fcompile=fcompile)
        toolchain.write_page(Path(path).parent / PAGE_DIR)


def _package_library(executable, arch: str | None) -> WebGPULibrary:
    return WebGPULibrary(executable)


TARGET = TargetSpec(
    name="webgpu",
    description="WebGPU in a browser: WGSL kernels, wasm32 host with TVM's web runtime, a web page to run it",
    device="webgpu",
    library_file="model.wasm",
    tvm_target=webgpu_target,
    device_needs="a browser with WebGPU (Chrome/Edge 113+, or Chromium with --enable-unsafe-webgpu); serve the "
                 "artifact folder over HTTP and open web/index.html (tvmjs ships inside it)",
    arch_help="none (WebGPU picks the adapter at run time)",
    build_needs="emscripten and Node.js (apt-get install emscripten nodejs npm), tvmjs (npm ci in llmopt's web/); "
                "no GPU",
    check_free_arch=lambda arch: "WebGPU takes no --arch (the browser picks the adapter): leave it out.",
    check_toolchain=_check_toolchain,
    package_library=_package_library,
    # no Matmul rule, so prefill keeps the fused dequantize-matmul form
    **gpu.shared_fields(schedule_rules=_schedule_rules, emit_quant_linear=gpu.emit_fused_quant_linear),
)
