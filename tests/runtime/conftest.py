"""Fixtures for the runtime tests: the toy model (see runtime_toy.py) compiled and written once."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_toy import build_toy_executable, toy_manifest_fields, toy_weights, write_toy_tokenizer


@pytest.fixture(scope="session")
def toy_executable():
    return build_toy_executable()


@pytest.fixture(scope="session")
def toy_tokenizer_path(tmp_path_factory) -> Path:
    return write_toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def write_toy(toy_executable, toy_tokenizer_path):
    """Return a function writing the toy artifact to a path (small shards: several files)."""
    from llmopt.codegen.artifact_writer import write_artifact

    def write(out_dir, *, weights=None, overwrite=False):
        return write_artifact(
            out_dir,
            executable=toy_executable,
            weights=iter(toy_weights().items()) if weights is None else weights,
            tokenizer_json_path=toy_tokenizer_path,
            ir_text="func prefill(...)  # toy\n",
            manifest_fields=toy_manifest_fields(),
            overwrite=overwrite,
            max_shard_bytes=200,
        )

    return write


@pytest.fixture(scope="session")
def toy_artifact(tmp_path_factory, write_toy) -> Path:
    """A toy artifact that tests must not modify (copy it first)."""
    out = tmp_path_factory.mktemp("artifact") / "toy"
    write_toy(out)
    return out


@pytest.fixture(scope="session")
def toy_model(toy_artifact):
    from llmopt.runtime import load

    return load(toy_artifact)

