"""The webgpu target: `llmopt build --target webgpu` writes an artifact a web server can serve (a
.wasm with the model's host code and TVM's web runtime, its WGSL kernels inside, the safetensors
shards indexed by manifest.json, and web/ with the page, llmopt's loader and tvmjs); missing
emscripten, Node.js or tvmjs fail before any model work. End to end: headless Chromium (WebGPU on
SwiftShader's CPU adapter, driven by web/run_in_chromium.cjs through puppeteer-core) loads the
artifact, runs prefill and greedy decode, and its logits match the CPU artifact's along the way.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import llmopt.compiler
from llmopt.codegen import webgpu_toolchain
from llmopt.compiler import BuildOptions, build
from llmopt.errors import LLMOptError
from llmopt.frontend.zoo import smollm2_hf_folder
from llmopt.runtime import ArtifactError, load
from llmopt.runtime.manifest import verify
from llmopt.targets import UnknownTargetError

from device_code import wgsl_kernels

VARIANTS = [None, "w4g32"]  # fp32, and int4 with groups of 32 (fused dequantize + matmul kernels)
IDS = [1, 17, 99, 3, 42]
DRIVER = webgpu_toolchain.WEB_DIR / "run_in_chromium.cjs"
TINY_ATOL = 1e-4  # fp32 logits, WebGPU (SwiftShader) vs the CPU artifact; measured 8e-7
SMOLLM2_ATOL = 2e-2  # 30 layers of differently ordered fp32 sums (logits ~ +-20); measured 7e-3


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda q: q or "fp32")
def builds(request, tmp_path_factory, tiny_llama):
    """(quant, webgpu artifact, cpu artifact) of the tiny Llama."""
    root = tmp_path_factory.mktemp(f"webgpu_{request.param or 'fp32'}")
    build(tiny_llama, root / "webgpu", BuildOptions(target="webgpu", quant=request.param))
    build(tiny_llama, root / "cpu", BuildOptions(quant=request.param))
    return request.param, root / "webgpu", root / "cpu"


def wasm_imports(data: bytes) -> list[tuple[str, str]]:
    """(module, name) of every import of a wasm binary."""
    def leb(pos):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    def name(pos):
        length, pos = leb(pos)
        return data[pos:pos + length].decode(), pos + length

    pos, found = 8, []
    while pos < len(data):
        section, pos = data[pos], pos + 1
        size, pos = leb(pos)
        if section == 2:
            count, at = leb(pos)
            for _ in range(count):
                module, at = name(at)
                field, at = name(at)
                kind, at = data[at], at + 1
                assert kind == 0, f"import {module}.{field} is not a function"  # functions only
                _, at = leb(at)
                found.append((module, field))
        pos += size
    return found


def test_manifest_is_complete(builds):
    quant, out, _ = builds
    manifest = verify(out)  # every file present and hashed
    target = manifest.target
    assert target["name"] == target["device"] == "webgpu"
    assert target["tvm"] == {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}
    assert "WebGPU" in target["device_needs"] and target["weight_layout"] == {}
    assert manifest.library == "model.wasm"
    assert {e["name"] for e in manifest.entry_points} >= {"prefill", "decode", "logits"}
    page = {"web/index.html", "web/llmopt_webgpu.js", "web/tvmjs.bundle.js", "web/tvmjs.LICENSE"}
    assert set(manifest.files) >= set(manifest.referenced_files()) | {"model.ir"} | page
    for w in manifest.weights:  # the index the page loads weights by
        assert w.file.startswith("weights/") and w.file.endswith(".safetensors") and w.file in manifest.files
    names = [w.name for w in manifest.weights]
    if quant:  # quantized linears stored as packed codes and scales only
        packed = [w for w in manifest.weights if w.name.endswith(".w4g32.packed")]
        assert packed and all(w.dtype == "uint32" for w in packed)
        assert not any(n.endswith("proj.weight") for n in names)
    else:
        assert any(n.endswith("q_proj+k_proj+v_proj.weight") for n in names)


def test_library_is_wasm_with_wgsl_kernels_and_only_imports_tvmjs_provides(builds):
    quant, out, _ = builds
    data = (out / "model.wasm").read_bytes()
    assert data[:8] == b"\0asm\x01\0\0\0"
    kernels = wgsl_kernels(data)
    assert len(kernels) > 20
    for name, source in kernels.items():
        assert re.search(rf"@compute @workgroup_size\([^)]*\)\s*fn {name}\(", source), name
        assert not re.search(r"\bi64\b|\bu64\b", source), name  # WGSL has no 64-bit integers
    assert any(n.startswith("kv_write") for n in kernels)  # the decode cache is written in place
    if quant:  # dequantize fused into the linears' kernels: none materializes a weight
        assert any("quant_linear" in n for n in kernels) and not any("dequantize" in n for n in kernels)
    bundle = (out / "web" / "tvmjs.bundle.js").read_text()
    provided = set(re.search(r"var wasmImports=\{([^}]*)\}", bundle).group(1).replace(" ", "").split(","))
    provided = {entry.split(":")[0] for entry in provided}
    imports = wasm_imports(data)
    assert {module for module, _ in imports} <= {"env", "wasi_snapshot_preview1"}
    assert {field for _, field in imports} <= provided  # instantiates with tvmjs's glue: nothing unresolved
    assert ("env", "TVMFFIWasmSafeCall") in imports


def test_page_files_are_llmopts(builds):
    _, out, _ = builds
    for name in webgpu_toolchain.PAGE_FILES:
        assert (out / "web" / name).read_bytes() == (webgpu_toolchain.WEB_DIR / "page" / name).read_bytes()
    assert (out / "web" / "tvmjs.bundle.js").read_bytes() == webgpu_toolchain.TVMJS_BUNDLE.read_bytes()


def test_loading_here_refuses_with_what_to_do(builds):
    _, out, _ = builds
    with pytest.raises(ArtifactError, match="target 'webgpu': it runs in a web browser") as refused:
        load(out)
    assert "web/index.html" in str(refused.value) and "http.server" in str(refused.value)


def run_in_chromium(artifact: Path, ids: list[int] | None, steps: int, timeout: int, prompt: str | None = None) -> dict:
    """What the artifact's page computed in headless Chromium from prompt ``ids`` (or the text ``prompt``,
    tokenized by the page): ids, tokens, text, every step's logits, timings."""
    given = ["--prompt", prompt] if prompt is not None else ["--ids", ",".join(map(str, ids))]
    command = ["node", str(DRIVER), "--artifact", str(artifact), *given,
               "--steps", str(steps), "--logits", "--timeout", str(timeout)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 120)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout.splitlines()[-1])
    result["logits"] = [np.frombuffer(base64.b64decode(x), np.float32) for x in result["logits"]]
    return result


def cpu_steps(cpu, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """The CPU artifact's greedy tokens and the logits each was picked from (prefill, then decodes)."""
    logits, cache = cpu.prefill(np.array(ids))
    tokens, all_logits = [], [logits]
    for step in range(steps):
        tokens.append(int(np.argmax(logits)))
        if step < steps - 1:
            logits, cache = cpu.decode(tokens[-1], cache)
            all_logits.append(logits)
    return tokens, all_logits


def assert_matches_cpu(result: dict, cpu, ids: list[int], steps: int, atol: float) -> None:
    """The page's logits match the CPU artifact's at every step (along the same greedy path), and
    so do the tokens wherever the greedy choice is clear."""
    tokens, want = cpu_steps(cpu, ids, steps)
    assert len(result["logits"]) == len(want) == steps
    for step, (got, expected) in enumerate(zip(result["logits"], want)):
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0, err_msg=f"step {step}")
        top2 = np.sort(expected)[-2:]
        if top2[1] - top2[0] > 2 * atol:
            assert result["tokens"][step] == tokens[step], f"step {step}"
    assert result["tokens"] == tokens


def test_chromium_runs_the_artifact_and_matches_the_cpu_artifact(builds):
    quant, out, cpu_out = builds
    result = run_in_chromium(out, IDS, steps=6, timeout=300)
    assert result["adapter"]["architecture"] == "swiftshader"  # a real WebGPU adapter, on the CPU
    assert_matches_cpu(result, load(cpu_out), IDS, steps=6, atol=TINY_ATOL)


def test_smollm2_w4g32_in_chromium_matches_the_cpu_artifact(tmp_path):
    """The real model, int4: slow (SwiftShader runs WGSL on the CPU, ~10 s per decode step here)."""
    folder = smollm2_hf_folder()
    build(folder, tmp_path / "webgpu", BuildOptions(target="webgpu", quant="w4g32"))
    build(folder, tmp_path / "cpu", BuildOptions(quant="w4g32"))
    cpu = load(tmp_path / "cpu")
    prompt = "The capital of France is"
    ids = cpu.tokenizer.encode(prompt)
    result = run_in_chromium(tmp_path / "webgpu", None, steps=3, timeout=900, prompt=prompt)
    assert result["ids"] == ids  # the page's tokenizer (web/page/llmopt_tokenizer.js) agrees with tokenizers
    assert_matches_cpu(result, cpu, ids, steps=3, atol=SMOLLM2_ATOL)
    assert result["text"] == cpu.tokenizer.decode(result["tokens"], skip_special_tokens=False)


def _no_model_work(monkeypatch):
    def fail(model):
        raise AssertionError("the build started on the model before refusing")
    monkeypatch.setattr(llmopt.compiler, "load", fail)


def test_missing_emscripten_and_node_fail_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="webgpu"))
    assert "emcc (emscripten)" in err.value.message and "node (Node.js" in err.value.message
    assert "apt-get install emscripten nodejs" in err.value.hint and "npm ci" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_missing_tvmjs_fails_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    monkeypatch.setattr(webgpu_toolchain, "TVMJS_BUNDLE", tmp_path / "node_modules" / "index.js")
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="webgpu"))
    assert "tvmjs (npm @mlc-ai/web-runtime" in err.value.message
    assert f"npm ci --prefix {webgpu_toolchain.WEB_DIR}" in err.value.hint


def test_arch_is_refused_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    with pytest.raises(UnknownTargetError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="webgpu", arch="sm_80"))
    assert "'sm_80'" in err.value.message and "no --arch" in err.value.hint


def test_targets_command_lists_webgpu(capsys):
    from llmopt.cli import main
    main(["targets"])
    out = capsys.readouterr().out
    webgpu = out[out.index("webgpu:"):]
    assert "emscripten" in webgpu and "device needs: a browser with WebGPU" in webgpu


def test_runtime_shims_serialize_as_tvm_does(tmp_path):
    """llmopt's stand-in for TVM's serializer (web/runtime/shims) reads what the TVM compiler writes:
    a VM executable's bytes, compiled natively against the shims, load and list the same functions."""
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed to compile the shim check (apt-get install g++)"
    tvm_dir, ffi_dir = webgpu_toolchain.tvm_web_sources()
    source = tmp_path / "check.cc"
    source.write_text(r"""
#include <tvm/support/io.h>
#include "src/support/bytes_io.h"
#include <cstdio>
#include <fstream>
#include <iterator>
using namespace tvm;
int main(int argc, char** argv) {
  std::ifstream in(argv[1], std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  support::BytesInStream strm(bytes);
  uint64_t header; std::string version;
  if (!strm.Read(&header) || !strm.Read(&version)) return 2;
  uint64_t count; if (!strm.Read(&count)) return 3;
  std::printf("%s\n", version.c_str());
  for (uint64_t i = 0; i < count; ++i) {
    int32_t kind; std::string name; int64_t start, end, num_args, regs; std::vector<std::string> params;
    if (!strm.Read(&kind) || !strm.Read(&name) || !strm.Read(&start) || !strm.Read(&end) ||
        !strm.Read(&num_args) || !strm.Read(&regs) || !strm.Read(&params)) return 4;
    std::printf("%s %d %zu\n", name.c_str(), kind, params.size());
  }
  std::string out; support::BytesOutStream o(&out);
  std::map<std::string, std::vector<int64_t>> m{{"a", {1, 2}}}; o.Write(m); o.Write(ffi::String("xy"));
  support::BytesInStream back(out); std::map<std::string, std::vector<int64_t>> m2; ffi::String s;
  return back.Read(&m2) && back.Read(&s) && m2 == m && s == "xy" ? 0 : 5;
}
""")
    binary = tmp_path / "check"
    subprocess.run([gxx, "-std=c++17", "-O0", f"-I{webgpu_toolchain.SHIMS}", f"-I{webgpu_toolchain.SHIMS / 'include'}",
                    f"-I{ffi_dir / 'include'}", f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}", str(source),
                    "-o", str(binary), f"-L{ffi_dir / 'lib'}", "-ltvm_ffi", f"-Wl,-rpath,{ffi_dir / 'lib'}"],
                   check=True, capture_output=True, text=True)
    import tvm
    import tvm_ffi
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def add(x: R.Tensor((2,), "float32"), y: R.Tensor((2,), "float32")):
            return R.add(x, y)

    executable = tvm.compile(Mod, "llvm")
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy().tobytes()
    at = blob.index(struct.pack("<Q", 18) + b"relax.VMExecutable") + 26
    (tmp_path / "exec.bin").write_bytes(blob[at + 8:at + 8 + struct.unpack_from("<Q", blob, at)[0]])
    done = subprocess.run([str(binary), str(tmp_path / "exec.bin")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split("\n")
    assert re.fullmatch(r"\d+\.\d+", lines[0])
    assert "add 1 2" in lines[1:]  # a Relax function taking x and y


def test_the_wheel_ships_the_web_page_and_runtime_sources(tmp_path):
    """A non-editable install serves WebGPU builds too: every web/ file llmopt keeps in git (all but
    npm's node_modules) is package data of the wheel."""
    import sys
    root = webgpu_toolchain.WEB_DIR.parent
    tracked = subprocess.run(["git", "ls-files", "web"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout.strip():
        pytest.skip("needs llmopt's git checkout (to list the web/ files it keeps)")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    import zipfile
    (wheel,) = tmp_path.glob("llmopt-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("llmopt/web/")}
    wanted = {f"llmopt/{name}" for name in tracked.stdout.split() if name != "web/.gitignore"}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
