"""How the kernel micro-benchmarks time a call and compare kernels: per-call seconds over a block of
calls, the median over rounds, and speedups against a baseline variant."""

from __future__ import annotations

import statistics
import time


def per_call(fn, number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls in a row."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def calls_per_block(fn, block_seconds: float) -> int:
    """How many calls of ``fn`` take about ``block_seconds`` (at least 3)."""
    return max(3, int(block_seconds / max(per_call(fn, 3), 1e-7)))


def median_seconds(fn, rounds: int, block_seconds: float) -> float:
    """Median over ``rounds`` blocks of the seconds per call of ``fn`` (after one warm-up call)."""
    fn()
    number = calls_per_block(fn, block_seconds)
    return statistics.median(per_call(fn, number) for _ in range(rounds))


def speedups(results: list[dict], baseline: str, against: str) -> list[str]:
    """A Markdown line per non-baseline result: how many times faster than the baseline variant of
    its shape it ran, e.g. ``- q4 N=576 K=1536 M=1: 2.10x the f32 kernel``."""
    base = {(r["n"], r["k"], r["m"]): r["seconds"] for r in results if r["variant"] == baseline}
    return [f"- {r['variant']} N={r['n']} K={r['k']} M={r['m']}: {base[r['n'], r['k'], r['m']] / r['seconds']:.2f}x "
            f"{against}" for r in results if r["variant"] != baseline]
