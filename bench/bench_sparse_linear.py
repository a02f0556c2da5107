"""Benchmark the CPU prefill kernels for N:M-sparse (2:4) fp32 linear weights.

For SmolLM2-135M's MLP shapes (N=1536, K=576 and N=576, K=1536) and M = 2, 7, 16 and 128 rows of x,
three ways to compute ``y = x @ W^T`` with a 2:4-pruned W:

- ``dense``: codegen/kernels/cpu_linear.py's GEMM on the dense weight (blocked layout), what a
  build without ``compact-sparse`` runs;
- ``densify+gemm``: the compact values + indices densified into a temporary in that layout on every
  call, then the same GEMM (kernels/cpu_sparse_linear.emit_densified_linear, the old prefill);
- ``sparse-gemm``: kernels/cpu_sparse_linear.make_sparse_gemm on values + indices as stored.

Each is compiled in a Relax module (symbolic M) through the CPU target's pipeline and run with
``relax.VirtualMachine`` and checked against numpy; the three are timed in interleaved blocks of
calls (the machine is shared: interleaving spreads the noise evenly), median over ``--rounds``
rounds. ``TVM_NUM_THREADS`` is set from ``--threads`` before TVM starts. Writes
``bench/results/cpu_sparse_linear.{json,md}``.

    python bench/bench_sparse_linear.py [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from kernel_timing import calls_per_block, per_call, speedups
from results_files import write_results

SHAPES = [(1536, 576), (576, 1536)]
ROWS = [2, 7, 16, 128]
VARIANTS = ["dense", "densify+gemm", "sparse-gemm"]
N_OF_M = (2, 4)
BLOCK_SECONDS = 0.05
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_sparse_linear"


def _build(variant: str, n: int, k: int, target):
    """A compiled Relax module ``main(x[m, k], *weights) -> y[m, n]`` (m symbolic)."""
    import tvm
    from tvm import relax, tirx

    from llmopt.codegen.build import relax_pipeline
    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT, emit_linear
    from llmopt.codegen.kernels.cpu_sparse_linear import emit_densified_linear, emit_sparse_linear
    from llmopt.ir.sparse_format import NMFormat
    from llmopt.targets import get_target

    fmt = NMFormat(*N_OF_M)
    x = relax.Var("x", relax.TensorType([tirx.Var("m", "int64"), k], "float32"))
    if variant == "dense":
        weights = [relax.Var("w", relax.TensorType(list(WEIGHT_LAYOUT.packed_shape(n, k)), "float32"))]
    else:
        weights = [relax.Var("values", relax.TensorType([n, fmt.kept(k)], "float32")),
                   relax.Var("indices", relax.TensorType([n, fmt.index_words(k)], "uint32"))]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *weights]):
        with bb.dataflow():
            if variant == "dense":
                y = emit_linear(bb, x, weights[0], None, target, out_features=n)
            else:
                emit = emit_sparse_linear if variant == "sparse-gemm" else emit_densified_linear
                y = emit(bb, x, *weights, None, fmt=fmt, out_features=n, in_features=k, target=target)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with target:
        return tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(get_target("cpu"), target))


def _pruned_weight(rng, n: int, k: int):
    import numpy as np

    from llmopt.passes.prune import nm_mask

    w = rng.standard_normal((n, k), dtype=np.float32)
    return np.where(nm_mask(np.abs(w), *N_OF_M), w, np.float32(0)).astype(np.float32)


def measure(threads: int, rounds: int) -> list[dict]:
    import numpy as np
    import tvm
    from tvm import relax

    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT, host_cpu_target
    from llmopt.ir.sparse_format import NMFormat

    target = host_cpu_target(threads)
    rng = np.random.default_rng(0)
    results = []
    for n, k in SHAPES:
        w = _pruned_weight(rng, n, k)
        values, indices = NMFormat(*N_OF_M).compress(w)
        arrays = {"dense": [WEIGHT_LAYOUT.pack(w)], "densify+gemm": [values, indices], "sparse-gemm": [values, indices]}
        vms = {v: relax.VirtualMachine(_build(v, n, k, target), tvm.cpu()) for v in VARIANTS}
        for m in ROWS:
            x = rng.standard_normal((m, k), dtype=np.float32)
            want = x @ w.T
            calls = {}
            for variant, vm in vms.items():
                args = [tvm.runtime.tensor(a) for a in [x, *arrays[variant]]]
                got = vm["main"](*args).numpy()
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (variant, n, k, m)
                calls[variant] = (lambda vm=vm, args=args: vm["main"](*args))
            number = {v: calls_per_block(f, BLOCK_SECONDS) for v, f in calls.items()}
            times = {v: [] for v in VARIANTS}
            for _ in range(rounds):  # interleaved: one block of each variant per round
                for variant, fn in calls.items():
                    times[variant].append(per_call(fn, number[variant]))
            for variant in VARIANTS:
                results.append({"n": n, "k": k, "m": m, "variant": variant, "threads": threads,
                                "seconds": statistics.median(times[variant]),
                                "weight_bytes": sum(a.nbytes for a in arrays[variant])})
                print(_row(results[-1]), flush=True)
    return results


def _row(r: dict) -> str:
    s = r["seconds"]
    return (f"| {r['n']:>5} | {r['k']:>5} | {r['m']:>4} | {r['variant']:<13} | {s * 1e6:9.1f} | "
            f"{2 * r['m'] * r['n'] * r['k'] / s / 1e9:6.1f} | {r['weight_bytes'] / 1e6:5.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    header = [f"{N_OF_M[0]}:{N_OF_M[1]} sparse weights; {args.threads} thread(s); {args.rounds} interleaved rounds, "
              f"medians; load average before: {os.getloadavg()[0]:.2f}", "",
              "|     N |     K |    M | kernel        |        us | dense-equivalent GFLOP/s | weight MB |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    results = measure(args.threads, args.rounds)
    lines = header + [_row(r) for r in results] + ["", *speedups(results, "dense", "the dense GEMM's speed")]
    print("\n".join(lines[len(header) + len(results):]))
    write_results(RESULTS, results, "\n".join(lines), indent=1)


if __name__ == "__main__":
    main()
