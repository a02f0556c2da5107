"""How the SmolLM2 quality tests measure an artifact: perplexity on Persuasion (the first ``tokens``
tokens, non-overlapping windows of ``context``), every window scored but its first token."""

from __future__ import annotations

import time
from pathlib import Path

from llmopt.cli import DEFAULT_TEXT as PERSUASION
from llmopt.compiler import BuildOptions, build
from llmopt.runtime import load
from llmopt.runtime.perplexity import perplexity


def artifact_perplexity(folder: Path, context: int, tokens: int, label: str | None = None) -> float:
    """Perplexity of the artifact in ``folder``; prints it under ``label`` (default: the folder's name)."""
    start = time.perf_counter()
    model = load(folder)
    ids = model.tokenizer.encode(PERSUASION.read_text(encoding="utf-8"))
    result = perplexity(model.forward_logits, ids, context, tokens)
    assert (result.context, result.scored) == (context, tokens // context * (context - 1))
    print(f"{label or folder.name}: {result.describe()} (eval {time.perf_counter() - start:.0f} s)")
    return result.perplexity


def built(folder: Path, model, options: BuildOptions, label: str | None = None) -> Path:
    """``folder``, after building ``model`` into it with ``options`` (the build time printed)."""
    start = time.perf_counter()
    build(model, folder, options)
    print(f"{label or folder.name}: built in {time.perf_counter() - start:.0f} s")
    return folder
