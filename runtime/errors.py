"""Errors llmopt raises on purpose: each says what is wrong and what to do about it.

`LLMOptError` is the project-wide base (it lives here because the runtime must not import the
compiler, while the compiler may import this small module). The CLI prints `str(err)`, which
is the message followed by the hint.
"""

from __future__ import annotations

from pathlib import Path


class LLMOptError(Exception):
    """Base of every error llmopt raises deliberately.

    `message` says what is wrong; `hint` says what the user can do about it (may be empty).
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ArtifactError(LLMOptError):
    """A compiled artifact is missing, damaged, of another format, or not runnable here.

    `path` is the offending file or directory when there is one.
    """

    def __init__(self, message: str, *, hint: str = "", path: str | Path | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = Path(path) if path is not None else None
