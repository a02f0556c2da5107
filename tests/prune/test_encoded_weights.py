"""Pruned weights stored compactly in the artifact (``--weight-storage auto``, the default): unstructured
and quantized sparse weights shrink on disk, and the loaded model computes bit for bit what the
plainly stored one does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llmopt.compiler import BuildOptions, build
from llmopt.errors import LLMOptError
from llmopt.runtime import load as load_artifact
from llmopt.runtime.errors import ArtifactError
from llmopt.runtime.generate import generate
from llmopt.runtime.weight_encoding import MIN_BYTES

IDS = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)
VARIANTS = {  # name -> (prune, quant, unit bits and fill of the encoded pruned weights)
    "unstructured-f32": ("magnitude:0.5", None, (32, 0)),
    "2of4-w4g32": ("magnitude:2:4", "w4g32", (4, 8)),  # symmetric int4: level 0 is code 8
}


def _shard_data_bytes(artifact: Path) -> int:
    total = 0
    for path in (artifact / "weights").glob("*.safetensors"):
        with open(path, "rb") as f:
            total += path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
    return total


@pytest.fixture(scope="module", params=list(VARIANTS))
def encoded_and_plain(request, tiny_llama, tmp_path_factory):
    prune, quant, _ = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"encoded-{request.param}")
    for storage in ("auto", "plain"):  # compact-sparse off: the N:M CPU kernels have their own format
        build(tiny_llama, root / storage, BuildOptions(prune=prune, quant=quant, weight_storage=storage,
                                                       disabled_passes=("compact-sparse",)))
    return request.param, root / "auto", root / "plain"


def test_pruned_weights_are_stored_encoded_and_smaller(encoded_and_plain):
    variant, encoded, plain = encoded_and_plain
    manifests = [json.loads((a / "manifest.json").read_text()) for a in (encoded, plain)]
    assert [w["name"] for w in manifests[0]["weights"]] == [w["name"] for w in manifests[1]["weights"]]
    assert all(w["encoding"] is None for w in manifests[1]["weights"])
    encodings = {w["name"]: w["encoding"] for w in manifests[0]["weights"] if w["encoding"]}
    pruned = [w for w in manifests[1]["weights"] if ".pruned-" in w["name"] and "scales" not in w["name"]
              and np.prod(w["shape"]) * np.dtype(w["dtype"]).itemsize >= MIN_BYTES]
    assert pruned and {w["name"] for w in pruned} <= set(encodings)
    assert {(encodings[w["name"]]["unit_bits"], encodings[w["name"]]["fill"]) for w in pruned} == \
        {VARIANTS[variant][2]}
    # the bytes saved are what the encoding promises: each pruned weight's plain bytes less its
    # mask (a bit per unit) and kept units
    saved = _shard_data_bytes(plain) - _shard_data_bytes(encoded)
    promised = sum(np.prod(w["shape"]) * np.dtype(w["dtype"]).itemsize
                   - (e["units"] + 7) // 8 - (e["kept"] * e["unit_bits"] + 7) // 8
                   for w in manifests[0]["weights"] if (e := w["encoding"]))
    assert saved == promised
    pruned_bytes = sum(np.prod(w["shape"]) * np.dtype(w["dtype"]).itemsize for w in pruned)
    assert saved > (0.44 if variant == "unstructured-f32" else 0.2) * pruned_bytes


def test_encoded_artifact_computes_what_the_plain_one_does(encoded_and_plain):
    _, encoded, plain = encoded_and_plain
    models = [load_artifact(a) for a in (encoded, plain)]
    np.testing.assert_array_equal(models[0].forward_logits(IDS), models[1].forward_logits(IDS))
    tokens = [list(generate(model, IDS, max_new_tokens=8, stop_ids=())) for model in models]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8


def test_a_damaged_encoding_names_the_tensor(encoded_and_plain, tmp_path):
    import shutil
    _, encoded, _ = encoded_and_plain
    copy = tmp_path / "copy"
    shutil.copytree(encoded, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    weight = next(w for w in manifest["weights"] if w["encoding"])
    weight["encoding"]["kept"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"encoded tensor {re.escape(weight['name'])}: .*the encoding says"):
        load_artifact(copy)


def test_unknown_weight_storage_is_refused_before_any_work(tiny_llama, tmp_path):
    with pytest.raises(LLMOptError, match="weight storage 'zip' is unknown"):
        build(tiny_llama, tmp_path / "out", BuildOptions(weight_storage="zip"))
