"""One tiny Llama checkpoint and its compiled artifact, shared by the reliability tests."""

from __future__ import annotations

import pytest

from llmopt.compiler import BuildOptions, build


@pytest.fixture(scope="session")
def tiny_model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model):
    out = tiny_model.parent / "reliability_artifact"
    build(tiny_model, out, BuildOptions())
    return out
