"""The cuda target on a machine without a GPU: `llmopt build --target cuda --arch sm_80,sm_90` writes a
complete artifact whose x86-64 library embeds one fatbin with an ELF cubin for exactly each arch;
the graph it compiles computes the model (checked by compiling that same graph for the CPU);
nvcc missing or an unknown arch fail before any model work; loading the artifact here refuses
with what to do. On a machine with a CUDA GPU, the artifact's logits and greedy tokens match the
CPU artifact's (skipped without one).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import tvm

import llmopt.compiler
from llmopt.codegen import cuda_toolchain
from llmopt.codegen.build import compile_module
from llmopt.compiler import BuildOptions, build, optimize
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.runtime import ArtifactError, generate, load
from llmopt.runtime.cuda_device import runs_on
from llmopt.runtime.manifest import verify
from llmopt.targets import UnknownTargetError, get_target
from llmopt.targets.cpu import cpu_target

from device_code import has_cuda_device
from fatbin import fatbin_entries

ARCHS = ["sm_80", "sm_90"]
VARIANTS = [None, "w4g32"]  # fp32, and int4 with groups of 32 (fused dequantize + matmul kernels)
IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33]

needs_gpu = pytest.mark.skipif(not has_cuda_device(), reason="needs a CUDA device and driver")


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda q: q or "fp32")
def cuda_build(request, tmp_path_factory, tiny_llama):
    """(quant, artifact dir) of the tiny Llama built for cuda sm_80,sm_90."""
    out = tmp_path_factory.mktemp(f"cuda_{request.param or 'fp32'}") / "artifact"
    build(tiny_llama, out, BuildOptions(target="cuda", arch=",".join(ARCHS), quant=request.param))
    return request.param, out


def test_manifest_is_complete(cuda_build):
    quant, out = cuda_build
    manifest = verify(out)  # every file present and hashed
    target = manifest.target
    assert target["name"] == target["device"] == "cuda"
    assert target["archs"] == ARCHS
    assert target["tvm"]["kind"] == "cuda" and target["tvm"]["arch"] == "sm_80"  # code valid for both
    assert target["tvm"]["host"]["mtriple"].startswith("x86_64")
    assert "NVIDIA GPU" in target["device_needs"] and target["weight_layout"] == {}
    assert manifest.library == "model.so"
    assert {e["name"] for e in manifest.entry_points} >= {"prefill", "decode", "logits"}
    assert set(manifest.files) >= set(manifest.referenced_files()) | {"model.ir"}
    assert json.loads((out / "manifest.json").read_text())["created_by"]["options"]["arch"] == "sm_80,sm_90"
    names = [w.name for w in manifest.weights]
    if quant:  # the quantized linears are stored as their packed codes and scales only, in the IR's layout
        packed = [w for w in manifest.weights if w.name.endswith(".w4g32.packed")]
        assert packed and all(w.dtype == "uint32" for w in packed)
        assert not any(n.endswith("proj.weight") for n in names)
    else:
        assert any(n.endswith("q_proj+k_proj+v_proj.weight") for n in names)


def test_library_is_x86_64_with_one_fatbin_for_exactly_the_archs(cuda_build):
    quant, out = cuda_build
    data = (out / "model.so").read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and struct.unpack_from("<H", data, 18)[0] == 62  # ELF64 x86-64
    fatbins = fatbin_entries(data)
    assert len(fatbins) == 1
    entries = fatbins[0]
    assert sorted(e.arch for e in entries if e.kind == "elf") == ARCHS
    assert all(e.kind == "elf" for e in entries)  # SASS only: no PTX to compile on the device
    for entry in entries:
        assert entry.compressed or entry.elf_arch == entry.arch  # the cubin's own header agrees
    assert b"__global__" not in data  # no CUDA source left to compile
    kernels = set(re.findall(rb"[A-Za-z0-9_]+_kernel", data))
    if quant:  # decode: dequantize fused into the GEMV kernels; prefill: each weight's dequantize kernel, then
        # a tiled matmul (test_gpu_quant_prefill.py); never the generic dequantize lowering
        assert any(b"quant_linear" in k for k in kernels) and any(b"dequantize_weight" in k for k in kernels)
        assert not any(re.fullmatch(rb"dequantize\d*_kernel", k) for k in kernels)
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(out / "model.so")], capture_output=True,
                                 text=True, check=True).stdout
        assert sorted(a for a in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
                      if f".{a}." in listing) == ARCHS


@pytest.mark.parametrize("quant", VARIANTS, ids=lambda q: q or "fp32")
def test_the_cuda_graph_computes_the_model(quant, tiny_llama):
    """The Relax graph the cuda target compiles (its NT-matmul and fused dequantize-matmul linears,
    generic Relax for the rest), compiled for the CPU instead, matches the IR interpreter."""
    cuda = get_target("cuda")
    on_cpu = dataclasses.replace(cuda, tvm_target=lambda arch: cpu_target(None), schedule_rules=None,
                                 check_toolchain=None, compile_context=None)
    module = optimize(load_hf_folder(tiny_llama), BuildOptions(quant=quant))
    library = compile_module(module, on_cpu)
    assert library.packed == set()  # weights in the IR's layout, as the cuda artifact stores them
    vm = tvm.relax.VirtualMachine(library.executable, tvm.cpu())
    weights = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    ids, pos = np.array([IDS], np.int32), np.arange(len(IDS), dtype=np.int32)
    got = vm["logits"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)[0].numpy()
    want = run_module(module, "logits", {"ids": ids, "pos": pos})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loading_here_refuses_with_what_to_do(cuda_build):
    if has_cuda_device():
        pytest.skip("this machine has a CUDA device: the artifact loads (see the GPU test)")
    _, out = cuda_build
    with pytest.raises(ArtifactError) as err:
        load(out)
    message = str(err.value)
    assert "built for target 'cuda' (sm_80, sm_90)" in message and "no CUDA device or driver" in message
    assert "NVIDIA GPU" in err.value.hint and "R580" in err.value.hint and "--target cpu" in err.value.hint
    with pytest.raises(ArtifactError, match="runs on cuda only, not on device 'cpu'"):
        load(out, device="cpu")


def _no_model_work(monkeypatch):
    def fail(model):
        raise AssertionError("the build started on the model before refusing")
    monkeypatch.setattr(llmopt.compiler, "load", fail)


def test_missing_nvcc_fails_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    bin_dir = tmp_path / "bin"  # a PATH with a C compiler but no nvcc
    bin_dir.mkdir()
    (bin_dir / "gcc").symlink_to(shutil.which("gcc") or "/usr/bin/gcc")
    monkeypatch.setenv("PATH", str(bin_dir))
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cuda_toolchain, "CUDA_HOMES", ())
    monkeypatch.setattr(cuda_toolchain, "_pip_nvcc_homes", lambda: [])
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="cuda", arch="sm_80,sm_90"))
    assert "nvcc" in err.value.message and "not found" in err.value.message
    assert "pip install nvidia-cuda-nvcc" in err.value.hint and "CUDA toolkit" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_nvcc_that_lacks_an_arch_fails_early(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"  # an nvcc that knows only sm_80 and sm_90
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\nprintf 'compute_80\\ncompute_90\\n'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{'/usr/bin:/bin'}")
    assert cuda_toolchain.check_toolchain(("sm_80", "sm_90")) == nvcc
    with pytest.raises(LLMOptError, match="cannot compile for sm_120 .*knows sm_80, sm_90"):
        cuda_toolchain.check_toolchain(("sm_80", "sm_120"))


@pytest.mark.parametrize("arch, bad", [("sm_80,sm_61", "sm_61"), ("sm_81", "sm_81"), ("compute_80", "compute_80"),
                                       ("sm_80,,sm_90", "sm_80,,sm_90"), ("sm_80,sm_80", "sm_80,sm_80")])
def test_unknown_arch_is_refused_before_any_model_work(monkeypatch, tmp_path, tiny_llama, arch, bad):
    _no_model_work(monkeypatch)
    with pytest.raises(UnknownTargetError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="cuda", arch=arch))
    assert repr(bad) in err.value.message
    assert "sm_80" in err.value.hint


def test_cpu_arch_is_still_a_single_llvm_cpu():
    cpu = get_target("cpu")
    with pytest.raises(UnknownTargetError, match="'skylake,znver3'"):
        llmopt.targets.check_arch(cpu, "skylake,znver3")
    llmopt.targets.check_arch(cpu, "skylake")


def test_targets_command_lists_cuda(capsys):
    from llmopt.cli import main
    main(["targets"])  # returns: no error
    out = capsys.readouterr().out
    cuda = out[out.index("cuda:"):]
    assert "--arch: sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120" in cuda
    assert "nvcc" in cuda and "device needs: an NVIDIA GPU" in cuda
    assert out.startswith("cpu:")


@needs_gpu
@pytest.mark.parametrize("quant", VARIANTS, ids=lambda q: q or "fp32")
def test_gpu_logits_and_greedy_tokens_match_the_cpu_artifact(quant, tmp_path, tiny_llama):
    """On a CUDA GPU: the artifact for its arch computes the CPU artifact's logits, prefill and decode,
    along the CPU's greedy continuation, and so picks its greedy tokens wherever the choice is clear."""
    gpu_arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    archs = ARCHS if runs_on(ARCHS, gpu_arch) else [f"sm_{gpu_arch[3:-1]}0"]
    build(tiny_llama, tmp_path / "cpu", BuildOptions(quant=quant))
    build(tiny_llama, tmp_path / "cuda", BuildOptions(target="cuda", arch=",".join(archs), quant=quant))
    cpu, gpu = load(tmp_path / "cpu"), load(tmp_path / "cuda")
    prompt = IDS[:5]
    tokens = list(generate(cpu, prompt, max_new_tokens=8, stop_ids=()))
    (want, want_cache), (got, got_cache) = cpu.prefill(np.array(prompt)), gpu.prefill(np.array(prompt))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gpu.forward_logits(np.array(IDS)), cpu.forward_logits(np.array(IDS)), atol=1e-4)
    clear = 0
    for token in tokens:
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 1e-3:  # a clear greedy choice: the GPU makes it too
            assert int(np.argmax(got)) == int(np.argmax(want)) == token
            clear += 1
        (want, want_cache), (got, got_cache) = cpu.decode(token, want_cache), gpu.decode(token, got_cache)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert clear > 0
