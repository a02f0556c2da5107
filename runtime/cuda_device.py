"""The CUDA device a CUDA artifact runs on, or an ArtifactError saying why this machine cannot run it.

A CUDA artifact's library carries SASS for the archs in its manifest (``target.archs``, e.g.
``["sm_80", "sm_90"]``). A GPU runs SASS built for its own major version and a minor version not
above its own (an sm_86 GPU runs sm_80 code, an sm_90 GPU does not run sm_80 code). Loading the
library needs TVM's CUDA runtime, which loads only where the NVIDIA driver is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError

DEFAULT_NEEDS = "an NVIDIA GPU with its driver (R580 or newer, CUDA 13)"


def sm_version(arch: str) -> tuple[int, int]:
    """``sm_86`` -> (8, 6); ``sm_120`` -> (12, 0)."""
    number = int(arch.removeprefix("sm_"))
    return number // 10, number % 10


def runs_on(archs: list[str], gpu_arch: str) -> bool:
    """Whether a GPU of ``gpu_arch`` runs SASS of one of ``archs``."""
    major, minor = sm_version(gpu_arch)
    return any(m == major and n <= minor for m, n in map(sm_version, archs))


def cuda_device(tvm: Any, target: dict[str, Any], artifact_dir: Path) -> Any:
    """``tvm.cuda(0)`` when it exists and runs one of the artifact's archs; ArtifactError otherwise."""
    archs = list(target.get("archs") or [(target.get("tvm") or {}).get("arch", "sm_?")])
    needs = target.get("device_needs") or DEFAULT_NEEDS
    dev = tvm.cuda(0)
    try:
        exists = bool(dev.exist)
    except Exception:  # noqa: BLE001 - a broken driver install counts as none
        exists = False
    if not exists:
        raise ArtifactError(
            f"{artifact_dir} was built for target 'cuda' ({', '.join(archs)}), and this machine has no CUDA "
            "device or driver",
            hint=f"run it on a machine with {needs}; or rebuild it for this machine with "
                 "`llmopt build ... --target cpu`",
            path=artifact_dir,
        )
    gpu_arch = "sm_" + str(dev.compute_version).replace(".", "")
    if not runs_on(archs, gpu_arch):
        raise ArtifactError(
            f"{artifact_dir} has CUDA kernels for {', '.join(archs)}; this GPU ({dev.device_name}) is {gpu_arch} "
            "and runs none of them",
            hint=f"rebuild it with `llmopt build ... --target cuda --arch {','.join([*archs, gpu_arch])}`",
            path=artifact_dir,
        )
    return dev
