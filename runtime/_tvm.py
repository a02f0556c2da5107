"""Import TVM for the runtime without importing torch.

`import tvm` imports `tvm_ffi`, whose `__init__` tries `import torch` (and keeps optional torch
hooks if it succeeds). Importing torch costs seconds and hundreds of MB, and the runtime must not
depend on it, so `import_tvm` hides torch from that first import: a temporary `sys.meta_path`
finder makes `import torch` fail, and is removed right after. If torch (or tvm) is already
imported, nothing is hidden.

Consequence: in a process that imports the runtime before torch, tvm_ffi runs without its torch
hooks (torch tensors are then passed to TVM through DLPack/numpy, not directly). The compiler,
which needs them, imports torch first.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType


class _HideTorch(importlib.abc.MetaPathFinder):
    """A meta-path finder that makes `torch` and `torch.*` unimportable."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102 (finder protocol)
        if fullname == "torch" or fullname.startswith("torch."):
            raise ImportError(f"llmopt.runtime hides {fullname} while importing tvm")
        return None


def import_tvm() -> ModuleType:
    """Return the `tvm` module (with `tvm.runtime.vm` loaded), importing it without torch."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm.runtime.vm

        return tvm
    finder = _HideTorch()
    sys.meta_path.insert(0, finder)
    try:
        import tvm.runtime.vm
    finally:
        sys.meta_path.remove(finder)
    return tvm
