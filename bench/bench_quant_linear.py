"""Benchmark the fused low-bit CPU linear kernels against the fp32 kernel and the unfused path.

For SmolLM2-135M's linear shapes, M = 1 (decode, GEMV) and M = 128 (prefill, GEMM), three ways
of computing ``x @ W^T``:

- ``fused``: codegen/kernels/cpu_quant_linear.py on the stored blocked codes and scales (the
  weight is dequantized in registers / in one L2 panel);
- ``f32``: codegen/kernels/cpu_linear.py on the stored fp32 weight (the unquantized model);
- ``unfused``: what a quantized build did before the fused kernels: the generic ``dequantize``
  TE (materializing f32 ``[N, K]`` each call) scheduled by the CPU fallback rule, then the fp32
  kernel, which blocks that weight in the graph each call.

Each is compiled in a Relax module through the CPU target's pipeline and run with
``relax.VirtualMachine``; times are the median over ``--rounds`` blocks of calls. Rates: weight
bytes read per second (GEMV; compared with a measured single-stream read bandwidth, numpy's sum of
a 512 MiB array), GFLOP/s (GEMM), and tokens per second as if the model were this one linear
(GEMV: calls per second; GEMM: rows per second). By default the weights of a shape stay
cache-resident between calls (L2 holds most of them); ``--cold`` makes each GEMV call read another
copy of its weights (320 MiB of copies), so they stream from memory as in a whole model. Each
thread count runs in a child process with ``TVM_NUM_THREADS`` set before TVM starts. Writes
``bench/results/cpu_quant_linear[_cold].{json,md}``.

    python bench/bench_quant_linear.py [--scheme w4g64] [--threads 1] [--rounds 9] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from kernel_timing import median_seconds
from results_files import write_results

SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536), (49152, 576)]
ROWS = [1, 128]
VARIANTS = ("fused", "f32", "unfused")
BLOCK_SECONDS = 0.1
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_quant_linear"
COLD_BYTES = 320 << 20  # weight copies cycled through per GEMV with --cold


def _build(variant: str, scheme, n: int, k: int, m: int, target):
    """A compiled Relax module ``main(x[1, m, k], *weights) -> y[1, m, n]`` for ``variant``."""
    import numpy as np
    import tvm
    from tvm import relax, te, tirx

    from llmopt.codegen.build import relax_pipeline
    from llmopt.codegen.kernels.cpu_linear import emit_linear
    from llmopt.codegen.kernels.cpu_quant_linear import emit_quant_linear
    from llmopt.codegen.kernels.quant_linear_te import dequantized_weight
    from llmopt.targets import get_target

    rows = 1 if m == 1 else tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([1, rows, k], "float32"))
    shapes = _weight_shapes(variant, scheme, n, k)
    weights = [relax.Var(f"w{i}", relax.TensorType(list(shape), dtype)) for i, (shape, dtype) in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *weights]):
        with bb.dataflow():
            if variant == "f32":
                y = emit_linear(bb, x, weights[0], None, target, out_features=n)
            elif variant == "fused":
                zeros = weights[2] if scheme.has_zeros else None
                y = emit_quant_linear(bb, x, weights[0], weights[1], zeros, None, scheme=scheme,
                                      out_features=n, in_features=k, target=target)
            else:
                def dequantize(packed, scales, *rest):
                    zeros = rest[0] if scheme.has_zeros else None
                    codebook = rest[-1] if scheme.codebook is not None else None
                    value = dequantized_weight(scheme, k, packed, scales, zeros, codebook)
                    return te.compute((n, k), value, name="dequantize")
                tables = [relax.const(np.asarray(scheme.codebook, np.float32))] if scheme.codebook else []
                w = bb.emit_te(dequantize, *weights, *tables, primfunc_name_hint="dequantize")
                y = emit_linear(bb, x, w, None, target)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with target:
        return tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(get_target("cpu"), target))


def _weight_shapes(variant: str, scheme, n: int, k: int) -> list[tuple[tuple, str]]:
    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT

    if variant == "f32":
        return [(WEIGHT_LAYOUT.packed_shape(n, k), "float32")]
    columns = [(scheme.packed_width(k), "uint32"), (scheme.groups(k), "float32")]
    columns += [(scheme.groups(k), "float32")] if scheme.has_zeros else []
    if variant == "fused":
        return [(WEIGHT_LAYOUT.packed_shape(n, c), dtype) for c, dtype in columns]
    return [((n, c), dtype) for c, dtype in columns]


def _weights(variant: str, scheme, w):
    """The variant's weight arrays for the fp32 weight ``w``."""
    import numpy as np

    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT

    if variant == "f32":
        return [WEIGHT_LAYOUT.pack(w)]
    q = scheme.quantize(w)
    parts = [scheme.pack(q.codes), q.scales] + ([q.zeros] if scheme.has_zeros else [])
    if variant == "fused":
        parts = [WEIGHT_LAYOUT.pack(p) for p in parts]
    return [np.ascontiguousarray(p) for p in parts]


def _reference(variant: str, scheme, w, x):
    if variant == "f32":
        return x @ w.T
    q = scheme.quantize(w)
    return x @ scheme.dequantize(q).T


def _read_bandwidth(rounds: int) -> float:
    """GB/s of one thread streaming a 512 MiB f32 array (numpy's vectorized sum)."""
    import numpy as np

    a = np.ones(128 << 20, np.float32)
    return a.nbytes / 1e9 / median_seconds(a.sum, rounds, BLOCK_SECONDS)


def _child(threads: int, scheme_name: str, rounds: int, cold: bool) -> None:
    """Measure every (shape, rows, variant) with ``threads`` threads; one JSON line per result.
    ``cold``: each call reads another copy of the weights, ``COLD_BYTES`` of copies in all, so
    GEMV weights stream from memory as in a model (otherwise they sit in L2 after the first call)."""
    import numpy as np
    import tvm
    from tvm import relax

    from llmopt.codegen.kernels.cpu_linear import host_cpu_target
    from llmopt.ir.quant_schemes import get_scheme

    scheme = get_scheme(scheme_name)
    target = host_cpu_target(threads)
    print(json.dumps({"bandwidth_gb_s": _read_bandwidth(rounds)}), flush=True)
    rng = np.random.default_rng(0)
    for n, k in SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        for m in ROWS:
            x = rng.standard_normal((1, m, k), dtype=np.float32)
            for variant in VARIANTS:
                vm = relax.VirtualMachine(_build(variant, scheme, n, k, m, target), tvm.cpu())
                arrays = _weights(variant, scheme, w)
                weight_bytes = sum(a.nbytes for a in arrays)
                copies = max(1, COLD_BYTES // weight_bytes) if cold and m == 1 else 1
                tx = tvm.runtime.tensor(x)
                sets = [[tvm.runtime.tensor(a) for a in arrays] for _ in range(copies)]
                got = vm["main"](tx, *sets[0]).numpy()
                want = _reference(variant, scheme, w, x)
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (variant, n, k, m)

                def calls(main=vm["main"], sets=sets, tx=tx):
                    for weights in sets:
                        main(tx, *weights)

                seconds = median_seconds(calls, rounds, BLOCK_SECONDS) / copies
                print(json.dumps({"n": n, "k": k, "m": m, "variant": variant, "threads": threads,
                                  "seconds": seconds, "weight_bytes": weight_bytes, "copies": copies}), flush=True)


def _row(r: dict, bandwidth: float) -> str:
    n, k, m, s = r["n"], r["k"], r["m"], r["seconds"]
    if m == 1:
        gbs = r["weight_bytes"] / s / 1e9
        rate = f"{gbs:7.1f} GB/s ({gbs / bandwidth:4.0%} of bw) {1 / s:9.0f} tok/s"
    else:
        rate = f"{2 * m * n * k / s / 1e9:7.1f} GFLOP/s          {m / s:9.0f} tok/s"
    return (f"| {n:>6} | {k:>5} | {m:>4} | {r['threads']} | {r['variant']:<8} | {s * 1e3:8.3f} | "
            f"{r['weight_bytes'] / 2**20:7.2f} | {rate} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="w4g64", help="an integer scheme (default: w4g64, which divides K=576)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cold", action="store_true",
                        help="GEMV: cycle through 320 MiB of weight copies, so weights come from memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.threads[0], args.scheme, args.rounds, args.cold)
        return
    mode = "cold (GEMV weights streamed from memory)" if args.cold else "hot (weights cache-resident after a call)"
    results = []
    lines = [f"scheme {args.scheme}, {mode}; load average before: {os.getloadavg()[0]:.2f}", "",
             "|      N |     K |    M | thr | variant  |       ms | weight MiB | rate |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for threads in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--scheme", args.scheme,
               "--rounds", str(args.rounds)] + (["--cold"] if args.cold else [])
        bandwidth = None
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                record = json.loads(line)
                if "bandwidth_gb_s" in record:
                    bandwidth = record["bandwidth_gb_s"]
                    lines.append(f"\n{threads} thread(s): measured read bandwidth {bandwidth:.1f} GB/s\n")
                else:
                    results.append(record)
                    lines.append(_row(record, bandwidth))
                print(lines[-1], flush=True)
        if proc.returncode:
            sys.exit(proc.returncode)
    lines.append(f"\nload average after: {os.getloadavg()[0]:.2f}")
    out = RESULTS.with_name(RESULTS.name + ("_cold" if args.cold else ""))
    write_results(out, {"scheme": args.scheme, "cold": args.cold, "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
