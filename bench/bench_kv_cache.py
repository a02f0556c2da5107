"""The int8 KV cache (``quantize-kv-cache``) against the f32 one on SmolLM2-135M.

Two CPU artifacts of the same model, ``--quant`` (default ``w4g128``; ``none``: f32 weights): with
an f32 cache and with ``--kv-cache int8`` (int8 codes + one f32 scale per token and kv head, which
decode's attention reads directly). Built into a temporary directory unless ``--f32`` / ``--int8``
name existing ones.

- **Agreement.** For each prompt (``--prompts`` windows of ``--prompt-tokens`` tokens from
  Persuasion), ``--new-tokens`` greedy tokens from each artifact: how many leading tokens agree.
- **Drift.** Teacher-forced on the f32 artifact's greedy tokens (so both see the same sequence),
  the max |logit difference| over the prefill and every decode step, and how often the argmax differs.
- **Cache bytes per token**: the cache tensors' bytes / the cache length.
- **Decode speed** after a ``--long-prompt``-token prompt: each artifact in its own child process
  with ``TVM_NUM_THREADS=1`` (``llmopt.runtime.speed``: warm-up, then ``--decode-tokens`` greedy
  steps, decode tok/s = 1 / the median step time); ``--rounds`` rounds in alternating order, the
  median over rounds.

Results go to ``bench/results/kv_cache_smollm2.json`` and ``.md``.

    python bench/bench_kv_cache.py [--quant w4g128] [--f32 DIR] [--int8 DIR] [--rounds 3] [--long-prompt 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from llmopt.runtime.speed import interleaved_rounds
from results_files import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache_smollm2"
TEXT = Path("/work/shared/data/austen/persuasion.txt")
CACHES = ("f32", "int8")


def build_artifacts(given: dict[str, str | None], workdir: Path, quant: str | None) -> dict[str, Path]:
    from llmopt.compiler import BuildOptions, build
    from llmopt.frontend.hf_folder import load_hf_folder
    from llmopt.frontend.zoo import smollm2_hf_folder

    paths = {}
    for name in CACHES:
        if given[name]:
            paths[name] = Path(given[name])
            continue
        paths[name] = workdir / name
        print(f"building the {name}-cache artifact (--quant {quant})...", flush=True)
        build(load_hf_folder(smollm2_hf_folder()), paths[name], BuildOptions(quant=quant, kv_cache=name))
    return paths


def text_ids(tokenizer, count: int) -> list[int]:
    return tokenizer.encode(TEXT.read_text(encoding="utf-8")[:200_000], add_bos=False)[:count]


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    logits, cache = model.prefill(np.array(prompt))
    tokens = [int(np.argmax(logits))]
    while len(tokens) < new_tokens:
        logits, cache = model.decode(tokens[-1], cache)
        tokens.append(int(np.argmax(logits)))
    return tokens


def forced_logits(model, prompt: list[int], tokens: list[int]) -> tuple[np.ndarray, object]:
    """Logits of the prefill and of a decode of each of ``tokens[:-1]``; and the last cache."""
    logits, cache = model.prefill(np.array(prompt))
    rows = [logits]
    for token in tokens[:-1]:
        logits, cache = model.decode(token, cache)
        rows.append(logits)
    return np.stack(rows), cache


def cache_bytes_per_token(cache) -> float:
    """Bytes of one row of every cache tensor (the buffers have room for more rows than they hold)."""
    return sum(t.numpy().nbytes / t.shape[1] for t in cache.tensors)


def accuracy(paths: dict[str, Path], prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    from llmopt.runtime import load

    models = {name: load(path) for name, path in paths.items()}
    ids = text_ids(models["f32"].tokenizer, prompts * 1000)
    windows = [ids[i * 1000: i * 1000 + prompt_tokens] for i in range(prompts)]
    rows = []
    for prompt in windows:
        runs = {name: greedy(model, prompt, new_tokens) for name, model in models.items()}
        agree = next((i for i, (a, b) in enumerate(zip(runs["f32"], runs["int8"])) if a != b), new_tokens)
        forced = {name: forced_logits(model, prompt, runs["f32"]) for name, model in models.items()}
        diff = np.abs(forced["int8"][0] - forced["f32"][0])
        argmax_differs = int((forced["int8"][0].argmax(-1) != forced["f32"][0].argmax(-1)).sum())
        rows.append({"prompt": models["f32"].tokenizer.decode(prompt[:12]) + "...", "equal_leading_tokens": agree,
                     "identical": agree == new_tokens, "max_abs_logit_diff": float(diff.max()),
                     "mean_abs_logit_diff": float(diff.mean()), "argmax_differs_steps": argmax_differs,
                     "logit_range": float(np.abs(forced["f32"][0]).max()),
                     "cache_bytes_per_token": {n: cache_bytes_per_token(f[1]) for n, f in forced.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prompts": rows}


def speed(paths: dict[str, Path], long_prompt: int, decode_tokens: int, rounds: int, repeats: int) -> dict:
    from llmopt.runtime import load

    ids = text_ids(load(paths["f32"]).tokenizer, long_prompt)
    runs = interleaved_rounds(paths, ids, decode_tokens, rounds, repeats, log=lambda line: print(line, flush=True))
    return runs | {"prompt_tokens": long_prompt, "decode_tokens": decode_tokens, "threads": 1, "rounds": rounds,
                   "repeats_per_round": repeats}


def markdown(result: dict) -> str:
    acc, spd = result["accuracy"], result["speed"]
    lines = [f"# int8 vs f32 KV cache, SmolLM2-135M ({result.get('quant', 'none')} weights), CPU", "",
             f"Greedy {acc['new_tokens']} tokens after {acc['prompt_tokens']}-token Persuasion windows; logit "
             "differences teacher-forced on the f32 artifact's tokens.", "",
             "| prompt | equal leading tokens | max abs logit diff | mean abs logit diff | argmax differs "
             "| max abs logit | cache B/token f32 | int8 |", "|---|---|---|---|---|---|---|---|"]
    for row in acc["prompts"]:
        b = row["cache_bytes_per_token"]
        lines.append(f"| {row['prompt']!r} | {row['equal_leading_tokens']}/{acc['new_tokens']} | "
                     f"{row['max_abs_logit_diff']:.3g} | {row['mean_abs_logit_diff']:.3g} | "
                     f"{row['argmax_differs_steps']} | {row['logit_range']:.3g} | {b['f32']:.0f} | {b['int8']:.0f} |")
    lines += ["", f"Decode after a {spd['prompt_tokens']}-token prompt, 1 thread, median of {spd['rounds']} rounds "
              f"({spd['decode_tokens']} steps x {spd['repeats_per_round']} repeats each):", "",
              "| cache | decode tok/s | prefill tok/s | peak RSS MiB |", "|---|---|---|---|"]
    for name in CACHES:
        s = spd[name]
        lines.append(f"| {name} | {s['decode_tok_s']:.2f} | {s['prefill_tok_s']:.1f} | {s['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="w4g128", help="the weights' --quant scheme of both artifacts (none: f32)")
    parser.add_argument("--f32", help="an existing f32-cache artifact")
    parser.add_argument("--int8", help="an existing int8-cache artifact")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", help="build the artifacts into this directory and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        quant = None if args.quant == "none" else args.quant
        paths = build_artifacts({"f32": args.f32, "int8": args.int8}, workdir, quant)
        result = {"quant": quant or "none", "accuracy": accuracy(paths, args.prompts, args.prompt_tokens, args.new_tokens),
                  "speed": speed(paths, args.long_prompt, args.decode_tokens, args.rounds, args.repeats)}
    print(markdown(result))
    write_results(RESULTS, result, markdown(result))


if __name__ == "__main__":
    main()
