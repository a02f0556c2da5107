"""Errors llmopt raises on purpose: each says what is wrong and what to do about it.

`LLMOptError` is the project-wide base, in ``llmopt/errors.py`` (a module with no imports, so
the runtime can use it without the compiler).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMOptError


class ArtifactError(LLMOptError):
    """A compiled artifact is missing, damaged, of another format, or not runnable here.

    `path` is the offending file or directory when there is one.
    """

    def __init__(self, message: str, *, hint: str = "", path: str | Path | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = Path(path) if path is not None else None
