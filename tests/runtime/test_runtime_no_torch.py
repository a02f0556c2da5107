"""The runtime loads an artifact and generates without ever importing torch."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import llmopt.runtime.model as m
from llmopt.runtime import generate
model = m.load(sys.argv[1])
ids = list(generate(model, [1, 4, 11], max_new_tokens=4, stop_ids=()))
assert len(ids) == 4, ids
leaked = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not leaked, leaked
print("ok")
"""


def test_runtime_does_not_import_torch(toy_artifact, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(toy_artifact)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
