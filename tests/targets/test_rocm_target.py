"""The rocm target on a machine without a GPU or ROCm: `llmopt build --target rocm --arch gfx90a,gfx942`
writes a complete artifact whose x86-64 library carries an AMDGPU code object for exactly each arch
(one offload bundle for several, the code object alone for one), all with the same kernels; a missing
device library or ld.lld fails before any model work, naming what to install; loading the artifact
with the PyPI TVM runtime (no ROCm) refuses with what the device needs. The graph is the cuda target's
(same kernels), whose numerics tests/targets/test_cuda_target.py checks against the IR interpreter.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

import llmopt.compiler
from llmopt.codegen import rocm_toolchain
from llmopt.compiler import BuildOptions, build
from llmopt.errors import LLMOptError
from llmopt.runtime import ArtifactError, load
from llmopt.runtime.manifest import verify
from llmopt.runtime.rocm_device import has_rocm_runtime
from llmopt.targets import UnknownTargetError, get_target

from device_code import ELFOSABI_AMDGPU_HSA, amdgpu_code_objects, offload_bundles

# (quant, archs): datacenter wave64 archs; int4 with an RDNA (wave32) arch added; one arch alone
BUILDS = [(None, ("gfx90a", "gfx942")), ("w4g32", ("gfx90a", "gfx942", "gfx1100")), (None, ("gfx1100",))]
CODE_OBJECT_V6 = 4  # e_ident[EI_ABIVERSION] of ELFABIVERSION_AMDGPU_HSA_V6


@pytest.fixture(scope="module", params=BUILDS, ids=lambda b: f"{b[0] or 'fp32'}-{'+'.join(b[1])}")
def rocm_build(request, tmp_path_factory, tiny_llama):
    """(quant, archs, artifact dir) of the tiny Llama built for rocm."""
    quant, archs = request.param
    out = tmp_path_factory.mktemp(f"rocm_{quant or 'fp32'}_{len(archs)}") / "artifact"
    build(tiny_llama, out, BuildOptions(target="rocm", arch=",".join(archs), quant=quant))
    return quant, archs, out


def test_manifest_is_complete(rocm_build):
    quant, archs, out = rocm_build
    manifest = verify(out)  # every file present and hashed
    target = manifest.target
    assert target["name"] == target["device"] == "rocm"
    assert target["archs"] == list(archs)
    assert target["tvm"]["kind"] == "rocm" and target["tvm"]["mcpu"] == archs[0]
    assert target["tvm"]["thread_warp_size"] == (32 if "gfx1100" in archs else 64)  # what every arch runs
    assert target["tvm"]["host"]["mtriple"].startswith("x86_64")
    assert "AMD GPU" in target["device_needs"] and "TVM runtime built with ROCm" in target["device_needs"]
    assert target["weight_layout"] == {} and manifest.library == "model.so"
    assert {e["name"] for e in manifest.entry_points} >= {"prefill", "decode", "logits"}
    assert set(manifest.files) >= set(manifest.referenced_files()) | {"model.ir"}
    assert json.loads((out / "manifest.json").read_text())["created_by"]["options"]["arch"] == ",".join(archs)
    names = [w.name for w in manifest.weights]
    if quant:  # the quantized linears are stored as their packed codes and scales only, in the IR's layout
        assert any(n.endswith(".w4g32.packed") for n in names) and not any(n.endswith("proj.weight") for n in names)
    else:
        assert any(n.endswith("q_proj+k_proj+v_proj.weight") for n in names)


def _kernels(code: bytes) -> set[str]:
    return {k.decode() for k in re.findall(rb"([A-Za-z0-9_]+_kernel)\.kd\x00", code)}


def test_library_is_x86_64_with_a_code_object_for_exactly_each_arch(rocm_build):
    quant, archs, out = rocm_build
    data = (out / "model.so").read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and struct.unpack_from("<H", data, 18)[0] == 62  # ELF64 x86-64
    objects = amdgpu_code_objects(data)
    assert [o.arch for o in objects] == list(archs)  # e_flags' EF_AMDGPU_MACH, in the requested order
    for code, arch in zip(objects, archs):
        assert code.note_target == f"amdgcn-amd-amdhsa-hcc-{arch}"  # the metadata note agrees
        assert code.os_abi == ELFOSABI_AMDGPU_HSA and code.abi_version == CODE_OBJECT_V6
        assert code.wavefront_sizes == {32 if arch.startswith("gfx11") else 64}  # the arch's native wavefront
    bundles = offload_bundles(data)
    if len(archs) == 1:  # one arch: its code object alone, as TVM stores it
        assert bundles == [] and objects[0].bundle_id is None
    else:  # several: one bundle, the empty host entry first, then one entry per arch
        assert len(bundles) == 1
        assert [entry_id for entry_id, _ in bundles[0]] == (
            ["host-x86_64-unknown-linux-gnu-"] + [f"hipv4-amdgcn-amd-amdhsa--{a}" for a in archs])
        kernels = [_kernels(payload) for _, payload in bundles[0][1:]]
        assert all(k == kernels[0] for k in kernels)  # the same kernels for every arch (one host code)
        start = data.index(b"__CLANG_OFFLOAD_BUNDLE__")
        assert all((data.index(payload) - start) % 4096 == 0 for _, payload in bundles[0][1:])  # page-aligned
    kernels = _kernels(data)
    assert {"kv_write", "rms_norm", "softmax"} <= {re.sub(r"(_\d+x\d+_float32)?\d*_kernel$", "", k) for k in kernels}
    if quant:  # decode: dequantize fused into the GEMV kernels; prefill: each weight's dequantize kernel, then
        # a tiled matmul (test_gpu_quant_prefill.py); never the generic dequantize lowering
        assert any(k.startswith("quant_linear") for k in kernels) and any("dequantize_weight" in k for k in kernels)
        assert not any(re.fullmatch(r"dequantize\d*_kernel", k) for k in kernels)
    else:
        assert any(k.startswith("linear") for k in kernels)
    assert not re.search(rb"define [a-z ]*@|\.amdgcn_target", data)  # no LLVM IR or assembly left in the library


def test_the_graph_is_the_cuda_targets():
    """The kernels and schedules are the cuda target's; test_cuda_target checks their numerics."""
    rocm, cuda = get_target("rocm"), get_target("cuda")
    for field in ("emit_linear", "emit_quant_linear", "quant_linear_supports", "schedule_rules", "emit_attention"):
        assert getattr(rocm, field) is getattr(cuda, field)


def test_loading_here_refuses_with_what_the_device_needs(rocm_build):
    if has_rocm_runtime():
        pytest.skip("this TVM runtime has ROCm: the artifact is loaded there")
    _, archs, out = rocm_build
    with pytest.raises(ArtifactError) as err:
        load(out)
    message = str(err.value)
    assert f"built for target 'rocm' ({', '.join(archs)})" in message and "no ROCm support" in message
    assert "TVM runtime built with ROCm" in message and "PyPI apache-tvm wheel" in message
    assert "AMD GPU" in err.value.hint and "--target cpu" in err.value.hint
    with pytest.raises(ArtifactError, match="runs on rocm only, not on device 'cpu'"):
        load(out, device="cpu")


def _no_model_work(monkeypatch):
    def fail(model):
        raise AssertionError("the build started on the model before refusing")
    monkeypatch.setattr(llmopt.compiler, "load", fail)


def test_missing_device_libraries_fail_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    partial = tmp_path / "rocm" / "amdgcn" / "bitcode"  # a folder with ocml only
    partial.mkdir(parents=True)
    (partial / "ocml.bc").write_bytes(b"BC")
    monkeypatch.setattr(rocm_toolchain, "bitcode_dirs", lambda: [partial, tmp_path / "none"])
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="rocm", arch="gfx90a"))
    assert "ROCm device libraries" in err.value.message and f"{partial} (lacks oclc_daz_opt_on.bc" in err.value.message
    assert "apt-get install rocm-device-libs" in err.value.hint and "ROCM_PATH" in err.value.hint
    assert not (tmp_path / "out").exists()


def _fake_lld(folder, version: str):
    folder.mkdir()
    lld = folder / "ld.lld"
    lld.write_text(f"#!/bin/sh\necho 'LLD {version} (compatible with GNU linkers)'\n")
    lld.chmod(0o755)
    return lld


def test_missing_or_old_lld_fails_before_any_model_work(monkeypatch, tmp_path, tiny_llama):
    _no_model_work(monkeypatch)
    old = _fake_lld(tmp_path / "bin", "16.0.6")  # Debian's lld-16: too old for code object v6
    monkeypatch.setenv("PATH", f"{old.parent}:/usr/bin:/bin")
    monkeypatch.setattr(rocm_toolchain, "ziglang_lld", lambda: None)  # no ziglang
    with pytest.raises(LLMOptError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="rocm", arch="gfx90a,gfx942"))
    assert "no ld.lld of LLVM 22 or newer" in err.value.message and f"{old} (LLD 16)" in err.value.message
    assert "pip install ziglang" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_an_ld_lld_22_on_path_is_used(monkeypatch, tmp_path):
    new = _fake_lld(tmp_path / "bin", "22.1.0")
    monkeypatch.setenv("PATH", f"{new.parent}:/usr/bin:/bin")
    assert rocm_toolchain.find_lld()[0] == (str(new),)


@pytest.mark.parametrize("arch, bad", [("gfx90a,gfx1200", "gfx1200"), ("sm_80", "sm_80"),
                                       ("gfx90a,gfx90a", "gfx90a,gfx90a")])
def test_unknown_arch_is_refused_before_any_model_work(monkeypatch, tmp_path, tiny_llama, arch, bad):
    _no_model_work(monkeypatch)
    with pytest.raises(UnknownTargetError) as err:
        build(tiny_llama, tmp_path / "out", BuildOptions(target="rocm", arch=arch))
    assert repr(bad) in err.value.message and "gfx90a" in err.value.hint


def test_offload_bundle_layout():
    """The bundle as clang-offload-bundler lays it out, read back by the independent reader."""
    objects = {"gfx90a": b"\x7fELF" + b"a" * 100, "gfx1100": b"\x7fELF" + b"b" * 5000}
    data = rocm_toolchain.offload_bundle(objects)
    assert data.startswith(b"__CLANG_OFFLOAD_BUNDLE__") and struct.unpack_from("<Q", data, 24)[0] == 3
    (bundle,) = offload_bundles(data)
    assert bundle == [("host-x86_64-unknown-linux-gnu-", b""), ("hipv4-amdgcn-amd-amdhsa--gfx90a", objects["gfx90a"]),
                      ("hipv4-amdgcn-amd-amdhsa--gfx1100", objects["gfx1100"])]
    assert [data.index(code) % 4096 for code in objects.values()] == [0, 0]  # page-aligned code objects


def test_targets_command_lists_rocm(capsys):
    from llmopt.cli import main
    main(["targets"])
    out = capsys.readouterr().out
    rocm = out[out.index("rocm:"):]
    assert "--arch: gfx908, gfx90a, gfx942, gfx1030, gfx1100" in rocm and "rocm-device-libs" in rocm
    assert "pip install ziglang" in rocm and "device needs: an AMD GPU" in rocm
