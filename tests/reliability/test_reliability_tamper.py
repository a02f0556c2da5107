"""A built artifact with one byte changed is refused by the runtime, naming the changed file."""

from __future__ import annotations

import re
import shutil

import pytest

from llmopt.errors import LLMOptError
from llmopt.runtime import load
from llmopt.runtime.errors import ArtifactError
from llmopt.runtime.manifest import FORMAT_VERSION, read_manifest


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact, tmp_path / "artifact")


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["library", "weights", "tokenizer"])
def test_one_changed_byte_is_refused_naming_the_file(artifact_copy, which):
    manifest = read_manifest(artifact_copy)
    rel = {"library": manifest.library, "weights": manifest.weights[0].file,
           "tokenizer": manifest.tokenizer.file}[which]
    _flip_middle_byte(artifact_copy / rel)
    with pytest.raises(ArtifactError, match=re.escape(rel) + ".*damaged or was modified") as err:
        load(artifact_copy)
    assert err.value.path == artifact_copy / rel
    assert err.value.hint


def test_changed_format_version_is_refused_naming_the_manifest(artifact_copy):
    path = artifact_copy / "manifest.json"
    text = path.read_text()
    changed = text.replace(f'"format_version": {FORMAT_VERSION},', f'"format_version": {FORMAT_VERSION + 1},')
    assert changed != text
    path.write_text(changed)
    with pytest.raises(ArtifactError, match=r"manifest\.json.*format version") as err:
        load(artifact_copy)
    assert isinstance(err.value, LLMOptError) and "rebuild" in err.value.hint


def test_untouched_copy_loads(artifact_copy):
    """The control: copying alone changes nothing the runtime checks."""
    load(artifact_copy)
