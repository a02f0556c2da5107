"""Two builds of the same model with the same options give the same artifact, byte for byte.

Neither the output path nor the temporary directory the library is linked in leaks into it, and
TVM's shape functions are put in a fixed order (codegen/shape_func_order.py); the manifest records
the hash of every input file by name and every build option.
"""

from __future__ import annotations

import json

from llmopt.compiler import BuildOptions, build
from llmopt.runtime.manifest import sha256_file


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rebuild_is_byte_identical(tiny_model, tiny_artifact, tmp_path):
    again = tmp_path / "elsewhere" / "again"
    build(tiny_model, again, BuildOptions())
    first, second = _files(tiny_artifact), _files(again)
    assert first.keys() == second.keys() >= {"manifest.json", "model.so", "model.ir", "tokenizer.json"}
    assert [name for name in first if first[name] != second[name]] == []


def test_manifest_records_inputs_and_options_but_no_paths(tiny_model, tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    model_files = sorted(p for p in tiny_model.iterdir() if p.is_file())
    assert manifest["inputs"] == {p.name: sha256_file(p) for p in model_files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= manifest["inputs"].keys()
    assert manifest["created_by"]["options"] == json.loads(json.dumps(BuildOptions().to_json()))
    text = json.dumps(manifest)
    assert str(tiny_model.parent) not in text  # neither where the model nor where the build lived
