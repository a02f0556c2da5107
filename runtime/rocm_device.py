"""The ROCm device a ROCm artifact runs on, or an ArtifactError saying why this machine cannot run it.

A ROCm artifact's library is x86-64 Linux code carrying AMDGPU code objects for the archs in its
manifest (``target.archs``; several in one offload bundle, from which HIP picks the GPU's). Loading
it needs a TVM runtime built with ROCm (``device_api.rocm``): the PyPI apache-tvm wheel for Linux has
none, so on such a runtime the artifact is refused before its library is opened. An AMD code object
runs only on its own arch; HIP reports a GPU of another arch when the kernels are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError

DEFAULT_NEEDS = "an AMD GPU of a built arch with ROCm and a TVM runtime built with ROCm"


def has_rocm_runtime() -> bool:
    """Whether this TVM runtime was built with ROCm."""
    import tvm_ffi
    return tvm_ffi.get_global_func("device_api.rocm", allow_missing=True) is not None


def rocm_device(tvm: Any, target: dict[str, Any], artifact_dir: Path) -> Any:
    """``tvm.rocm(0)`` when this runtime has ROCm and the device exists; ArtifactError otherwise."""
    archs = ", ".join(target.get("archs") or [(target.get("tvm") or {}).get("mcpu", "gfx?")])
    needs = target.get("device_needs") or DEFAULT_NEEDS
    hint = f"load it on a machine with {needs}; or rebuild it for this machine with `llmopt build ... --target cpu`"
    if not has_rocm_runtime():
        raise ArtifactError(
            f"{artifact_dir} was built for target 'rocm' ({archs}), and this TVM runtime has no ROCm support "
            "(the PyPI apache-tvm wheel for Linux has none): the device needs a TVM runtime built with ROCm",
            hint=hint, path=artifact_dir,
        )
    dev = tvm.rocm(0)
    try:
        exists = bool(dev.exist)
    except Exception:  # noqa: BLE001 - a broken ROCm install counts as none
        exists = False
    if not exists:
        raise ArtifactError(f"{artifact_dir} was built for target 'rocm' ({archs}), and this machine has no ROCm "
                            "device", hint=hint, path=artifact_dir)
    return dev
