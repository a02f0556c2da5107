"""Benchmark an llmopt CPU artifact against PyTorch eager (fp32) on SmolLM2-135M.

Measures, per (system, threads) configuration:

- prefill throughput: one forward over a fixed prompt (the first ``--prompt-tokens`` token ids
  of Persuasion), tokens/s;
- decode throughput: ``--decode-tokens`` greedy steps after that prefill, one token each,
  tokens/s = 1 / (median step time within the run);
- peak RSS of the process (``VmHWM`` from /proc/self/status) and model load time.

Each configuration runs in its own child process, so thread pools (``TVM_NUM_THREADS`` set
before TVM is imported, ``torch.set_num_threads``) and peak RSS are per configuration; the llmopt
child never imports torch. ``--rounds`` rounds each run every configuration once, in alternating
order; the table reports the median over rounds, and llmopt/torch ratios (> 1: llmopt faster).
Both systems warm up first on a short prefill and one decode step. Results go to
``bench/results/cpu_smollm2.json`` and ``.md``.

    python bench/bench_cpu.py [--rounds 3] [--threads 1,2] [--artifact DIR] [--results-name NAME]
                              [--prompt-tokens 128] [--decode-tokens 32] [--hf-folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from llmopt.runtime.speed import artifact_steps, peak_rss_mib, print_result, run_child, time_generation

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_NAME = "cpu_smollm2"
PROMPT_TEXT = Path("/work/shared/data/austen/persuasion.txt")
PROMPT_CHARS = 20_000  # enough text for a few thousand tokens
SYSTEMS = ("llmopt", "torch")


# --- child: one (system, threads) configuration ---------------------------------------------


def _torch_steps(hf_folder: str, threads: int):
    """Greedy prefill/decode with transformers in eager fp32 under inference_mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()

    @torch.inference_mode()
    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)  # as generate() does
        return int(out.logits[0, -1].argmax()), out.past_key_values

    @torch.inference_mode()
    def decode(token, cache):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    return prefill, decode


def _child(args: argparse.Namespace) -> None:
    """Measure one configuration; print its result as one prefixed JSON line."""
    threads = int(args.threads)
    start = time.perf_counter()
    if args.child == "llmopt":
        prefill, decode = artifact_steps(args.artifact)
    else:
        prefill, decode = _torch_steps(args.hf_folder, threads)
    load_s = time.perf_counter() - start
    ids = [int(i) for i in args.prompt_ids.split(",")]
    result = time_generation(prefill, decode, ids, args.decode_tokens)
    result.update(
        system=args.child,
        threads=threads,
        load_s=load_s,
        peak_rss_mib=peak_rss_mib(),
        torch_imported="torch" in sys.modules,
        load_average=os.getloadavg(),
    )
    print_result(result)


# --- parent: prepare inputs, run the rounds, report ------------------------------------------


def _hf_folder(given: str | None) -> Path:
    """The model folder both systems read: `given`, else llmopt's cached SmolLM2 folder."""
    if given:
        return Path(given)
    from llmopt.frontend.zoo import smollm2_hf_folder

    return smollm2_hf_folder()


def _prompt_ids(hf_folder: Path, count: int) -> list[int]:
    """The first `count` token ids of the start of Persuasion (no special tokens)."""
    from tokenizers import Tokenizer

    text = PROMPT_TEXT.read_text(encoding="utf-8")[:PROMPT_CHARS]
    ids = Tokenizer.from_file(str(hf_folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if len(ids) < count:
        sys.exit(f"--prompt-tokens {count}: {PROMPT_TEXT} start gives only {len(ids)} tokens")
    return ids[:count]


def _build_artifact(hf_folder: Path, out: Path) -> Path:
    """Compile the model folder into a CPU artifact at `out`."""
    from llmopt.compiler import BuildOptions, build
    from llmopt.frontend.hf_folder import load_hf_folder

    start = time.perf_counter()
    build(load_hf_folder(hf_folder), out, BuildOptions(target="cpu"), force=True)
    print(f"built the llmopt artifact in {time.perf_counter() - start:.1f} s: {out}", flush=True)
    return out


def _run_child(system: str, threads: int, args, hf_folder: Path, artifact: Path, ids: list[int]) -> dict:
    """Run one configuration in a fresh process and return its parsed result."""
    child_args = [str(Path(__file__).resolve()), "--child", system, "--threads", str(threads),
                  "--artifact", str(artifact), "--hf-folder", str(hf_folder),
                  "--decode-tokens", str(args.decode_tokens), "--prompt-ids", ",".join(map(str, ids))]
    try:
        return run_child(child_args, threads)
    except ChildProcessError as err:
        sys.exit(f"{system} with {threads} thread(s): {err}")


def _run_rounds(args, hf_folder: Path, artifact: Path, ids: list[int]) -> list[dict]:
    """Every configuration once per round; odd rounds run them in reverse order."""
    configs = [(system, threads) for threads in args.threads for system in SYSTEMS]
    runs = []
    for r in range(args.rounds):
        for system, threads in configs if r % 2 == 0 else reversed(configs):
            result = _run_child(system, threads, args, hf_folder, artifact, ids)
            decode = f"{result['decode_tok_s']:.2f}" if result["decode_tok_s"] else "-"
            print(f"round {r + 1}/{args.rounds} {system:>6} x{threads}: prefill {result['prefill_tok_s']:.2f} tok/s, "
                  f"decode {decode} tok/s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
            runs.append({"round": r, **result})
    return runs


def _median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run[key] is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _summarize(runs: list[dict], threads: list[int]) -> list[dict]:
    """Per thread count: medians over rounds for each system, and llmopt/torch ratios."""
    rows = []
    for n in threads:
        by_system = {s: [run for run in runs if run["system"] == s and run["threads"] == n] for s in SYSTEMS}
        row = {"threads": n}
        for s, group in by_system.items():
            for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib", "load_s"):
                row[f"{s}_{key}"] = _median(group, key)
        row["prefill_ratio"] = _ratio(row["llmopt_prefill_tok_s"], row["torch_prefill_tok_s"])
        row["decode_ratio"] = _ratio(row["llmopt_decode_tok_s"], row["torch_decode_tok_s"])
        greedy = {s: by_system[s][0]["tokens"] for s in SYSTEMS}
        row["same_greedy_tokens"] = sum(a == b for a, b in zip(*greedy.values()))
        row["greedy_tokens"] = len(greedy["llmopt"])
        row["llmopt_imported_torch"] = any(run["torch_imported"] for run in by_system["llmopt"])
        rows.append(row)
    return rows


METRICS = [  # (label, summary key without the system prefix, format, ratio key)
    ("prefill tok/s", "prefill_tok_s", "{:.2f}", "prefill_ratio"),
    ("decode tok/s", "decode_tok_s", "{:.2f}", "decode_ratio"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}", None),
    ("load s", "load_s", "{:.1f}", None),
]
HEADERS = ("threads", "metric", "llmopt", "torch", "llmopt/torch")


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _table_rows(summary: list[dict]) -> list[list[str]]:
    """One table row per (thread count, metric): llmopt, torch and their ratio."""
    return [[str(row["threads"]), label, _fmt(row[f"llmopt_{key}"], fmt), _fmt(row[f"torch_{key}"], fmt),
             _fmt(row[ratio], "{:.3f}") if ratio else ""]
            for row in summary for label, key, fmt, ratio in METRICS]


def _notes(report: dict) -> list[str]:
    s = report["settings"]
    weights = f"llmopt {s['llmopt_quant']}, torch fp32" if s.get("llmopt_quant") else "fp32"
    notes = [f"SmolLM2-135M {weights}, {s['prompt_tokens']}-token prompt, {s['decode_tokens']} greedy decode steps, "
             f"median of {s['rounds']} round(s); decode tok/s = 1 / median step time in a run; "
             "llmopt/torch > 1: llmopt faster."]
    notes += [f"{row['threads']} thread(s): llmopt and torch agree on {row['same_greedy_tokens']}/"
              f"{row['greedy_tokens']} greedy tokens (first round); the llmopt child "
              f"{'IMPORTED' if row['llmopt_imported_torch'] else 'did not import'} torch."
              for row in report["summary"]]
    return notes


def _machine() -> dict:
    """CPU, core counts, library versions and the date, for the results file."""
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("llmopt", "apache-tvm", "torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "logical_cores": psutil.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "load_average_at_start": os.getloadavg(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; load average at "
             f"start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}; {m['date']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _table_rows(report["summary"])]
    lines += [""] + [f"- {note}" for note in _notes(report)]
    return "\n".join(lines) + "\n"


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    quant = report["settings"].get("llmopt_quant")
    weights = f"llmopt {quant}, torch fp32" if quant else "fp32"
    table = Table(title=f"SmolLM2-135M ({weights}) on CPU: llmopt vs PyTorch eager")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "metric" else "right")
    for cells in _table_rows(report["summary"]):
        table.add_row(*cells, end_section=cells[1] == METRICS[-1][0])
    console = Console()
    console.print(table)
    for note in _notes(report):
        console.print(note)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--artifact", help="an llmopt CPU artifact of the model (default: build one)")
    parser.add_argument("--hf-folder", help="the model's Hugging Face folder (default: the cached SmolLM2-135M)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    parser.add_argument("--results-name", default=RESULTS_NAME,
                        help=f"results file name under bench/results (default {RESULTS_NAME}; use another one for a "
                             "quantized --artifact, e.g. cpu_smollm2_w4g128)")
    args = parser.parse_args(argv)
    if not args.child:
        args.threads = [int(n) for n in args.threads.split(",")]
        if args.rounds < 1 or args.prompt_tokens < 1 or args.decode_tokens < 0 or min(args.threads) < 1:
            parser.error("--rounds, --prompt-tokens and --threads must be >= 1, --decode-tokens >= 0")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.child:
        _child(args)
        return
    machine = _machine()
    hf_folder = _hf_folder(args.hf_folder)
    ids = _prompt_ids(hf_folder, args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        artifact = Path(args.artifact) if args.artifact else _build_artifact(hf_folder, Path(tmp) / "artifact")
        runs = _run_rounds(args, hf_folder, artifact, ids)
        options = json.loads((artifact / "manifest.json").read_text())["created_by"]["options"]
        quant = " ".join(filter(None, [options.get("quant"), options.get("quant_rules")])) or None
    report = {
        "machine": machine,
        "settings": {"model": str(hf_folder), "artifact": args.artifact or "built by the script", "llmopt_quant": quant,
                     "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                     "rounds": args.rounds, "threads": args.threads, "prompt_ids": ids,
                     "decode_tok_s": "1 / median decode step time within a run; tables: median over rounds"},
        "summary": _summarize(runs, args.threads),
        "runs": runs,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.results_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{args.results_name}.md").write_text(_markdown(report))
    _print_table(report)
    print(f"wrote {RESULTS_DIR / args.results_name}.json and .md")


if __name__ == "__main__":
    main()
