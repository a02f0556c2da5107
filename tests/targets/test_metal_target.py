"""The metal target on a Linux machine: `llmopt build --target metal` writes a complete artifact whose
`model.dylib` is an ad-hoc signed arm64 macOS dylib carrying Metal Shading Language source for the
model's kernels (the Metal runtime compiles it at load), the same bytes whatever the output path;
missing ziglang fails before any model work, naming what to install; loading the artifact here
refuses, saying where it runs. The graph is the cuda target's (same kernels), whose numerics
tests/targets/test_cuda_target.py checks against the IR interpreter.
"""

from __future__ import annotations

import re

import pytest

import llmopt.compiler
from llmopt.codegen import metal_toolchain
from llmopt.compiler import BuildOptions, build
from llmopt.errors import LLMOptError
from llmopt.runtime import ArtifactError, load
from llmopt.runtime.manifest import verify
from llmopt.targets import UnknownTargetError, get_target

from device_code import (CPU_TYPE_ARM64, LC_BUILD_VERSION, LC_CODE_SIGNATURE, LC_ID_DYLIB, MH_DYLIB, MH_MAGIC_64,
                         PLATFORM_MACOS, macho, macos_min_version)

BUILDS = [(None, None), ("w4g32", "m2")]  # (quant, --arch): fp32 for every Apple silicon Mac; int4, M2 host


_BUILT: dict = {}


def _built(tmp_path_factory, tiny_llama, quant, arch):
    """The artifact dir of the tiny Llama built for metal (once per module for each (quant, arch))."""
    if (quant, arch) not in _BUILT:
        out = tmp_path_factory.mktemp(f"metal_{quant or 'fp32'}") / "artifact"
        build(tiny_llama, out, BuildOptions(target="metal", arch=arch, quant=quant))
        _BUILT[quant, arch] = out
    return _BUILT[quant, arch]


@pytest.fixture(scope="module", params=BUILDS, ids=lambda b: b[0] or "fp32")
def metal_build(request, tmp_path_factory, tiny_llama):
    """(quant, arch, artifact dir) of the tiny Llama built for metal."""
    quant, arch = request.param
    return quant, arch or "m1", _built(tmp_path_factory, tiny_llama, quant, arch)


def test_manifest_is_complete(metal_build):
    quant, arch, out = metal_build
    manifest = verify(out)  # every file present and hashed
    target = manifest.target
    assert target["name"] == target["device"] == "metal" and target["archs"] == [arch]
    assert target["tvm"]["kind"] == "metal" and target["tvm"]["thread_warp_size"] == 32
    assert target["tvm"]["host"] == {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": f"apple-{arch}"}
    assert "Apple silicon" in target["device_needs"] and "pip install apache-tvm" in target["device_needs"]
    assert target["weight_layout"] == {} and manifest.library == "model.dylib"
    assert not (out / "model.so").exists()
    assert {e["name"] for e in manifest.entry_points} >= {"prefill", "decode", "logits"}
    assert set(manifest.files) >= set(manifest.referenced_files()) | {"model.ir"}
    names = [w.name for w in manifest.weights]
    if quant:
        assert any(n.endswith(".w4g32.packed") for n in names) and not any(n.endswith("proj.weight") for n in names)
    else:
        assert any(n.endswith("q_proj+k_proj+v_proj.weight") for n in names)


def test_library_is_a_signed_arm64_macos_dylib(metal_build):
    _, _, out = metal_build
    data = (out / "model.dylib").read_bytes()
    header = macho(data)
    assert header.magic == MH_MAGIC_64 and header.cputype == CPU_TYPE_ARM64 and header.filetype == MH_DYLIB
    assert LC_CODE_SIGNATURE in header.commands  # arm64 macOS loads signed code only (ad hoc suffices)
    build_version = header.commands[LC_BUILD_VERSION]
    assert int.from_bytes(build_version[8:12], "little") == PLATFORM_MACOS
    assert macos_min_version(build_version) == (11, 0)
    assert b"@rpath/model.dylib\0" in header.commands[LC_ID_DYLIB]  # no build path recorded
    assert b"__tvm_ffi__library_bin" in data  # the packed modules TVM's loader looks up


def test_library_carries_msl_source_for_the_models_kernels(metal_build):
    quant, _, out = metal_build
    data = (out / "model.dylib").read_bytes()
    kernels = [k.decode() for k in re.findall(rb"kernel void ([A-Za-z0-9_]+)\(", data)]
    assert len(kernels) == len(set(kernels)) > 20 and all(k.endswith("_kernel") for k in kernels)
    assert data.count(b"#include <metal_stdlib>") == len(kernels)  # one MSL source per kernel
    families = {re.sub(r"(_\d+x\d+_float32)?\d*_kernel$", "", k) for k in kernels}
    assert {"kv_write", "rms_norm", "softmax", "take", "rope"} <= families
    if quant:  # decode: dequantize fused into the GEMV kernels, reading the packed uint32 codes; prefill:
        # each weight's dequantize kernel, then a tiled matmul; never the generic dequantize lowering
        assert {"quant_linear", "dequantize_weight"} <= families and "dequantize" not in families
        source = data[data.index(b"kernel void quant_linear_kernel("):]
        assert b"device uint*" in source[:source.index(b") {")]  # among its parameters
    else:
        assert "linear" in families


def test_the_graph_is_the_cuda_targets():
    """The kernels and schedules are the cuda target's; test_cuda_target checks their numerics."""
    metal, cuda = get_target("metal"), get_target("cuda")
    for field in ("emit_linear", "emit_quant_linear", "quant_linear_supports", "schedule_rules", "emit_attention"):
        assert getattr(metal, field) is getattr(cuda, field)


def test_the_same_build_gives_the_same_library_anywhere(tmp_path_factory, tmp_path, tiny_llama):
    first = _built(tmp_path_factory, tiny_llama, *BUILDS[0])
    again = tmp_path / "elsewhere" / "other-name"
    build(tiny_llama, again, BuildOptions(target="metal", arch=BUILDS[0][1], quant=BUILDS[0][0]))
    assert (again / "model.dylib").read_bytes() == (first / "model.dylib").read_bytes()


def test_loading_here_refuses_saying_where_it_runs(metal_build):
    _, _, out = metal_build
    with pytest.raises(ArtifactError) as err:
        load(out)
    message = str(err.value)
    assert "built for target 'metal'" in message and "arm64 macOS dylib" in message and "this machine is" in message
    assert "Mac with Apple silicon" in err.value.hint and "pip install apache-tvm" in err.value.hint
    assert "--target cpu" in err.value.hint
    with pytest.raises(ArtifactError, match="runs on metal only, not on device 'cpu'"):
        load(out, device="cpu")


def _no_model_work(monkeypatch):
    def fail(model):
        raise AssertionError("the build started on the model before refusing")
    monkeypatch.setattr(llmopt.compiler, "load", fail)


def test_missing_ziglang_fails_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    monkeypatch.setattr(metal_toolchain, "ziglang_installed", lambda: False)
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="metal"))
    assert "ziglang was not found" in err.value.message and "pip install ziglang" in err.value.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["m5", "apple-m1", "m1,m2"])
def test_unknown_arch_is_refused_before_any_model_work(monkeypatch, tmp_path, tiny_llama, arch):
    _no_model_work(monkeypatch)
    with pytest.raises(UnknownTargetError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="metal", arch=arch))
    assert repr(arch) in err.value.message and "m1, m2, m3, m4" in err.value.hint


def test_targets_command_lists_metal(capsys):
    from llmopt.cli import main
    main(["targets"])
    out = capsys.readouterr().out
    metal = out[out.index("metal:"):]
    assert "--arch: m1, m2, m3, m4" in metal and "pip install ziglang" in metal and "Apple silicon" in metal

