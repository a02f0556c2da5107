"""Structured pruning (``prune-structured``) of SmolLM2-135M at 20% of the decoder layers' linear
parameters: dense vs FLaP vs Wanda-SP CPU artifacts.

- **Size**: decoder linear weight parameters (from the per-layer shapes the manifest records), all
  model parameters (those plus the tied embedding and the norms), weight shard bytes and artifact bytes.
- **Quality**: perplexity on Persuasion, ``--context``-token non-overlapping windows over the first
  ``--tokens`` tokens (the dense model measured in the same run; calibration on Pride and Prejudice
  with ``--samples`` windows of ``--seq-len`` tokens), next to the published 20%-pruned LLaMA-7B
  WikiText-2 ratios (pruned / dense) of FLaP, LLM-Pruner and Wanda-SP.
- **Speed**: each artifact in its own child process with ``TVM_NUM_THREADS=1``
  (``llmopt.runtime.speed``: warm-up, then ``--repeats`` runs of a ``--prompt``-token prefill and
  ``--decode-tokens`` greedy decode steps; decode tok/s = 1 / the median step); ``--rounds`` rounds in
  alternating order, the median over rounds; speedups are the median over rounds of the ratio to the
  dense artifact within the round (paired, so load drift between rounds cancels). The load average
  is recorded before and after.

Results go to ``bench/results/structured_prune_smollm2.json`` and ``.md`` (``--markdown-only``
re-renders the ``.md`` from the ``.json``).

    python bench/bench_structured_prune.py [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from results_files import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "structured_prune_smollm2"
TEXT = Path("/work/shared/data/austen/persuasion.txt")
METHODS = {"dense": None, "flap": "flap:0.2", "wanda-sp": "wanda-sp:0.2"}

# LLaMA-7B, 20% of the parameters pruned, no retraining unless noted; WikiText-2 perplexity as the FLaP
# paper reports it (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models",
# AAAI 2024, arXiv 2312.11983, Table 1; the same figures are quoted in arXiv 2402.01799, Table 1).
PUBLISHED = {"dense": 12.62, "flap": 14.62, "wanda-sp": 22.12, "llm-pruner": 19.77, "llm-pruner + LoRA": 17.37}
PUBLISHED_SOURCE = ("FLaP paper (An et al., AAAI 2024, arXiv 2312.11983) Table 1: LLaMA-7B, WikiText-2, 20% pruned; "
                    "quoted again in arXiv 2402.01799 Table 1. Not in /work/shared: found through the search tools.")


def build_artifacts(workdir: Path, calibration: tuple) -> tuple[dict[str, Path], dict[str, float]]:
    from llmopt.compiler import BuildOptions, build

    paths, seconds = {}, {}
    for name, prune in METHODS.items():
        paths[name] = workdir / name
        if (paths[name] / "manifest.json").exists():
            print(f"reusing {paths[name]}", flush=True)
            continue
        print(f"building {name} ({prune or 'no pruning'})...", flush=True)
        start = time.perf_counter()
        build("smollm2", paths[name], BuildOptions(prune=prune, calibration=calibration if prune else ()))
        seconds[name] = round(time.perf_counter() - start, 1)
    return paths, seconds


def sizes(path: Path) -> dict:
    from llmopt.runtime.manifest import read_manifest

    manifest = read_manifest(path)
    model = manifest.model
    h, d, vocab = model["hidden_size"], model["head_dim"], model["vocab_size"]
    layers = model.get("layers") or [{"num_heads": model["num_heads"], "num_kv_heads": model["num_kv_heads"],
                                      "intermediate_size": model["intermediate_size"]}] * model["num_layers"]
    linear = sum(2 * h * d * (l["num_heads"] + l["num_kv_heads"]) + 3 * h * l["intermediate_size"] for l in layers)
    other = vocab * h * (1 if model["tie_word_embeddings"] else 2) + h * (2 * len(layers) + 1)
    return {"decoder_linear_params": linear, "params": manifest.created_by.get("parameters", linear + other),
            "weight_bytes": sum(f.stat().st_size for f in (path / "weights").iterdir()),
            "artifact_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "kv_heads_per_layer": [l["num_kv_heads"] for l in layers],
            "intermediate_per_layer": [l["intermediate_size"] for l in layers]}


def quality(paths: dict[str, Path], context: int, tokens: int) -> dict:
    from llmopt.runtime import load
    from llmopt.runtime.perplexity import perplexity

    result = {}
    for name, path in paths.items():
        model = load(path)
        ids = model.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
        measured = perplexity(model.forward_logits, ids, context, tokens)
        print(f"{name}: {measured.describe()}", flush=True)
        result[name] = {"perplexity": measured.perplexity, "scored_tokens": measured.scored}
    return result


def speed(paths: dict[str, Path], prompt: int, decode_tokens: int, rounds: int, repeats: int) -> dict:
    from llmopt.runtime import load
    from llmopt.runtime.speed import interleaved_rounds

    tokenizer = load(paths["dense"]).tokenizer
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8")[:200_000], add_bos=False)[:prompt]
    return interleaved_rounds(paths, ids, decode_tokens, rounds, repeats, log=lambda line: print(line, flush=True))


def paired_speedup(speed: dict, name: str, key: str) -> float:
    """Median over rounds of ``name``'s tok/s over the dense artifact's in the same round."""
    return statistics.median(a / b for a, b in zip(speed[name][f"{key}_rounds"], speed["dense"][f"{key}_rounds"]))


def markdown(result: dict) -> str:
    q, s, z, setup = result["quality"], result["speed"], result["sizes"], result["setup"]
    dense = q["dense"]["perplexity"]
    lines = ["# Structured pruning of SmolLM2-135M (20% of the decoder linear parameters), CPU", "",
             f"Perplexity: Persuasion, {setup['context']}-token windows over the first {setup['tokens']} tokens; "
             f"calibration: Pride and Prejudice, {setup['samples']} x {setup['seq_len']} tokens. Speed: 1 thread, "
             f"{setup['prompt']}-token prompt, {setup['decode_tokens']} decode steps x {setup['repeats']} repeats, "
             f"median of {setup['rounds']} interleaved rounds. Load average (1 min) "
             f"{setup['load_before'][0]:.2f} before, {setup['load_after'][0]:.2f} after, on {setup['cpus']} CPUs "
             "(a shared machine).", "",
             "| model | perplexity | x dense | decoder linear params | params | weight MiB | artifact MiB "
             "| decode tok/s | speedup | prefill tok/s | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        p, sp = q[name]["perplexity"], s[name]
        lines.append(f"| {name} | {p:.3f} | {p / dense:.3f} | {z[name]['decoder_linear_params'] / 1e6:.2f} M "
                     f"({1 - z[name]['decoder_linear_params'] / z['dense']['decoder_linear_params']:.1%} removed) | "
                     f"{z[name]['params'] / 1e6:.2f} M | {z[name]['weight_bytes'] / 2**20:.1f} | "
                     f"{z[name]['artifact_bytes'] / 2**20:.1f} | {sp['decode_tok_s']:.2f} | "
                     f"{paired_speedup(s, name, 'decode_tok_s'):.3f} | {sp['prefill_tok_s']:.1f} | "
                     f"{paired_speedup(s, name, 'prefill_tok_s'):.3f} |")
    bound = {name: z["dense"]["params"] / z[name]["params"] for name in ("flap", "wanda-sp")}
    lines += ["", "tok/s: median over rounds; speedup: median over rounds of the ratio to dense within a round. "
              "A decode step reads every weight once, so the parameter ratio bounds a memory-bound decode's "
              f"speedup: {bound['flap']:.3f} (flap), {bound['wanda-sp']:.3f} (wanda-sp); the machine's load makes "
              "single rounds vary by far more. Per round (decode / prefill tok/s):", ""]
    for name in METHODS:
        rounds = zip(s[name]["decode_tok_s_rounds"], s[name]["prefill_tok_s_rounds"])
        lines.append(f"- {name}: " + ", ".join(f"{d:.2f} / {p:.1f}" for d, p in rounds))
    lines += ["", "Per-layer shapes (kv heads of 3; MLP channels of 1536):", ""]
    for name in ("flap", "wanda-sp"):
        lines.append(f"- {name}: kv heads {z[name]['kv_heads_per_layer']}; "
                     f"channels {z[name]['intermediate_per_layer']}")
    pub = PUBLISHED
    ours = {"flap": q["flap"]["perplexity"] / dense, "wanda-sp": q["wanda-sp"]["perplexity"] / dense}
    lines += ["", "Perplexity ratio pruned / dense at 20%, ours (SmolLM2-135M, Persuasion) vs published (LLaMA-7B, "
              "WikiText-2):", "", "| method | ours | published LLaMA-7B |", "|---|---|---|",
              f"| FLaP | {ours['flap']:.3f} | {pub['flap'] / pub['dense']:.3f} ({pub['flap']} / {pub['dense']}) |",
              f"| Wanda-SP | {ours['wanda-sp']:.3f} | {pub['wanda-sp'] / pub['dense']:.3f} "
              f"({pub['wanda-sp']} / {pub['dense']}) |",
              f"| LLM-Pruner (no tuning) | - | {pub['llm-pruner'] / pub['dense']:.3f} ({pub['llm-pruner']} / "
              f"{pub['dense']}) |",
              f"| LLM-Pruner + LoRA | - | {pub['llm-pruner + LoRA'] / pub['dense']:.3f} "
              f"({pub['llm-pruner + LoRA']} / {pub['dense']}) |", "", f"Published: {PUBLISHED_SOURCE} "
              "A 135M model has far less redundancy than a 7B one, so larger ratios are expected; the order "
              "(FLaP well ahead of Wanda-SP) is what carries over."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", help="build the artifacts into this directory and keep them (reused if there)")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the .md from the .json")
    args = parser.parse_args()
    if args.markdown_only:
        RESULTS.with_suffix(".md").write_text(markdown(json.loads(RESULTS.with_suffix(".json").read_text())))
        print(RESULTS.with_suffix(".md").read_text())
        return
    setup = {k: getattr(args, k) for k in ("samples", "seq_len", "context", "tokens", "prompt", "decode_tokens",
                                           "rounds", "repeats")}
    setup.update(load_before=os.getloadavg(), cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        paths, seconds = build_artifacts(workdir, (("samples", str(args.samples)), ("seq_len", str(args.seq_len))))
        result = {"setup": setup, "build_seconds": seconds, "sizes": {n: sizes(p) for n, p in paths.items()},
                  "quality": quality(paths, args.context, args.tokens),
                  "speed": speed(paths, args.prompt, args.decode_tokens, args.rounds, args.repeats),
                  "published_llama7b_wikitext2": {**PUBLISHED, "source": PUBLISHED_SOURCE}}
    setup["load_after"] = os.getloadavg()
    print(markdown(result))
    write_results(RESULTS, result, markdown(result))


if __name__ == "__main__":
    main()
