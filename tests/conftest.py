"""Shared test set-up: helper modules next to tests are importable by their file names."""

import sys
from pathlib import Path

for folder in Path(__file__).parent.iterdir():
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import pytest  # noqa: E402
import torch  # noqa: E402,F401  (torch before tvm, so tvm_ffi sets up its torch hooks)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint (HF folder with tokenizer), shared read-only by the suite:
    copy it before changing anything in it."""
    from tiny_models import save_tiny
    folder = tmp_path_factory.mktemp("tiny_llama") / "hf"
    save_tiny("llama", folder)
    return folder
