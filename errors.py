"""The error every user-facing failure raises: what is wrong, with which input, and what to do.

The CLI prints ``LLMOptError`` as one paragraph and exits with ``USER_ERROR_EXIT``; anything
else is a bug in llmopt and exits with ``INTERNAL_ERROR_EXIT`` and a traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 70


class LLMOptError(Exception):
    """A problem with the user's input or environment, explained.

    ``what`` says what is wrong (naming the input), ``hint`` what to do about it.
    """

    def __init__(self, what: str, hint: str = ""):
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.what}\n{self.hint}" if self.hint else self.what


class ModelInputError(LLMOptError):
    """The model given to a frontend cannot be read or is not supported."""
