"""The errors llmopt raises on purpose: each says what is wrong (naming the input) and what to do.

The CLI prints an ``LLMOptError`` as one paragraph (message, then hint) and exits with
``USER_ERROR_EXIT``; any other exception is a bug in llmopt and exits with ``INTERNAL_ERROR_EXIT``.
This module imports nothing, so the runtime can use it without the compiler.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 70


class LLMOptError(Exception):
    """A problem with the user's input or environment, explained.

    ``message`` says what is wrong, with which input; ``hint`` says what to do about it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ModelInputError(LLMOptError):
    """The model given to a frontend cannot be read or is not supported."""
