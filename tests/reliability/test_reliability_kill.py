"""A build killed at any moment leaves at its output path nothing, or a complete artifact.

The build runs in a subprocess that is sent SIGKILL at several points: while starting up, as soon
as its temporary sibling directory appears, once the library is in it (replacing an existing
artifact), and while the weights are being written; then the output path is checked, and the next build to the same path must succeed
despite the leftovers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmopt.compiler import BuildOptions, build
from llmopt.runtime import load
from llmopt.runtime.manifest import verify

BUILD_SCRIPT = ("import sys; from llmopt.compiler import BuildOptions, build; "
                "build(sys.argv[1], sys.argv[2], BuildOptions(), force=True)")


def _temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def _started(model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(model), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the build ended before the point it was to be killed at"
        assert time.monotonic() < deadline, "the build never reached the point it was to be killed at"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _in_temp_dir(out: Path, name: str):
    return lambda: any((tmp / name).exists() for tmp in _temp_dirs(out))


KILL_POINTS = {
    "starting up": lambda out: (lambda start=time.monotonic(): lambda: time.monotonic() - start > 0.5)(),
    "temp dir created": lambda out: lambda: bool(_temp_dirs(out)),
    "library exported": lambda out: _in_temp_dir(out, "model.so"),
    "writing weights": lambda out: _in_temp_dir(out, "weights"),
}


def _nothing_or_complete(out: Path) -> None:
    if out.exists():
        load(out)


def test_killed_builds_leave_nothing_half_written(tiny_model, tmp_path):
    out = tmp_path / "out"
    for point in ("starting up", "temp dir created", "writing weights"):  # "library exported": below
        ready = KILL_POINTS[point]
        _kill_when(_started(tiny_model, out), ready(out))
        _nothing_or_complete(out)
        if point == "temp dir created":
            assert not out.exists() and _temp_dirs(out), "the kill should have landed mid-write"
    assert _temp_dirs(out)  # leftovers of the killed builds...
    build(tiny_model, out, BuildOptions(), force=True)  # ...do not stop the next build to the same path
    load(out)
    assert not _temp_dirs(out)  # which removed them: their processes are gone


def test_a_previous_artifact_moved_aside_by_a_killed_overwrite_is_put_back(tiny_artifact, tmp_path):
    """A kill between moving the old artifact aside and renaming the new one into place leaves
    ``.out.old-<pid>`` and no ``out``: the next build puts the old one back before it starts, and
    leaves a live process's leftovers alone."""
    from llmopt.codegen.artifact_writer import _clean_up_after_killed_builds
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    shutil.copytree(tiny_artifact, tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}"
    live.mkdir()
    _clean_up_after_killed_builds(out)
    load(out)
    assert verify(out).files == verify(tiny_artifact).files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_killed_rebuild_keeps_the_previous_artifact(tiny_model, tiny_artifact, tmp_path):
    out = shutil.copytree(tiny_artifact, tmp_path / "out")
    before = verify(out).files
    _kill_when(_started(tiny_model, out), KILL_POINTS["library exported"](out))
    assert verify(out).files == before
    load(out)
