"""The artifact writer and verification: layout, hashes, tampering, atomicity."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil

import numpy as np
import pytest
from runtime_toy import read_manifest_json, toy_reference_logits, toy_weights

from llmopt.runtime import ArtifactError, LLMOptError, load
from llmopt.runtime.manifest import FORMAT_VERSION, Manifest, sha256_file, verify


@pytest.fixture
def artifact_copy(toy_artifact, tmp_path):
    """A private copy of the toy artifact that a test may damage."""
    return shutil.copytree(toy_artifact, tmp_path / "copy")


def test_layout_and_manifest(toy_artifact):
    manifest = verify(toy_artifact)
    assert manifest.format_version == FORMAT_VERSION
    assert [w.name for w in manifest.weights] == list(toy_weights())
    shards = sorted({w.file for w in manifest.weights})
    assert len(shards) > 1
    pattern = rf"weights/weights-\d{{5}}-of-{len(shards):05d}\.safetensors"
    assert all(re.fullmatch(pattern, s) for s in shards)
    listed = set(manifest.files)
    on_disk = {
        p.relative_to(toy_artifact).as_posix() for p in toy_artifact.rglob("*") if p.is_file()
    }
    assert on_disk == listed | {"manifest.json"}
    assert {"model.so", "tokenizer.json", "model.ir"} <= listed
    assert manifest.files["model.ir"] == sha256_file(toy_artifact / "model.ir")
    # nothing left beside it
    assert [p.name for p in toy_artifact.parent.iterdir()] == ["toy"]


def test_manifest_json_round_trip(toy_artifact):
    manifest = verify(toy_artifact)
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_load_runs_prefill_and_decode(toy_model):
    ids = np.array([1, 5, 9, 3])
    logits, cache = toy_model.prefill(ids)
    np.testing.assert_allclose(logits, toy_reference_logits(ids)[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(toy_model.forward_logits(ids), toy_reference_logits(ids), rtol=1e-5, atol=1e-5)
    step, _ = toy_model.decode(7, cache)
    expected = toy_reference_logits([1, 5, 9, 3, 7])[-1]
    np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-5)
    step, _ = toy_model.decode(np.int64(7), cache)  # numpy ints are token ids too
    np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token ids must lie in"):
        toy_model.decode(10**6, cache)


def test_library_decode_writes_the_cache_in_place(toy_model):
    """The runtime keeps its own cache buffers after a step: the library must return those same
    buffers, with row ``pos`` written (the contract in runtime/model.py)."""
    _, cache = toy_model.prefill(np.array([1, 5, 9, 3]))
    before = [t.numpy().copy() for t in cache.tensors]
    ids = toy_model._tensor(np.array([[7]], np.int32))
    pos = toy_model._tensor(np.array([cache.length], np.int32))
    out = toy_model._decode(ids, pos, *cache.tensors, *toy_model._weights)
    returned = [out[i] for i in range(1, len(out))]
    assert [np.from_dlpack(r).ctypes.data for r in returned] == [np.from_dlpack(t).ctypes.data for t in cache.tensors]
    for old, new in zip(before, (t.numpy() for t in cache.tensors)):
        np.testing.assert_array_equal(np.delete(new, cache.length, axis=1), np.delete(old, cache.length, axis=1))
        assert not np.array_equal(new[:, cache.length], old[:, cache.length])


def test_tampered_weight_is_refused(artifact_copy):
    shard = artifact_copy / verify(artifact_copy).weights[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=re.escape(shard.name)) as err:
        load(artifact_copy)
    assert err.value.path == shard
    assert err.value.hint and isinstance(err.value, LLMOptError)


def test_wrong_format_version_is_refused(artifact_copy):
    data = read_manifest_json(artifact_copy)
    data["format_version"] = FORMAT_VERSION + 1
    (artifact_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version"):
        verify(artifact_copy)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json.*missing"):
        verify(artifact_copy)


def test_missing_manifest_is_refused(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(artifact_copy)


def test_unhashed_referenced_file_is_refused(artifact_copy):
    data = read_manifest_json(artifact_copy)
    del data["files"]["model.so"]
    (artifact_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="model.so"):
        verify(artifact_copy)


def test_unlisted_extra_file_is_ignored(artifact_copy):
    (artifact_copy / "model.tar").write_bytes(b"another target's library")
    verify(artifact_copy)


def test_other_device_is_refused(artifact_copy):
    with pytest.raises(ArtifactError, match="CPU only"):
        load(artifact_copy, device="cuda")
    data = read_manifest_json(artifact_copy)
    data["target"] = {"name": "cuda", "tvm": {"kind": "cuda"}, "device": "cuda"}
    (artifact_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="built for target 'cuda'"):
        load(artifact_copy)


def test_other_architecture_is_refused(artifact_copy):
    other = "aarch64" if platform.machine() in ("x86_64", "AMD64") else "x86_64"
    data = read_manifest_json(artifact_copy)
    data["target"]["tvm"]["mtriple"] = f"{other}-unknown-linux-gnu"
    (artifact_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=f"architecture {other}"):
        load(artifact_copy)


def test_existing_output_is_refused_and_untouched(write_toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=re.escape(str(out))) as err:
        write_toy(out)
    assert "--force" in err.value.hint
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_existing_output(write_toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_toy(out, overwrite=True)
    assert not (out / "stale.txt").exists()
    verify(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_mid_write_leaves_nothing(write_toy, tmp_path):
    def weights():
        yield from list(toy_weights().items())[:3]
        raise RuntimeError("quantizer crashed")

    with pytest.raises(RuntimeError, match="quantizer crashed"):
        write_toy(tmp_path / "out", weights=weights())
    assert os.listdir(tmp_path) == []
