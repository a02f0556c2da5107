"""Pruned SmolLM2-135M artifacts stored compactly (``--weight-storage auto``, the fill-bitmask encoding
of ``runtime/weight_encoding.py``) against the same builds stored plain.

For each variant both artifacts are built from the same options (calibration is seeded, so the
weights are the same), then:

- **Size**: weight shard bytes and whole-artifact bytes, and how many weights were encoded (with
  which unit width and fill value);
- **Same model**: prefill logits of a prompt bit for bit, and ``--tokens`` greedy tokens;
- **Load time**: ``llmopt.runtime.load`` (reading, verifying and decoding), median of ``--repeats``.

Results go to ``bench/results/weight_storage_smollm2.json`` and ``.md``.

    python bench/bench_weight_storage.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from results_files import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "weight_storage_smollm2"
VARIANTS = {  # name -> (prune, quant)
    "wanda:0.5": ("wanda:0.5", None),
    "wanda:0.5 + w8": ("wanda:0.5", "w8"),
    "wanda:2:4 + w4g128": ("wanda:2:4", "w4g128"),
}
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def _shard_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in (artifact / "weights").iterdir())


def _artifact_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())


def _load_seconds(artifact: Path, repeats: int) -> float:
    from llmopt.runtime import load
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load(artifact)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, prune: str, quant: str | None, workdir: Path, repeats: int, tokens: int) -> dict:
    from llmopt.compiler import BuildOptions, build
    from llmopt.runtime import load
    from llmopt.runtime.generate import generate
    from llmopt.runtime.manifest import read_manifest
    from llmopt.runtime.weight_encoding import encoded_bytes

    paths = {}
    for storage in ("auto", "plain"):
        paths[storage] = workdir / f"{name.replace(' ', '').replace(':', '-').replace('+', '_')}-{storage}"
        if not (paths[storage] / "manifest.json").exists():
            print(f"building {name} ({storage})...", flush=True)
            build("smollm2", paths[storage], BuildOptions(prune=prune, quant=quant, weight_storage=storage))
    manifest = read_manifest(paths["auto"])
    encoded = [w for w in manifest.weights if w.encoding]
    models = {storage: load(path) for storage, path in paths.items()}
    ids = np.asarray(models["auto"].tokenizer.encode(PROMPT), dtype=np.int32)
    logits = {s: m.forward_logits(ids) for s, m in models.items()}
    greedy = {s: list(generate(m, ids, max_new_tokens=tokens, stop_ids=())) for s, m in models.items()}
    row = {
        "variant": name,
        "prompt_tokens": len(ids),
        "weight_bytes": {s: _shard_bytes(p) for s, p in paths.items()},
        "artifact_bytes": {s: _artifact_bytes(p) for s, p in paths.items()},
        "encoded_weights": len(encoded),
        # the encoded weights alone: their plain bytes and what their masks and values take
        "encoded_plain_bytes": sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in encoded),
        "encoded_stored_bytes": sum(encoded_bytes(w.encoding.units, w.encoding.kept, w.encoding.unit_bits)
                                    for w in encoded),
        "weights": len(manifest.weights),
        "units": dict(Counter(f"{w.encoding.unit_bits}-bit, fill {w.encoding.fill}" for w in encoded)),
        "logits_identical": bool(np.array_equal(logits["auto"], logits["plain"])),
        "greedy_identical": greedy["auto"] == greedy["plain"],
        "load_seconds": {s: round(_load_seconds(p, repeats), 3) for s, p in paths.items()},
    }
    row["weight_ratio"] = round(row["weight_bytes"]["auto"] / row["weight_bytes"]["plain"], 4)
    print(row, flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Pruned SmolLM2-135M stored compactly (`--weight-storage auto` vs `plain`)", "",
             f"{meta['machine']}; load average {meta['load_before']} before, {meta['load_after']} after.", "",
             "| variant | weights MB plain | weights MB auto | auto / plain | encoded weights | units | "
             "encoded ones: MB plain -> stored | same logits | same greedy | load s plain | load s auto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['weight_bytes']['plain'] / 1e6:.1f} | {r['weight_bytes']['auto'] / 1e6:.1f} "
                     f"| {r['weight_ratio']:.3f} | {r['encoded_weights']} of {r['weights']} | "
                     f"{'; '.join(f'{k}: {v}' for k, v in r['units'].items())} | "
                     f"{r['encoded_plain_bytes'] / 1e6:.1f} -> {r['encoded_stored_bytes'] / 1e6:.1f} "
                     f"({r['encoded_stored_bytes'] / r['encoded_plain_bytes']:.1%}) | "
                     f"{'yes (bit for bit)' if r['logits_identical'] else 'NO'} | {'yes' if r['greedy_identical'] else 'NO'} | "
                     f"{r['load_seconds']['plain']:.2f} | {r['load_seconds']['auto']:.2f} |")
    lines += ["", f"- Same logits: prefill logits of a {meta['prompt_tokens']}-token prompt compared with "
              "`np.array_equal`; same greedy: "
              f"{meta['tokens']} greedy tokens. Load time: `llmopt.runtime.load` (read, sha256-verify, decode), "
              f"median of {meta['repeats']}, 1 process on a shared 2-core machine.",
              "- Calibration (wanda) is seeded, so both builds of a variant hold the same weights.",
              "- Weights MB include the tied embedding table (113 MB f32 in every variant: it is not pruned)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="build into (and reuse) this folder")
    args = parser.parse_args()
    import platform
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [measure(name, prune, quant, workdir, args.repeats, args.tokens)
                for name, (prune, quant) in VARIANTS.items()]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
            "load_before": ", ".join(f"{x:.2f}" for x in load_before),
            "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
            "repeats": args.repeats, "tokens": args.tokens, "prompt_tokens": rows[0]["prompt_tokens"]}
    write_results(RESULTS, {"meta": meta, "rows": rows}, markdown(rows, meta))


if __name__ == "__main__":
    main()
