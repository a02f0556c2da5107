"""llmopt.runtime: load a compiled artifact, verify it, and generate text. Never imports torch.

`load` (and `CompiledModel`, `KVCache`) are imported on first use, so that importing the
format modules (`llmopt.runtime.manifest`, used by the compiler's writer) does not import TVM.
"""

from __future__ import annotations

from typing import Any

from .errors import ArtifactError, LLMOptError
from .generate import generate

__all__ = ["ArtifactError", "CompiledModel", "KVCache", "LLMOptError", "generate", "load"]


def __getattr__(name: str) -> Any:
    if name in ("load", "CompiledModel", "KVCache"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
