"""Benchmark llmopt's CPU linear kernels against torch.nn.functional.linear (fp32).

For every SmolLM2-135M linear shape, M = 1 (decode, GEMV) and M = 128 (prefill, GEMM), with
1 and 2 threads: the kernel is compiled in a Relax module through LegalizeOps, the "zero"
pipeline and ``tvm.compile``, run with ``relax.VirtualMachine``, and timed in alternating
blocks with torch (both called from Python), median over blocks. Each thread count runs in
a child process, because both runtimes fix their thread pools at start-up
(``TVM_NUM_THREADS``, ``torch.set_num_threads``).

    python bench/bench_linear.py [--threads 1 2] [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from kernel_timing import calls_per_block, per_call

SHAPES = [(576, 576), (192, 576), (960, 576), (3072, 576), (1536, 576), (576, 1536), (49152, 576)]
ROWS = [1, 128]
BLOCK_SECONDS = 0.1


def _build(n: int, k: int, m: int, target):
    """Compile a Relax module computing linear(x[1, m, k], w) with a symbolic m unless m == 1."""
    import tvm
    from tvm import relax, tirx

    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT, emit_linear

    rows = 1 if m == 1 else tirx.Var("m", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, rows, k], "float32"))
    w = relax.Var("w", relax.TensorType(list(WEIGHT_LAYOUT.packed_shape(n, k)), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(emit_linear(bb, x, w, None, target, out_features=n))
        bb.emit_func_output(y)
    mod = relax.get_pipeline("zero")(relax.transform.LegalizeOps()(bb.get()))
    return tvm.compile(mod, target=target)


def _measure(n: int, k: int, m: int, target, rounds: int) -> dict:
    """Median seconds per call of the TVM kernel and of torch, timed in alternating blocks."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from llmopt.codegen.kernels.cpu_linear import pack_weight_for_gemm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(_build(n, k, m, target), dev)
    tx, tw = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(pack_weight_for_gemm(w), dev)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    main = vm["main"]
    got = main(tx, tw).numpy()
    expect = torch.nn.functional.linear(xt, wt).numpy()
    assert np.allclose(got, expect, rtol=1e-3, atol=1e-3 * np.abs(expect).max()), (n, k, m)

    def run_tvm():
        main(tx, tw)

    def run_torch():
        torch.nn.functional.linear(xt, wt)

    counts = {f: calls_per_block(f, BLOCK_SECONDS) for f in (run_tvm, run_torch)}
    times = {run_tvm: [], run_torch: []}
    for r in range(rounds):
        order = (run_tvm, run_torch) if r % 2 == 0 else (run_torch, run_tvm)
        for f in order:
            f()  # re-warm after the other runtime had the cores
            times[f].append(per_call(f, counts[f]))
    return {
        "tvm": statistics.median(times[run_tvm]),
        "torch": statistics.median(times[run_torch]),
    }


def _child(threads: int, rounds: int) -> None:
    """Measure every shape with ``threads`` threads; print one JSON line per result."""
    import torch

    from llmopt.codegen.kernels.cpu_linear import host_cpu_target

    torch.set_num_threads(threads)
    target = host_cpu_target(threads)
    for n, k in SHAPES:
        for m in ROWS:
            res = _measure(n, k, m, target, rounds)
            print(json.dumps({"n": n, "k": k, "m": m, "threads": threads, **res}), flush=True)


def _row(r: dict) -> str:
    n, k, m = r["n"], r["k"], r["m"]
    if m == 1:
        unit, work = "GB/s", n * k * 4 / 1e9
    else:
        unit, work = "GFLOP/s", 2 * m * n * k / 1e9
    return (
        f"{n:>6} {k:>5} {m:>4} {r['threads']:>3} | {r['tvm'] * 1e3:9.3f} {r['torch'] * 1e3:9.3f} | "
        f"{work / r['tvm']:7.1f} {work / r['torch']:7.1f} {unit:<7} | {r['torch'] / r['tvm']:5.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.threads[0], args.rounds)
        return
    # Other processes on the cores distort the 2-thread numbers most (torch's OpenMP
    # barriers spin): the load average is printed so that a noisy run can be told apart.
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("     N     K    M thr |    tvm ms  torch ms |     tvm   torch rate    | torch/tvm")
    for threads in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads),
               "--rounds", str(args.rounds)]
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                print(_row(json.loads(line)), flush=True)
        if proc.returncode:
            sys.exit(proc.returncode)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
