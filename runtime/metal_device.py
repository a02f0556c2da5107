"""The Metal device a Metal artifact runs on, or an ArtifactError saying why this machine cannot run it.

A Metal artifact's library (``model.dylib``) is an arm64 macOS library carrying Metal Shading
Language kernels, which the Metal runtime of TVM's macOS wheel compiles when it is loaded: it runs
on a Mac with Apple silicon only, so elsewhere it is refused before the library is opened.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from .errors import ArtifactError

DEFAULT_NEEDS = "a Mac with Apple silicon and the TVM runtime for macOS (pip install apache-tvm)"


def metal_device(tvm: Any, target: dict[str, Any], artifact_dir: Path) -> Any:
    """``tvm.metal(0)`` on an Apple silicon Mac with a Metal device; ArtifactError otherwise."""
    needs = target.get("device_needs") or DEFAULT_NEEDS
    here = f"{platform.system() or sys.platform} {platform.machine()}"
    if sys.platform != "darwin" or platform.machine() != "arm64":
        raise ArtifactError(
            f"{artifact_dir} was built for target 'metal' (Apple silicon GPUs): its library is an arm64 macOS "
            f"dylib, and this machine is {here}",
            hint=f"copy the artifact folder to a Mac with Apple silicon and load it there (the device needs {needs}); "
                 "or rebuild it for this machine with `llmopt build ... --target cpu`",
            path=artifact_dir,
        )
    dev = tvm.metal(0)
    try:
        exists = bool(dev.exist)
    except Exception:  # noqa: BLE001 - a TVM runtime without Metal counts as none
        exists = False
    if not exists:
        raise ArtifactError(
            f"{artifact_dir} was built for target 'metal', and this Mac has no Metal device this TVM runtime can use",
            hint=f"install the TVM runtime for macOS (it ships Metal): the device needs {needs}",
            path=artifact_dir,
        )
    return dev
