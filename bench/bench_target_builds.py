"""Build time and artifact size of SmolLM2-135M for every target, in fp32, fp16 and int4 (w4g32).

Each build runs in its own child process (``llmopt build``, so imports and TVM's caches count as
a user sees them) on this machine; recorded: the wall time, the build's own stage times (trace,
optimize, compile, write, from its log), the artifact's bytes and its
library's bytes. Targets: cpu (this machine), cpu for aarch64 Linux (``--arch cortex-a76``), cuda
(sm_80,sm_90), rocm (gfx90a,gfx942), metal and webgpu. The load average before and after is
recorded: on a shared machine build times are upper bounds.

Results go to ``bench/results/target_builds_smollm2.json`` and ``.md``.

    python bench/bench_target_builds.py [--targets cpu,cuda] [--variants fp32,fp16,w4g32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "target_builds_smollm2"
TARGETS = {"cpu": [], "cpu-aarch64": ["--target", "cpu", "--arch", "cortex-a76"],
           "cuda": ["--target", "cuda", "--arch", "sm_80,sm_90"], "rocm": ["--target", "rocm", "--arch", "gfx90a,gfx942"],
           "metal": ["--target", "metal"], "webgpu": ["--target", "webgpu"]}
STAGE = re.compile(r"\b(trace|optimize|compile|write): ([0-9.]+) s\b")  # the CLI's log lines
VARIANTS = {"fp32": [], "fp16": ["--dtype", "fp16"], "w4g32": ["--quant", "w4g32"]}


def build_one(target: str, variant: str, out: Path) -> dict:
    command = [sys.executable, "-m", "llmopt.cli", "build", "smollm2", "-o", str(out), "--force",
               *TARGETS[target], *VARIANTS[variant]]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"target": target, "variant": variant, "error": (done.stderr or done.stdout)[-800:]}
    manifest = json.loads((out / "manifest.json").read_text())
    return {"target": target, "variant": variant, "wall_s": round(seconds, 1),
            "stages_s": {name: float(sec) for name, sec in STAGE.findall(done.stdout + done.stderr)},
            "artifact_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "library_bytes": (out / manifest["library"]).stat().st_size}


def markdown(data: dict) -> str:
    lines = ["# SmolLM2-135M: build time and artifact size per target", "",
             f"Built on this machine ({os.cpu_count()} cores, load average {data['load_before']} before, "
             f"{data['load_after']} after; shared, so times are upper bounds), one `llmopt build` process each.", "",
             "| target | variant | build s | of it compile s | artifact MB | library MB |", "|---|---|---:|---:|---:|---:|"]
    for row in data["rows"]:
        if "error" in row:
            lines.append(f"| {row['target']} | {row['variant']} | failed | | | |")
            continue
        compile_s = row["stages_s"].get("compile")
        lines.append(f"| {row['target']} | {row['variant']} | {row['wall_s']:.0f} | "
                     f"{'' if compile_s is None else f'{compile_s:.0f}'} | {row['artifact_bytes'] / 1e6:.1f} "
                     f"| {row['library_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifacts under this folder")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        for target in args.targets.split(","):
            for variant in args.variants.split(","):
                row = build_one(target, variant, root / f"{target}-{variant}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    data = {"rows": rows, "load_before": load_before, "load_after": round(os.getloadavg()[0], 1)}
    write_results(RESULTS, data, markdown(data))


if __name__ == "__main__":
    main()
