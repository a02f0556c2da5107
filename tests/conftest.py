"""Shared test set-up: helper modules next to tests are importable by their file names."""

import sys
from pathlib import Path

for folder in Path(__file__).parent.iterdir():
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402,F401  (torch before tvm, so tvm_ffi sets up its torch hooks)
