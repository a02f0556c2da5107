"""The cpu target cross-compiled for aarch64 Linux on this x86-64 machine: `llmopt build --target cpu
--arch cortex-a76` writes a complete artifact whose `model.so` is an aarch64 ELF shared library (the
default build's an x86-64 one); the graph it compiles, with the kernels chosen for aarch64 (NEON
blocking, no x86-only instructions), compiled for this machine instead, computes the model (prefill
and decode against the IR interpreter); loading it here refuses with what to do; an unknown --arch
or a missing zig fails before any model work. (Nothing runs aarch64 code here: its speed, and its
numerics on an aarch64 CPU, are unmeasured.)
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import tvm

import llmopt.compiler
from llmopt.codegen import build as codegen_build
from llmopt.codegen import cpu_cross_toolchain
from llmopt.codegen.build import compile_module
from llmopt.codegen.kernels import cpu_linear, cpu_quant_linear
from llmopt.codegen.kernels.cpu_fallback import CPUFallback
from llmopt.codegen.kernels.cpu_isa import NEON, X86, vector_unit
from llmopt.compiler import BuildOptions, build, optimize
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.runtime import ArtifactError, load
from llmopt.runtime.manifest import verify
from llmopt.targets import UnknownTargetError, get_target
from llmopt.targets.cpu import cpu_target

ARCH = "cortex-a76"  # a Raspberry Pi 5's CPU
VARIANTS = [None, "w4g32"]  # fp32, and int4 with groups of 32 (the fused dequantize + matmul kernels)
IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33]
EM_X86_64, EM_AARCH64 = 62, 183


def elf_machine(path) -> tuple[int, int]:
    """(ELF class, e_machine) of an ELF file: class 2 is ELF64."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[5] == 1  # little-endian
    return header[4], struct.unpack_from("<H", header, 18)[0]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda q: q or "fp32")
def arm_build(request, tmp_path_factory, tiny_llama):
    """(quant, artifact dir) of the tiny Llama built for a cortex-a76 (aarch64 Linux)."""
    out = tmp_path_factory.mktemp(f"aarch64_{request.param or 'fp32'}") / "artifact"
    build(tiny_llama, out, BuildOptions(target="cpu", arch=ARCH, quant=request.param))
    return request.param, out


def test_manifest_is_complete(arm_build):
    quant, out = arm_build
    manifest = verify(out)  # every file present and hashed
    target = manifest.target
    assert target["name"] == target["device"] == "cpu" and target["archs"] == [ARCH]
    assert target["tvm"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": ARCH, "num-cores": 4}
    assert manifest.library == "model.so"
    assert {e["name"] for e in manifest.entry_points} >= {"prefill", "decode", "logits"}
    assert set(manifest.files) >= set(manifest.referenced_files()) | {"model.ir"}
    assert target["weight_layout"]["packed"]  # the CPU kernels' blocked layout, as on x86
    names = [w.name for w in manifest.weights]
    if quant:  # stored as blocked codes and scales only, no f32 linear weights
        packed = [w for w in manifest.weights if w.name.endswith(".w4g32.packed")]
        assert packed and all(w.dtype == "uint32" and len(w.shape) == 3 for w in packed)
        assert not any(n.endswith("proj.weight") for n in names)
    else:
        assert any(n.endswith("q_proj+k_proj+v_proj.weight") for n in names)


def test_library_is_an_aarch64_shared_library(arm_build):
    _, out = arm_build
    assert elf_machine(out / "model.so") == (2, EM_AARCH64)
    assert (out / "model.so").read_bytes()[16] == 3  # e_type ET_DYN: a shared library


def test_the_same_build_gives_the_same_library_anywhere(tmp_path, tiny_llama):
    """zig's link records no path: two builds to different folders give the same bytes."""
    outs = [tmp_path / "one" / "artifact", tmp_path / "two" / "deeper" / "other"]
    for out in outs:
        build(tiny_llama, out, BuildOptions(target="cpu", arch=ARCH, quant="w4g32"))
    assert (outs[0] / "model.so").read_bytes() == (outs[1] / "model.so").read_bytes()


def test_the_default_build_is_x86_64(tmp_path, tiny_llama):
    out = tmp_path / "artifact"
    build(tiny_llama, out, BuildOptions(target="cpu"))
    assert elf_machine(out / "model.so") == (2, EM_X86_64)
    assert "mtriple" not in verify(out).target["tvm"]  # as before: this machine's kind


def test_kernels_pick_the_aarch64_blocking():
    arm, here = tvm.target.Target(cpu_target(ARCH)), tvm.target.Target(cpu_target(None))
    assert vector_unit(arm) == NEON and vector_unit(here) == X86
    assert vector_unit(tvm.target.Target(cpu_target("aarch64"))) == NEON
    # the x86-only instructions are gated off: VNNI, vpermps (NF4), vpermi2ps (N:M sparse)
    assert not tvm.target.codegen.target_has_features("avx512vnni", arm)
    assert not tvm.target.codegen.target_has_features("avx512f", arm)


@pytest.mark.parametrize("quant, prune, activations",
                         [(q, None, "f32") for q in VARIANTS] + [(None, "magnitude:2:4", "f32"), ("w4g32", None, "int8")],
                         ids=lambda v: v or "-")
def test_the_aarch64_graph_computes_the_model(quant, prune, activations, tiny_llama, monkeypatch):
    """The Relax graph the aarch64 build compiles (its kernels chosen under the cortex-a76 target),
    compiled for this machine instead, matches the IR interpreter: prefill (GEMM kernels) and a
    decode step (GEMV kernels). With 2:4 pruning the compact weights (compact-sparse) are densified
    for the NEON kernels (the sparse kernels are AVX-512's); with int8 activations the W4A8 kernels
    run without VNNI (portable int32 dot products)."""
    chosen = []  # the blocking of every linear kernel the graph asked for
    for module_, name, key in ((cpu_linear, "make_gemm", "rows"), (cpu_linear, "make_gemv", "split"),
                               (cpu_quant_linear, "make_quant_gemm", 2), (cpu_quant_linear, "make_quant_gemv", 1)):
        def spy(*args, _real=getattr(module_, name), _name=name, _key=key, **kwargs):
            chosen.append((_name, kwargs[_key] if isinstance(_key, str) else args[_key]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(module_, name, spy)

    real_compile = tvm.compile

    def compile_here(mod, target, relax_pipeline):
        assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
        here = tvm.target.Target(cpu_target(None))
        neon_fallback = dataclasses.replace(get_target("cpu"),  # vectorized by NEON's 4 lanes, as for aarch64
                                            schedule_rules=lambda: [CPUFallback(NEON.fallback_lanes)])
        with here:
            return real_compile(mod, here, relax_pipeline=codegen_build.relax_pipeline(neon_fallback, here))

    monkeypatch.setattr(tvm, "compile", compile_here)
    spec = dataclasses.replace(get_target("cpu"), check_toolchain=None, package_library=None)
    module = optimize(load_hf_folder(tiny_llama), BuildOptions(quant=quant, prune=prune, activations=activations))
    if activations == "int8":
        assert any(node.op == "linear_w4a8" for node in module.functions["decode"].nodes)
    if prune:  # the 2:4 weights are stored compactly, read through densify
        assert any(node.op == "densify" for node in module.functions["decode"].nodes)
    library = compile_module(module, spec, ARCH)
    monkeypatch.undo()

    expected = {"make_gemm": NEON.gemm_rows, "make_gemv": NEON.gemv_split,
                "make_quant_gemm": NEON.gemm_rows, "make_quant_gemv": NEON.quant_partial_sums}
    kinds = {name for name, _ in chosen}
    assert kinds >= ({"make_quant_gemm", "make_quant_gemv"} if quant and activations == "f32"
                     else {"make_gemm", "make_gemv"})  # (W4A8: the float LM head's)
    assert all(value == expected[name] for name, value in chosen), chosen

    vm = tvm.relax.VirtualMachine(library.executable, tvm.cpu())
    weights = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    ids, pos = np.array([IDS], np.int32), np.arange(len(IDS), dtype=np.int32)
    got = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pos), *weights)
    want = run_module(module, "prefill", {"ids": ids, "pos": pos})
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=1e-4, rtol=0)

    capacity = 16  # decode: one more token into cache buffers of `capacity` rows holding the prompt's
    buffers = {name: np.concatenate([a, np.zeros((1, capacity - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)
               for name, a in want.items() if name != "logits"}
    step = {"ids": np.array([[11]], np.int32), "pos": np.array([len(IDS)], np.int32), **buffers}
    want = run_module(module, "decode", step)
    names = [p.name for p in module.functions["decode"].params]
    got = vm["decode"](*(tvm.runtime.tensor(step[n]) for n in names), *weights)
    np.testing.assert_allclose(got[0].numpy(), want["logits"], atol=1e-4, rtol=0)


def test_loading_here_refuses_with_what_to_do(arm_build):
    _, out = arm_build
    with pytest.raises(ArtifactError) as err:
        load(out)
    assert f"built for {ARCH} (aarch64-linux-gnu)" in str(err.value)
    assert "needs architecture aarch64 on Linux; this machine is x86_64 Linux" in str(err.value)
    assert "aarch64 Linux machine" in err.value.hint and "without --arch" in err.value.hint


def _no_model_work(monkeypatch):
    def fail(model):
        raise AssertionError("the build started on the model before refusing")
    monkeypatch.setattr(llmopt.compiler, "load", fail)


@pytest.mark.parametrize("arch", ["cortex-a7000", "apple-m1", "x86_64"])
def test_an_unknown_arch_is_refused_before_any_model_work(arch, monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    with pytest.raises(UnknownTargetError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="cpu", arch=arch))
    assert f"unknown --arch {arch!r}" in err.value.message
    assert "aarch64" in err.value.hint and "cortex-a76" in err.value.hint and "neoverse-n1" in err.value.hint
    if arch.startswith("apple-"):
        assert "--target metal" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_missing_zig_fails_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    monkeypatch.setattr(cpu_cross_toolchain, "ziglang_installed", lambda: False)
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="cpu", arch="aarch64"))
    assert "ziglang" in err.value.message and "aarch64" in err.value.message
    assert "pip install ziglang" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_targets_lists_the_aarch64_archs():
    spec = get_target("cpu")
    assert "aarch64" in spec.arch_help and "cortex-a76" in spec.arch_help and "ziglang" in spec.build_needs
