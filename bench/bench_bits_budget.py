"""Mixed-precision plans (``--bits-budget``) against uniform quantization on SmolLM2-135M.

Measures the sensitivity table once (``measure_sensitivity`` on the graph the quantization pass
sees: ``fuse-linears, fold-constants``; calibration windows of Pride and Prejudice), plans each
budget from it (``choose_schemes``), builds one CPU artifact per variant with RTN
(``llmopt.compiler.build``, the plan as ``quant_rules``) and reports its perplexity on
Persuasion (``llmopt.runtime.perplexity``: the first ``--tokens`` tokens, windows of
``--context``), with the average bits per weight over the planned linears (the LM head stays
float and is not counted; a linear a uniform scheme cannot quantize counts as 32 bits). Variants:
fp32, each ``--uniform`` scheme, each ``--budgets`` plan (KL-probed gains), and the same plans
ranked by relative output error alone (``probe=None``). Writes
``bench/results/bits_budget_smollm2.{json,md}``.

    python bench/bench_bits_budget.py [--budgets 4.25,4.5] [--uniform w4g128,w4g64,w3g64]
        [--samples 8] [--probe-samples 1] [--table table.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bits_budget_smollm2"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen" / "persuasion.txt"


def measure(module, samples: int, probe_samples: int, cache: Path | None):
    """The sensitivity table (read from / written to ``cache`` when given)."""
    from llmopt.passes.quant.calibration import calibration_tokens
    from llmopt.passes.quant.mixed_precision import LayerSensitivity, SensitivityTable, measure_sensitivity
    if cache is not None and cache.is_file():
        return SensitivityTable(tuple(LayerSensitivity(**layer) for layer in json.loads(cache.read_text())))
    tokens = calibration_tokens(module, samples=samples, seq_len=256)
    start = time.perf_counter()
    table = measure_sensitivity(module, tokens, probe_samples=probe_samples)
    print(f"measured {len(table.layers)} linears in {time.perf_counter() - start:.0f} s")
    if cache is not None:
        cache.write_text(json.dumps([dataclasses.asdict(layer) for layer in table.layers]))
    return table


def uniform_bits(table, scheme: str) -> float:
    """Average bits per weight of ``scheme`` over the planned linears (32 where it does not fit)."""
    from llmopt.ir.quant_schemes import get_scheme
    from llmopt.passes.quant.mixed_precision import bits_per_weight
    found = get_scheme(scheme)
    bits = [bits_per_weight(found, l.in_features) if found.supports(l.in_features) else 32.0 for l in table.layers]
    return sum(b * l.params for b, l in zip(bits, table.layers)) / sum(l.params for l in table.layers)


def perplexity_of(options, ids, context: int, tokens: int, out: Path) -> float:
    from llmopt.compiler import build
    from llmopt.runtime import load
    from llmopt.runtime.perplexity import perplexity
    build("smollm2", out, options)
    return perplexity(load(out).forward_logits, ids, context, tokens).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="4.25,4.5")
    parser.add_argument("--uniform", default="w4g128,w4g64,w3g64")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of 256 tokens")
    parser.add_argument("--probe-samples", type=int, default=1, help="windows the KL probe runs on")
    parser.add_argument("--table", type=Path, default=None, help="cache the sensitivity table in this JSON file")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    import torch  # noqa: F401  (torch before tvm)
    from rich.console import Console
    from rich.table import Table
    from tokenizers import Tokenizer

    from llmopt.compiler import BuildOptions, load
    from llmopt.passes import PassManager, build_pipeline
    from llmopt.passes.quant.mixed_precision import SensitivityTable, choose_schemes

    module = load("smollm2")
    fused = PassManager(build_pipeline("fuse-linears,fold-constants")).run(module)  # what quantization sees
    table = measure(fused, args.samples, args.probe_samples, args.table)
    unprobed = SensitivityTable(tuple(dataclasses.replace(layer, gain=1.0) for layer in table.layers))
    ids = Tokenizer.from_file(module.meta["tokenizer"]["file"]).encode(TEXT.read_text(encoding="utf-8")).ids

    variants = [("fp32", 32.0, BuildOptions(), "")]
    variants += [(f"uniform {s}", uniform_bits(table, s), BuildOptions(quant=s), "") for s in args.uniform.split(",")]
    for budget in (float(b) for b in args.budgets.split(",")):
        for label, source in (("plan", table), ("plan, relative error only", unprobed)):
            plan = choose_schemes(source, budget)
            counts = {}
            for layer in plan.layers:
                counts[layer.scheme] = counts.get(layer.scheme, 0) + 1
            mix = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda item: -item[1]))
            variants.append((f"{label} @ {budget}", plan.bits_per_weight,
                             BuildOptions(quant="w4g128", quant_rules=plan.rules()), mix))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, bits, options, mix) in enumerate(variants):
            start = time.perf_counter()  # a directory per artifact: a process keeps each library path it loaded
            ppl = perplexity_of(options, ids, args.context, args.tokens, Path(tmp) / f"artifact{index}")
            rows.append({"variant": name, "bits_per_weight": round(bits, 4), "perplexity": round(ppl, 3), "mix": mix})
            print(f"{name}: {bits:.3f} bits/weight, perplexity {ppl:.3f} ({time.perf_counter() - start:.0f} s)")

    result = {"model": "smollm2 (SmolLM2-135M)", "text": TEXT.name, "tokens": args.tokens, "context": args.context,
              "calibration": f"{args.samples} x 256 tokens of pride_and_prejudice.txt, KL probe on "
                             f"{args.probe_samples} window(s)",
              "bits_counted": "planned linear weights; the LM head (tied embedding) stays float and is not counted",
              "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# --bits-budget on {result['model']}", "",
             f"Perplexity on {TEXT.name} (first {args.tokens} tokens, context {args.context}); calibration: "
             f"{result['calibration']}; bits/weight over the {result['bits_counted']}.", "",
             "| variant | bits/weight | perplexity | mix |", "|---|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['mix']} |" for r in rows]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shown = Table(title=lines[0][2:])
    for column in ("variant", "bits/weight", "perplexity", "mix"):
        shown.add_column(column)
    for r in rows:
        shown.add_row(r["variant"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}", r["mix"])
    Console(width=160).print(shown)


if __name__ == "__main__":
    main()
