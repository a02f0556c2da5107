"""Benchmark the W8A8 CPU kernel (``linear_w8a8``) against the fp32 linear kernel.

For SmolLM2-135M's linear shapes, M = 1 (decode, GEMV) and M = 128 (prefill, GEMM), three kernels:

- ``int8-vnni``: codegen/kernels/cpu_int8_linear.py on the blocked w8 codes, AVX-512 VNNI
  ``vpdpbusd`` (only where the CPU has it);
- ``int8-portable``: the same loop nests with the 4-byte dot products in plain int32 arithmetic
  (what a CPU without VNNI runs);
- ``f32``: codegen/kernels/cpu_linear.py on the blocked fp32 weight.

Each is compiled in a Relax module through the CPU target's pipeline and run with
``relax.VirtualMachine``; times include the int8 kernel's per-token quantization of x and are the
median over ``--rounds`` blocks of calls. The script also counts the ``vpdpbusd`` instructions in
each library's assembly. ``TVM_NUM_THREADS`` is set from ``--threads`` before TVM starts. Writes
``bench/results/cpu_int8_linear.{json,md}``.

    python bench/bench_int8_linear.py [--threads 1] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kernel_timing import median_seconds, speedups
from results_files import write_results

SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536)]
ROWS = [1, 128]
BLOCK_SECONDS = 0.1
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_int8_linear"


def _build(variant: str, n: int, k: int, m: int, target):
    """A compiled Relax module ``main(x[1, m, k], *weights) -> y[1, m, n]``."""
    import tvm
    from tvm import relax, tirx

    from llmopt.codegen.build import relax_pipeline
    from llmopt.codegen.kernels.cpu_int8_linear import emit_w8a8_linear
    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT, emit_linear
    from llmopt.targets import get_target

    rows = 1 if m == 1 else tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([1, rows, k], "float32"))
    if variant == "f32":
        weights = [relax.Var("w", relax.TensorType(list(WEIGHT_LAYOUT.packed_shape(n, k)), "float32"))]
    else:
        weights = [relax.Var("q", relax.TensorType(list(WEIGHT_LAYOUT.packed_shape(n, -(-k // 4))), "uint32")),
                   relax.Var("s", relax.TensorType([n, 1], "float32"))]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *weights]):
        with bb.dataflow():
            if variant == "f32":
                y = emit_linear(bb, x, weights[0], None, target, out_features=n)
            else:
                y = emit_w8a8_linear(bb, x, *weights, None, out_features=n, target=target,
                                     vnni=variant == "int8-vnni")
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with target:
        return tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(get_target("cpu"), target))


def _weights(variant: str, w):
    import numpy as np

    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT
    from llmopt.ir.quant_schemes import get_scheme

    if variant == "f32":
        return [WEIGHT_LAYOUT.pack(w)]
    scheme = get_scheme("w8")
    q = scheme.quantize(w)
    return [WEIGHT_LAYOUT.pack(scheme.pack(q.codes)), np.ascontiguousarray(q.scales)]


def _reference(variant: str, w, x):
    from llmopt.ir.ops import OPS
    from llmopt.ir.quant_schemes import get_scheme

    if variant == "f32":
        return x @ w.T
    scheme = get_scheme("w8")
    q = scheme.quantize(w)
    return OPS["linear_w8a8"].ref([x, scheme.pack(q.codes), q.scales], {}, {})


def _vpdpbusd_count(executable) -> int:
    return sum(lib.inspect_source("asm").count("vpdpbusd") for lib in executable.mod.imports)


def measure(threads: int, rounds: int) -> list[dict]:
    import numpy as np
    import tvm
    from tvm import relax

    from llmopt.codegen.kernels.cpu_int8_linear import has_vnni
    from llmopt.codegen.kernels.cpu_linear import host_cpu_target

    target = host_cpu_target(threads)
    variants = (["int8-vnni"] if has_vnni(target) else []) + ["int8-portable", "f32"]
    rng = np.random.default_rng(0)
    results = []
    for n, k in SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        for m in ROWS:
            x = rng.standard_normal((1, m, k), dtype=np.float32)
            for variant in variants:
                executable = _build(variant, n, k, m, target)
                vm = relax.VirtualMachine(executable, tvm.cpu())
                arrays = _weights(variant, w)
                args = [tvm.runtime.tensor(a) for a in [x, *arrays]]
                got, want = vm["main"](*args).numpy(), _reference(variant, w, x)
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (variant, n, k, m)
                seconds = median_seconds(lambda: vm["main"](*args), rounds, BLOCK_SECONDS)
                results.append({"n": n, "k": k, "m": m, "variant": variant, "threads": threads, "seconds": seconds,
                                "weight_bytes": sum(a.nbytes for a in arrays),
                                "vpdpbusd_in_asm": _vpdpbusd_count(executable)})
                print(_row(results[-1]), flush=True)
    return results


def _row(r: dict) -> str:
    n, k, m, s = r["n"], r["k"], r["m"], r["seconds"]
    rate = f"{r['weight_bytes'] / s / 1e9:6.1f} GB/s" if m == 1 else f"{2 * m * n * k / s / 1e9:6.1f} GOP/s"
    return (f"| {n:>5} | {k:>5} | {m:>4} | {r['variant']:<13} | {s * 1e6:9.1f} | {rate} | "
            f"{r['vpdpbusd_in_asm']:>4} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    header = [f"{args.threads} thread(s); load average before: {os.getloadavg()[0]:.2f}", "",
              "|     N |     K |    M | kernel        |        us | rate | vpdpbusd in asm |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    results = measure(args.threads, args.rounds)
    lines = header + [_row(r) for r in results] + ["", *speedups(results, "f32", "the f32 kernel")]
    print("\n".join(lines[len(header) + len(results):]))
    write_results(RESULTS, results, "\n".join(lines), indent=1)


if __name__ == "__main__":
    main()
