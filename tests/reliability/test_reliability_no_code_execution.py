"""Nothing in a model folder is executed: pickled checkpoints are refused, custom modeling code
(``auto_map``) is never imported, and llmopt's own sources hold no unpickling, no
``trust_remote_code`` and no archive extraction (there is none to guard)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder

PACKAGE = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(folder: Path, marker: Path) -> None:
    """A pickled checkpoint and custom modeling code that would each create ``marker`` if run."""
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


def test_a_pickle_only_checkpoint_is_refused_unopened(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    for file in folder.glob("*.safetensors"):
        file.unlink()
    marker = tmp_path / "pwned"
    _plant(folder, marker)
    with pytest.raises(LLMOptError, match="pickled .bin checkpoints are refused"):
        load_hf_folder(folder)
    assert not marker.exists()


def test_custom_code_and_pickles_beside_safetensors_are_ignored(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    marker = tmp_path / "pwned"
    _plant(folder, marker)
    module = load_hf_folder(folder)
    assert "prefill" in module.functions
    assert not marker.exists()


FORBIDDEN = {
    "unpickling": re.compile(r"\bpickle\.loads?\(|\bcloudpickle\b|\bjoblib\.load\("),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "trust_remote_code": re.compile(r"trust_remote_code\s*=\s*True"),
    "archive extraction": re.compile(r"\.extractall\(|\.extract\(|shutil\.unpack_archive"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


def test_the_package_sources_never_unpickle_trust_remote_code_or_extract_archives():
    sources = [p for p in PACKAGE.rglob("*.py") if "tests" not in p.relative_to(PACKAGE).parts
               and not any(part.startswith(".") for part in p.relative_to(PACKAGE).parts)]
    assert len(sources) > 50
    found = [f"{path.relative_to(PACKAGE)}:{number}: {what}: {line.strip()}"
             for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for what, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert not found, "\n".join(found)
