"""A thin wrapper over a Hugging Face `tokenizers` file, plus streaming detokenization."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

_INCOMPLETE = "\ufffd"  # what decoding yields for a UTF-8 character cut between tokens


class Tokenizer:
    """Encode prompts and decode ids with the artifact's `tokenizer.json`.

    BOS handling is ours, not the file's post-processor: `encode` never adds the file's special
    tokens and prepends `bos_token_id` when asked to (default: `add_bos`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._tok = _HFTokenizer.from_file(str(path))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS prepended if `add_bos` (None: the artifact's default)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh incremental decoder for streaming generated text."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turn a stream of token ids into a stream of new text.

    `push(id)` returns only the characters that id completes. Text is decoded over a short
    window of recent tokens (so tokenizers that drop a leading space at the start of a decode
    still get spaces right), and held back while it ends in an incomplete UTF-8 character,
    which some byte-level tokens leave until the next token arrives.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context for decoding, already emitted
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token id; return the new text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix : self._read], self._skip)
        text = decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(emitted) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes as U+FFFD)."""
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix : self._read], self._skip)
        text = decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]
