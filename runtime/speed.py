"""Prefill and decode speed and peak memory of an artifact, measured in a fresh child process.

One child per measurement keeps thread pools and peak memory per configuration: the parent puts
``TVM_NUM_THREADS`` (and ``OMP_NUM_THREADS``) into the child's environment, so TVM reads them at
import, and the child reports its own peak RSS (``VmHWM``). A child prints its result as one JSON
line after ``RESULT_PREFIX``; ``run_child`` returns it parsed. The child for an artifact is

    python -m llmopt.runtime.speed ARTIFACT --prompt-ids 1,2,3 [--decode-tokens 32] [--repeats 3]

which warms up (an 8-token prefill and one decode step), then times ``repeats`` greedy runs of one
prefill over the prompt and ``decode-tokens`` decode steps; it reports the median prefill tok/s
over the runs and decode tok/s = 1 / the median step time over all steps. It never imports torch.
``bench/bench_cpu.py`` uses the same pieces for its llmopt and torch children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "LLMOPT_RESULT "
WARMUP_TOKENS = 8


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ``getrusage``: on Linux its ru_maxrss
    carries the parent's peak over fork+exec, so a child would report at least its parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def artifact_steps(artifact: str | Path):
    """Greedy ``prefill(ids) -> (token, cache)`` and ``decode(token, cache) -> (token, cache)`` over an artifact."""
    import numpy as np

    from . import load

    model = load(artifact)

    def prefill(ids):
        logits, cache = model.prefill(np.asarray(ids, dtype=np.int32))
        return int(logits.argmax()), cache

    def decode(token, cache):
        logits, cache = model.decode(token, cache)
        return int(logits.argmax()), cache

    return prefill, decode


def time_generation(prefill, decode, ids: list[int], decode_tokens: int) -> dict:
    """Warm up, then time one prefill over ``ids`` and ``decode_tokens`` greedy decode steps after it."""
    token, cache = prefill(ids[:WARMUP_TOKENS])
    decode(token, cache)
    start = time.perf_counter()
    token, cache = prefill(ids)
    prefill_s = time.perf_counter() - start
    tokens, step_s = [token], []
    for _ in range(decode_tokens):
        start = time.perf_counter()
        token, cache = decode(token, cache)
        step_s.append(time.perf_counter() - start)
        tokens.append(token)
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_step_s": step_s,
        "decode_tok_s": 1 / statistics.median(step_s) if step_s else None,
        "tokens": tokens,
    }


def measure_artifact(artifact: str | Path, ids: list[int], decode_tokens: int, repeats: int) -> dict:
    """Load ``artifact`` and time ``repeats`` generations in this process; medians, load time and peak RSS."""
    start = time.perf_counter()
    prefill, decode = artifact_steps(artifact)
    load_s = time.perf_counter() - start
    runs = [time_generation(prefill, decode, ids, decode_tokens) for _ in range(repeats)]
    steps = [s for run in runs for s in run["decode_step_s"]]
    return {
        "prefill_tok_s": statistics.median(run["prefill_tok_s"] for run in runs),
        "decode_tok_s": 1 / statistics.median(steps) if steps else None,
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "threads": int(os.environ["TVM_NUM_THREADS"]) if "TVM_NUM_THREADS" in os.environ else None,
        "tokens": runs[0]["tokens"],
        "torch_imported": "torch" in sys.modules,
    }


def print_result(result: dict) -> None:
    """The child's half of the protocol: its result as one prefixed JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(args: list[str], threads: int) -> dict:
    """Run ``python ARGS`` with ``threads`` threads and return the result it printed.

    Raises ChildProcessError, with the child's output, when it fails or prints no result.
    """
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise ChildProcessError(f"measuring child `{' '.join(args)}` failed (exit {proc.returncode}):\n"
                                f"{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def measure_in_child(artifact: str | Path, ids: list[int], decode_tokens: int, repeats: int, threads: int) -> dict:
    """``measure_artifact`` in a fresh process with ``threads`` threads."""
    return run_child(["-m", __name__, str(artifact), "--prompt-ids", ",".join(map(str, ids)),
                      "--decode-tokens", str(decode_tokens), "--repeats", str(repeats)], threads)


def interleaved_rounds(paths: dict[str, str | Path], ids: list[int], decode_tokens: int, rounds: int,
                       repeats: int, threads: int = 1, log=print) -> dict[str, dict]:
    """Time every artifact of ``paths`` in ``rounds`` rounds, each artifact once per round in its own
    child (``measure_in_child``), the order reversed every other round so that drifting load falls
    on all alike. Per name: the medians over rounds of decode and prefill tok/s and peak RSS, and
    each round's tok/s (``decode_tok_s_rounds``, ``prefill_tok_s_rounds``) for paired ratios."""
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for round_ in range(rounds):
        for name in (list(paths) if round_ % 2 == 0 else list(paths)[::-1]):
            result = measure_in_child(paths[name], ids, decode_tokens, repeats, threads)
            runs[name].append(result)
            log(f"round {round_ + 1} {name}: decode {result['decode_tok_s']:.2f} tok/s, "
                f"prefill {result['prefill_tok_s']:.1f} tok/s")
    return {name: {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                   "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
                   "decode_tok_s_rounds": [r["decode_tok_s"] for r in rs],
                   "prefill_tok_s_rounds": [r["prefill_tok_s"] for r in rs],
                   "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs)}
            for name, rs in runs.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Time an artifact's prefill and decode (a measuring child).")
    parser.add_argument("artifact")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ids = [int(i) for i in args.prompt_ids.split(",")]
    print_result(measure_artifact(args.artifact, ids, args.decode_tokens, args.repeats))


if __name__ == "__main__":
    main()
