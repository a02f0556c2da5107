"""One tiny Llama checkpoint and its compiled artifact, shared by the reliability tests."""

from __future__ import annotations

import pytest

from llmopt.compiler import BuildOptions, build

from tiny_models import save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability") / "hf"
    save_tiny("llama", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model):
    out = tiny_model.parent / "artifact"
    build(tiny_model, out, BuildOptions())
    return out
