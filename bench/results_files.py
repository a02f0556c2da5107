"""How every benchmark writes its results: ``<name>.json`` (the data) and ``<name>.md`` (the table)
side by side under ``bench/results/``."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, data, markdown: str, indent: int = 2) -> None:
    """Write ``path.json`` and ``path.md`` (creating the folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(data, indent=indent) + "\n")
    path.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {path}.json and .md", flush=True)
