"""Benchmark the W4A8 CPU GEMM (int8 activations x 4-bit weights, VNNI) against the int4 f32 path.

For SmolLM2-135M's prefill linear shapes (N x K: 576 x 576 q/o_proj, 192 x 576 k/v_proj, 3072 x 576
gate+up fused, 576 x 1536 down_proj), M = 128 rows, weights in ``w4g32`` and ``w4g128``, three kernels:

- ``w4a8``: codegen/kernels/cpu_w4a8_linear.py (x quantized to int8 per row and group, ``vpdpbusd``);
- ``w4-f32``: codegen/kernels/cpu_quant_linear.py's ``make_quant_gemm`` (each 64-channel panel
  dequantized to f32, then the f32 register tile): what an int4 build runs today;
- ``f32``: codegen/kernels/cpu_linear.py on the unquantized fp32 weight.

Each is compiled in a Relax module through the CPU target's pipeline and run with
``relax.VirtualMachine`` (times include w4a8's quantization of x); the variants of a shape are timed
in interleaved rounds (this machine is shared: a variant never gets a quiet spell to itself) and the
median per call is reported. Every output is checked first (w4a8 against its numpy reference).
``--tiles`` also times w4a8's register tile choices (rows x columns) at two shapes.

``--m 1`` (decode) times instead, for SmolLM2's decode shapes (also 960 x 576 qkv fused and the
49152 x 576 LM head), at M = 1: ``w4a8`` (its GEMV, ``make_w4a8_gemv``), ``w4a8-gemm`` (the GEMM
above with one-row tiles, what M = 1 ran before the GEMV) and ``w4-f32`` (cpu_quant_linear's
``make_quant_gemv``, what decode runs today), each hot (the same weights every call: cache-resident
but for the LM head) and cold (each call reads another copy of the weights, 256 MiB of copies, so
they stream from memory as in a model); rate = (packed codes + scales) bytes / time, against a
measured single-stream read bandwidth (numpy's sum of a 512 MiB array). ``--gemv-options`` also
times the GEMV's variants (odd codes in the high nibbles or shifted down; software prefetch).
Writes ``bench/results/cpu_w4a8_linear_decode.{json,md}``.

Accuracy: the relative error (Frobenius) that int8 activations add, ``|y_w4a8 - y_w4| / |y_w4|``
with ``y_w4 = x @ dequantize(W)^T`` in f64, next to what the 4-bit weight itself costs,
``|y_w4 - y_f32| / |y_f32|``; on synthetic data (normal x with 4 outlier channels x20, normal W) and,
when llmopt's SmolLM2 folder is cached, on real weights and real inputs of those linears (layers 0, 14,
29; 128 tokens of Pride and Prejudice). ``TVM_NUM_THREADS`` is set from ``--threads`` before TVM
starts. Writes ``bench/results/cpu_w4a8_linear.{json,md}``.

    python bench/bench_w4a8_linear.py [--threads 1] [--rounds 9] [--tiles]
    python bench/bench_w4a8_linear.py --m 1 [--threads 1] [--rounds 9] [--gemv-options]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

from kernel_timing import calls_per_block, per_call
from results_files import write_results

SHAPES = [(576, 576), (192, 576), (3072, 576), (576, 1536)]
GROUPS = [32, 128]
M = 128
BLOCK_SECONDS = 0.1
TILES = [(4, 32), (5, 32), (6, 32), (3, 64), (6, 64)]
TILE_SHAPES = [(3072, 576), (576, 1536)]
OUTLIERS = 4  # synthetic x: channels scaled by 20
LAYERS = (0, 14, 29)
TEXT = Path("/work/shared/data/austen/pride_and_prejudice.txt")
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_w4a8_linear"
DECODE_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
DECODE_VARIANTS = ("w4a8", "w4a8-gemm", "w4-f32")
GEMV_OPTIONS = [(True, 0), (False, 0), (True, 16), (True, 64)]  # (high nibbles, prefetch words ahead)
OPTION_SHAPES = [(3072, 576), (49152, 576)]
COLD_BYTES = 256 << 20  # weight copies cycled through per decode call when cold
BANDWIDTH_BYTES = 512 << 20


# ---- building and checking the kernels ---------------------------------------------------------

def _compile(variant, n: int, k: int, group: int, target, tile=None, rows: int | None = None):
    """``main(x[m, k], *weights) -> y[m, n]`` for ``variant``, compiled: m symbolic, or the constant
    ``rows`` (1 selects the GEMVs). A ``variant`` (high_nibbles, prefetch) is w4a8's GEMV so built."""
    import tvm
    from tvm import relax, tirx

    from llmopt.codegen.build import relax_pipeline
    from llmopt.codegen.kernels.cpu_linear import emit_linear
    from llmopt.codegen.kernels.cpu_quant_linear import emit_quant_linear
    from llmopt.codegen.kernels.cpu_w4a8_linear import W4A8Shape, emit_w4a8_linear, make_w4a8_gemv
    from llmopt.ir.quant_schemes import get_scheme
    from llmopt.targets import get_target

    m = tirx.Var("m", "int64") if rows is None else rows
    x = relax.Var("x", relax.TensorType([m, k], "float32"))
    weights = [relax.Var(f"w{i}", relax.TensorType(list(a.shape), str(a.dtype)))
               for i, a in enumerate(_weight_arrays(variant, _random_weight(n, k), group))]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *weights]):
        with bb.dataflow():
            if isinstance(variant, tuple):
                gv = bb.add_func(make_w4a8_gemv(W4A8Shape(n, k, group), True, *variant), "gemv")
                y = bb.emit(relax.call_tir(gv, [x, *weights], relax.TensorType([1, n], "float32")))
            elif variant == "f32":
                y = emit_linear(bb, x, weights[0], None, target, out_features=n)
            elif variant == "w4-f32":
                y = emit_quant_linear(bb, x, weights[0], weights[1], None, None, scheme=get_scheme(f"w4g{group}"),
                                      out_features=n, in_features=k, target=target)
            else:
                rows, cols = tile or (None, None)
                extra = {"rows": rows, "cols": cols} if tile else {}
                y = emit_w4a8_linear(bb, x, weights[0], weights[1], out_features=n, group=group, target=target,
                                     **extra)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with target:
        executable = tvm.compile(bb.get(), target, relax_pipeline=relax_pipeline(get_target("cpu"), target))
    return relax.VirtualMachine(executable, tvm.cpu())["main"], executable


def _random_weight(n: int, k: int):
    import numpy as np

    return np.random.default_rng(n * 10007 + k).standard_normal((n, k), dtype=np.float32)


def _quantized(w, group: int):
    """(packed codes [N, K/8], scales [N, groups]) of ``w`` in ``w4g<group>``."""
    from llmopt.ir.quant_schemes import get_scheme

    scheme = get_scheme(f"w4g{group}")
    q = scheme.quantize(w)
    return scheme.pack(q.codes), q.scales


def _weight_arrays(variant: str, w, group: int) -> list:
    """The arrays ``variant`` takes, as stored (blocked)."""
    from llmopt.codegen.kernels.cpu_linear import WEIGHT_LAYOUT

    if variant == "f32":
        return [WEIGHT_LAYOUT.pack(w)]
    return [WEIGHT_LAYOUT.pack(part) for part in _quantized(w, group)]


def _check(variant: str, got, x, w, group: int) -> None:
    import numpy as np

    from llmopt.codegen.kernels.cpu_w4a8_linear import w4a8_reference
    from llmopt.ir.quant_schemes import get_scheme

    if variant == "w4a8" or variant == "w4a8-gemm" or isinstance(variant, tuple):
        want, tolerance = w4a8_reference(x, *_quantized(w, group), group), 1e-6
    elif variant == "w4-f32":
        packed, scales = _quantized(w, group)
        weight = get_scheme(f"w4g{group}").dequantize_packed(packed, scales, None, w.shape[1])
        want, tolerance = x @ weight.T, 1e-4
    else:
        want, tolerance = x @ w.T, 1e-4
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= tolerance, (variant, w.shape, group, error)


def _time_interleaved(calls: dict, rounds: int) -> dict:
    """Median seconds per call of each of ``calls``, timed in interleaved rounds."""
    for fn in calls.values():
        fn()  # warm-up
    numbers = {name: calls_per_block(fn, BLOCK_SECONDS) for name, fn in calls.items()}
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(per_call(fn, numbers[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


def measure(target, rounds: int) -> list[dict]:
    """Time w4a8, w4-f32 and f32 per (shape, group) at M = 128."""
    import numpy as np
    import tvm

    results = []
    for n, k in SHAPES:
        w = _random_weight(n, k)
        x = np.random.default_rng(k).standard_normal((M, k), dtype=np.float32)
        for group in GROUPS:
            calls = {}
            for variant in ("w4a8", "w4-f32", "f32"):
                main, _ = _compile(variant, n, k, group, target)
                args = [tvm.runtime.tensor(a) for a in [x, *_weight_arrays(variant, w, group)]]
                _check(variant, main(*args).numpy(), x, w, group)
                calls[variant] = lambda main=main, args=args: main(*args)
            seconds = _time_interleaved(calls, rounds)
            for variant, s in seconds.items():
                results.append({"n": n, "k": k, "m": M, "group": group, "variant": variant, "seconds": s,
                                "gops": 2 * M * n * k / s / 1e9, "vs_w4_f32": seconds["w4-f32"] / s})
                print(_timing_row(results[-1]), flush=True)
    return results


def measure_tiles(target, rounds: int) -> list[dict]:
    """Time w4a8's register tile choices (rows x cols), interleaved, per (shape, group)."""
    import numpy as np
    import tvm

    results = []
    for n, k in TILE_SHAPES:
        w = _random_weight(n, k)
        x = np.random.default_rng(k).standard_normal((M, k), dtype=np.float32)
        for group in GROUPS:
            calls = {}
            for tile in TILES:
                main, _ = _compile("w4a8", n, k, group, target, tile)
                args = [tvm.runtime.tensor(a) for a in [x, *_weight_arrays("w4a8", w, group)]]
                _check("w4a8", main(*args).numpy(), x, w, group)
                calls[tile] = lambda main=main, args=args: main(*args)
            for (rows, cols), s in _time_interleaved(calls, rounds).items():
                results.append({"n": n, "k": k, "m": M, "group": group, "rows": rows, "cols": cols, "seconds": s,
                                "gops": 2 * M * n * k / s / 1e9})
                print(_tile_row(results[-1]), flush=True)
    return results


# ---- decode (M = 1) ----------------------------------------------------------------------------

def _read_bandwidth(rounds: int) -> float:
    """GB/s of one thread streaming a 512 MiB f32 array (numpy's vectorized sum)."""
    import numpy as np

    from kernel_timing import median_seconds

    a = np.ones(BANDWIDTH_BYTES // 4, np.float32)
    return a.nbytes / 1e9 / median_seconds(a.sum, rounds, BLOCK_SECONDS)


def _label(variant) -> str:
    if isinstance(variant, tuple):
        high_nibbles, prefetch = variant
        return f"gemv {'hi' if high_nibbles else 'shift'} pf{prefetch}"
    return variant


def measure_decode(target, rounds: int, shapes, variants, bandwidth: float) -> list[dict]:
    """Time ``variants`` at M = 1 per (shape, group), hot and cold, interleaved."""
    import numpy as np
    import tvm

    results = []
    for n, k in shapes:
        w = _random_weight(n, k)
        x = np.random.default_rng(k).standard_normal((1, k), dtype=np.float32)
        tx = tvm.runtime.tensor(x)
        for group in GROUPS:
            arrays = _weight_arrays("w4a8", w, group)  # the same blocked codes and scales for every variant
            nbytes = sum(a.nbytes for a in arrays)
            copies = [[tvm.runtime.tensor(a) for a in arrays] for _ in range(max(1, COLD_BYTES // nbytes))]
            hot, cold = {}, {}
            for variant in variants:
                main, _ = _compile(variant, n, k, group, target, rows=None if variant == "w4a8-gemm" else 1)
                _check(variant, main(tx, *copies[0]).numpy(), x, w, group)
                hot[variant] = lambda main=main: main(tx, *copies[0])

                def calls(main=main):
                    for weights in copies:
                        main(tx, *weights)

                cold[variant] = calls
            hot_s = _time_interleaved(hot, rounds)
            cold_s = {v: t / len(copies) for v, t in _time_interleaved(cold, rounds).items()}
            base = "w4-f32" if "w4-f32" in variants else variants[0]
            for variant in variants:
                results.append({"n": n, "k": k, "m": 1, "group": group, "variant": _label(variant), "bytes": nbytes,
                                "hot_seconds": hot_s[variant], "cold_seconds": cold_s[variant],
                                "hot_gb_s": nbytes / hot_s[variant] / 1e9, "cold_gb_s": nbytes / cold_s[variant] / 1e9,
                                "cold_of_bandwidth": nbytes / cold_s[variant] / 1e9 / bandwidth,
                                "hot_vs_base": hot_s[base] / hot_s[variant], "cold_vs_base": cold_s[base] / cold_s[variant],
                                "base": _label(base)})
                print(_decode_row(results[-1]), flush=True)
    return results


def _decode_row(r: dict) -> str:
    return (f"| {r['n']:>5} | {r['k']:>5} | w4g{r['group']:<3} | {r['variant']:<14} | {r['bytes'] / 2**20:6.2f} | "
            f"{r['hot_seconds'] * 1e6:8.1f} | {r['hot_gb_s']:6.1f} | {r['hot_vs_base']:5.2f}x | "
            f"{r['cold_seconds'] * 1e6:8.1f} | {r['cold_gb_s']:5.1f} ({r['cold_of_bandwidth']:4.0%}) | "
            f"{r['cold_vs_base']:5.2f}x |")


DECODE_HEADER = ["| N | K | weight | kernel | MiB | hot us | hot GB/s | hot vs base | cold us | cold GB/s (of bw) | "
                 "cold vs base |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def decode(target, threads: int, rounds: int, options: bool) -> None:
    """The ``--m 1`` report: w4a8's GEMV against the GEMM at M = 1 and make_quant_gemv."""
    load = os.getloadavg()[0]
    bandwidth = _read_bandwidth(rounds)
    print(f"read bandwidth {bandwidth:.1f} GB/s", flush=True)
    print("\n".join(DECODE_HEADER), flush=True)
    timings = measure_decode(target, rounds, DECODE_SHAPES, DECODE_VARIANTS, bandwidth)
    option_rows = []
    if options:
        print("\n".join(DECODE_HEADER), flush=True)
        option_rows = measure_decode(target, rounds, OPTION_SHAPES, GEMV_OPTIONS, bandwidth)
    summary = []
    for group in GROUPS:
        for mode in ("hot", "cold"):
            for variant in DECODE_VARIANTS[:2]:
                ratios = [r[f"{mode}_vs_base"] for r in timings if r["variant"] == variant and r["group"] == group]
                summary.append(f"- w4g{group} {mode}: {variant} runs {min(ratios):.2f}x to {max(ratios):.2f}x as fast "
                               f"as w4-f32 (geometric mean {statistics.geometric_mean(ratios):.2f}x)")
    lines = ["# W4A8 decode (M = 1): the GEMV vs the GEMM at M = 1 vs the int4 f32 GEMV", "",
             f"{threads} thread(s), {target.attrs['mcpu']} ({platform.machine()}); measured read bandwidth "
             f"{bandwidth:.1f} GB/s (numpy sum of 512 MiB); load average before: {load:.2f}, after: "
             f"{os.getloadavg()[0]:.2f}; median of {rounds} interleaved rounds.", "",
             "w4a8: cpu_w4a8_linear.make_w4a8_gemv; w4a8-gemm: cpu_w4a8_linear.make_w4a8_gemm at M = 1; "
             "w4-f32: cpu_quant_linear.make_quant_gemv (decode today). MiB and GB/s count the packed codes and "
             "scales; times include quantizing x and the VM call. Hot: the same weights every call (cache-resident "
             f"but for the LM head); cold: each call reads another copy ({COLD_BYTES >> 20} MiB of copies). "
             "'vs base': the w4-f32 time / this time.", "", *DECODE_HEADER, *map(_decode_row, timings), "", *summary]
    if option_rows:
        lines += ["", "## GEMV variants", "",
                  "hi: odd codes kept in their high nibbles (word & 0xF0F0F0F0, one shift per group); shift: "
                  "(word >> 4) & 0x0F0F0F0F per word. pfN: software prefetch N words ahead (0: none). "
                  "'vs base': the first variant's time / this time.", "",
                  *DECODE_HEADER, *map(_decode_row, option_rows)]
    print("\n".join(summary))
    write_results(RESULTS.with_name(RESULTS.name + "_decode"),
                  {"threads": threads, "bandwidth_gb_s": bandwidth, "timings": timings, "gemv_options": option_rows},
                  "\n".join(lines), indent=1)


# ---- accuracy ----------------------------------------------------------------------------------

def _errors(x, w, group: int) -> dict:
    """Relative (Frobenius) errors: int8 activations vs f32 ones on the 4-bit weight; the 4-bit
    weight vs the f32 one (f32 activations); both vs neither."""
    import numpy as np

    from llmopt.codegen.kernels.cpu_w4a8_linear import w4a8_reference
    from llmopt.ir.quant_schemes import get_scheme

    packed, scales = _quantized(w, group)
    weight = get_scheme(f"w4g{group}").dequantize_packed(packed, scales, None, w.shape[1]).astype(np.float64)
    y_w4 = x.astype(np.float64) @ weight.T
    y_f32 = x.astype(np.float64) @ w.astype(np.float64).T
    y_w4a8 = w4a8_reference(x, packed, scales, group)
    return {"w4a8_vs_w4": float(np.linalg.norm(y_w4a8 - y_w4) / np.linalg.norm(y_w4)),
            "w4_vs_f32": float(np.linalg.norm(y_w4 - y_f32) / np.linalg.norm(y_f32)),
            "w4a8_vs_f32": float(np.linalg.norm(y_w4a8 - y_f32) / np.linalg.norm(y_f32))}


def synthetic_accuracy() -> list[dict]:
    import numpy as np

    rows = []
    for n, k in SHAPES:
        rng = np.random.default_rng(n + k)
        x = rng.standard_normal((M, k), dtype=np.float32)
        x[:, rng.choice(k, OUTLIERS, replace=False)] *= 20
        for group in GROUPS:
            rows.append({"data": "synthetic", "linear": f"{n}x{k}", "n": n, "k": k, "group": group,
                         **_errors(x, _random_weight(n, k), group)})
    return rows


def smollm2_accuracy() -> list[dict]:
    """The same errors on SmolLM2's weights and the inputs its linears see on 128 tokens of text;
    empty when the model folder is not cached."""
    from llmopt.frontend.zoo import SMOLLM2_FOLDER, cache_root

    folder = cache_root() / SMOLLM2_FOLDER
    if not (folder / "model.safetensors").exists() or not TEXT.exists():
        print(f"no SmolLM2 folder at {folder} (or no {TEXT}): real-data accuracy left out", flush=True)
        return []
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(TEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :M]
    inputs, hooks = {}, []
    for layer in LAYERS:
        block = model.model.layers[layer]
        for name, module in (("q_proj", block.self_attn.q_proj), ("k_proj", block.self_attn.k_proj),
                             ("o_proj", block.self_attn.o_proj), ("gate_up", block.mlp.gate_proj),
                             ("down_proj", block.mlp.down_proj)):
            def keep(_module, args, key=(layer, name)):
                inputs[key] = args[0][0].detach().numpy().astype(np.float32)
            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    rows = []
    for (layer, name), x in inputs.items():
        block = model.model.layers[layer]
        if name == "gate_up":
            w = torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight])
        else:
            w = dict(q_proj=block.self_attn.q_proj, k_proj=block.self_attn.k_proj, o_proj=block.self_attn.o_proj,
                     down_proj=block.mlp.down_proj)[name].weight
        w = w.detach().numpy().astype(np.float32)
        for group in GROUPS:
            rows.append({"data": "smollm2", "linear": f"L{layer}.{name} {w.shape[0]}x{w.shape[1]}", "n": w.shape[0],
                         "k": w.shape[1], "group": group, "layer": layer, **_errors(x, w, group)})
    return rows


# ---- report ------------------------------------------------------------------------------------

def _timing_row(r: dict) -> str:
    return (f"| {r['n']:>5} | {r['k']:>5} | {r['m']:>4} | w4g{r['group']:<3} | {r['variant']:<6} | "
            f"{r['seconds'] * 1e6:8.1f} | {r['gops']:6.1f} | {r['vs_w4_f32']:5.2f}x |")


def _tile_row(r: dict) -> str:
    return (f"| {r['n']:>5} | {r['k']:>5} | w4g{r['group']:<3} | {r['rows']} x {r['cols']} | "
            f"{r['seconds'] * 1e6:8.1f} | {r['gops']:6.1f} |")


def _accuracy_row(r: dict) -> str:
    return (f"| {r['data']} | {r['linear']} | w4g{r['group']} | {100 * r['w4a8_vs_w4']:.2f}% | "
            f"{100 * r['w4_vs_f32']:.2f}% | {100 * r['w4a8_vs_f32']:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tiles", action="store_true", help="also time w4a8's register tile choices")
    parser.add_argument("--m", type=int, choices=(1, M), default=M,
                        help=f"rows of x: {M} (prefill, the default) or 1 (decode: the GEMVs)")
    parser.add_argument("--gemv-options", action="store_true", help="with --m 1: also time the GEMV's variants")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    from llmopt.codegen.kernels.cpu_linear import host_cpu_target
    from llmopt.codegen.kernels.cpu_w4a8_linear import COLS, ROWS, has_vnni

    target = host_cpu_target(args.threads)
    if not has_vnni(target):
        raise SystemExit(f"{target.attrs['mcpu']} has no AVX-512 VNNI: nothing to compare")
    if args.m == 1:
        decode(target, args.threads, args.rounds, args.gemv_options)
        return
    load = os.getloadavg()[0]
    timing_header = ["| N | K | M | weight | kernel | us | GOP/s | vs w4-f32 |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(timing_header), flush=True)
    timings = measure(target, args.rounds)
    tiles = []
    if args.tiles:
        print("| N | K | weight | tile | us | GOP/s |\n|---|---|---|---|---|---|", flush=True)
        tiles = measure_tiles(target, args.rounds)
    accuracy = synthetic_accuracy() + smollm2_accuracy()
    lines = [f"# W4A8 GEMM (int8 activations x 4-bit weights, VNNI) vs the int4 f32 path, M = {M}", "",
             f"{args.threads} thread(s), {target.attrs['mcpu']} ({platform.machine()}), w4a8 tile {ROWS} x {COLS}; "
             f"load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}; median of {args.rounds} "
             "interleaved rounds.", "",
             "w4a8: codegen/kernels/cpu_w4a8_linear.py; w4-f32: cpu_quant_linear.make_quant_gemm (the "
             "int4 prefill kernel today); f32: cpu_linear on the fp32 weight. GOP/s = 2 M N K / time "
             "(w4a8's time includes quantizing x).", "", *timing_header, *map(_timing_row, timings)]
    summary = []
    for group in GROUPS:
        ratios = [r["vs_w4_f32"] for r in timings if r["variant"] == "w4a8" and r["group"] == group]
        summary.append(f"- w4g{group}: w4a8 runs {min(ratios):.2f}x to {max(ratios):.2f}x as fast as w4-f32 "
                       f"(geometric mean {statistics.geometric_mean(ratios):.2f}x)")
    for data in ("synthetic", "smollm2"):
        for group in GROUPS:
            rows = [r for r in accuracy if r["data"] == data and r["group"] == group]
            if rows:
                mean = {key: 100 * statistics.fmean(r[key] for r in rows)
                        for key in ("w4a8_vs_w4", "w4_vs_f32", "w4a8_vs_f32")}
                summary.append(f"- {data} w4g{group}: int8 activations add {mean['w4a8_vs_w4']:.2f}% (mean); the "
                               f"error vs the f32 linear goes from {mean['w4_vs_f32']:.2f}% to "
                               f"{mean['w4a8_vs_f32']:.2f}%")
    lines += ["", *summary]
    if tiles:
        lines += ["", "## w4a8 register tiles (rows x output channels)", "",
                  "| N | K | weight | tile | us | GOP/s |", "|---|---|---|---|---|---|", *map(_tile_row, tiles)]
    lines += ["", "## Accuracy", "",
              "Relative error (Frobenius norm) of the output: int8 activations vs f32 activations on the "
              "same 4-bit weight (the cost of W4A8); the 4-bit weight vs the f32 weight, f32 activations (the "
              "cost of 4-bit weights, for scale); and W4A8 vs the f32 linear (both costs). Synthetic: "
              f"x ~ N(0, 1) with {OUTLIERS} channels x20, W ~ N(0, 1). "
              "SmolLM2: real weights, the linear's real input on 128 tokens of Pride and Prejudice.", "",
              "| data | linear | weight | w4a8 vs w4 | w4 vs f32 | w4a8 vs f32 |", "|---|---|---|---|---|---|",
              *map(_accuracy_row, accuracy)]
    print("\n".join(summary))
    write_results(RESULTS, {"timings": timings, "tiles": tiles, "accuracy": accuracy}, "\n".join(lines), indent=1)


if __name__ == "__main__":
    main()
