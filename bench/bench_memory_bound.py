"""Peak memory of an int4 build: it must stream the model block by block, not hold it whole.

    python bench/bench_memory_bound.py [--shape 13b|7b|1b|tiny] [--out DIR] [--keep]

Generates a random fp16 Llama of the given shape as a Hugging Face folder (config.json, a
word-level tokenizer.json of the model's vocabulary, one safetensors shard per layer, written in
chunks so that generating it stays small), builds it to int4 (``--quant w4g128``: round-to-nearest,
``lm_head`` kept in float as the default rules do) in a child process, and reads that child's
peak RSS (``VmHWM`` of /proc/self/status at the end of the build). Writes
``bench/results/memory_bound_<shape>.{json,md}``: bytes of the model on disk and of the artifact,
build seconds, peak RSS, one decoder block's fp16 and f32 bytes and peak / block. The generated
model and the artifact go under ``--out`` (default: a temporary folder) and are deleted at the end
unless ``--keep``.

The functions ``llama_config``, ``write_random_llama`` and ``build_in_child`` are also used by
``tests/reliability/test_reliability_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
}

CHUNK_ELEMENTS = 1 << 24  # 16 Mi values (64 MiB of f32) generated at a time


def llama_config(shape: str = "tiny", **overrides) -> dict:
    """A Hugging Face LlamaForCausalLM config of one of ``SHAPES`` (``overrides`` change its keys)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            **SHAPES[shape], **overrides}


def block_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The weights of decoder block 0 (names relative to ``model.layers.0.``) and their shapes."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter)}


def block_parameters(config: dict) -> int:
    return sum(int(np.prod(shape)) for shape in block_shapes(config).values())


def model_parameters(config: dict) -> int:
    embed = config["vocab_size"] * config["hidden_size"]
    head = 0 if config["tie_word_embeddings"] else embed
    return embed + head + config["hidden_size"] + config["num_hidden_layers"] * block_parameters(config)


def _shard_tensors(config: dict) -> list[dict[str, tuple[int, ...]]]:
    """Tensor name -> shape per shard: the embedding, one shard per layer, then the final norm and head."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    shards = [{"model.embed_tokens.weight": (vocab, h)}]
    for i in range(config["num_hidden_layers"]):
        shards.append({f"model.layers.{i}.{name}": shape for name, shape in block_shapes(config).items()})
    shards.append({"model.norm.weight": (h,),
                   **({} if config["tie_word_embeddings"] else {"lm_head.weight": (vocab, h)})})
    return shards


def _write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """Write random fp16 ``tensors`` as a safetensors file, generating CHUNK_ELEMENTS values at a
    time (norm weights near 1, matrices N(0, 0.02)). Returns the file's size."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors.items():
            left = int(np.prod(shape))
            while left:
                n = min(left, CHUNK_ELEMENTS)
                values = rng.standard_normal(n, dtype=np.float32)
                values *= 0.1 if "norm" in name else 0.02
                if "norm" in name:
                    values += 1.0
                f.write(values.astype(np.float16).tobytes())
                left -= n
    return path.stat().st_size


def _word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly ``vocab_size`` tokens (``w0`` ... ``w<vocab-1>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def write_random_llama(folder: str | Path, config: dict, seed: int = 0) -> int:
    """A random fp16 Llama HF folder for ``config`` in ``folder``; returns its weights' bytes on disk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _word_tokenizer(folder / "tokenizer.json", config["vocab_size"])
    rng = np.random.default_rng(seed)
    shards = _shard_tensors(config)
    index, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(folder / name, tensors, rng)
        index.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return total


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _child_build(model: str, out: str, quant: str) -> None:
    """In the child: build, then print the timings and the peak RSS as one JSON line."""
    from llmopt.compiler import BuildOptions, build
    from llmopt.runtime.speed import peak_rss_mib
    peaks = {}

    def report(line: str) -> None:  # the peak so far at the end of each step
        if line.endswith(" s") and ":" in line:
            peaks[line.split(":")[0]] = round(peak_rss_mib(), 1)

    start = time.perf_counter()
    build(model, out, BuildOptions(quant=quant), report=report)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
                      "peak_rss_mib_after": peaks}))


def build_in_child(model: str | Path, out: str | Path, quant: str = "w4g128", timeout: float | None = None,
                   env: dict | None = None) -> dict:
    """Build ``model`` into ``out`` in a fresh Python process; its seconds and peak RSS (MiB)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(model), str(out), quant],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the build of {model} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _markdown(result: dict) -> str:
    mib = 1 << 20
    c = result["config"]
    rows = [("model on disk (fp16)", f"{result['model_bytes'] / mib:,.0f} MiB"),
            ("model as f32", f"{result['model_f32_bytes'] / mib:,.0f} MiB"),
            ("artifact", f"{result['artifact_bytes'] / mib:,.0f} MiB"),
            ("build seconds", f"{result['build_seconds']:,.1f}"),
            ("peak RSS of the build", f"{result['peak_rss_mib']:,.0f} MiB"),
            ("one block, fp16", f"{result['block_fp16_bytes'] / mib:,.0f} MiB"),
            ("one block, f32", f"{result['block_f32_bytes'] / mib:,.0f} MiB"),
            ("embedding (= LM head), f32", f"{result['table_f32_bytes'] / mib:,.0f} MiB"),
            ("peak RSS / one f32 block", f"{result['peak_over_block_f32']:.2f}"),
            ("peak RSS at the end of the compile step (no weight read yet)", f"{result['compile_peak_rss_mib']:,.0f} MiB"),
            ("(peak - that) / one f32 block", f"{result['weights_peak_over_block_f32']:.2f}"),
            ("peak RSS / model as f32", f"{result['peak_over_model_f32']:.3f}")]
    steps = ", ".join(f"{k} {v:,.0f}" for k, v in result["peak_rss_mib_after"].items())
    return "\n".join([
        f"# Memory bound of an int4 build: {result['shape']} shape",
        "",
        f"Random fp16 Llama, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads ({c['num_key_value_heads']} kv), "
        f"vocab {c['vocab_size']}; {result['parameters'] / 1e6:,.1f} M parameters. Built with "
        f"`BuildOptions(quant=\"{result['quant']}\")` (lm_head kept float) in a child process; peak RSS is its "
        f"VmHWM. Machine: {result['machine']}. No weight is read before the write step, so the peak at the "
        "end of the compile step is the fixed cost (Python, torch, TVM, compilation); what the write step "
        "adds is what streaming the weights costs.",
        "",
        "| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows],
        "",
        f"Peak RSS (MiB) at the end of each build step: {steps}.",
        "",
        f"Generated {result['date']} by `python bench/bench_memory_bound.py --shape {result['shape']}`.",
        ""])


def _machine() -> str:
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:")), 0)
    return f"{os.cpu_count()} CPUs, {mem / (1 << 20):.0f} GiB RAM"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", help="folder for the generated model and the artifact (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the artifact")
    parser.add_argument("--quant", default="w4g128")
    args = parser.parse_args(argv)

    config = llama_config(args.shape)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmopt-memory-"))
    model, artifact = work / f"llama-{args.shape}-fp16", work / f"llama-{args.shape}-{args.quant}"
    try:
        start = time.perf_counter()
        model_bytes = write_random_llama(model, config)
        print(f"generated {model} ({model_bytes / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
        built = build_in_child(model, artifact, args.quant)
        block, params = block_parameters(config), model_parameters(config)
        result = {
            "shape": args.shape, "config": config, "quant": args.quant, "parameters": params,
            "model_bytes": model_bytes, "model_f32_bytes": 4 * params, "artifact_bytes": tree_bytes(artifact),
            "build_seconds": built["seconds"], "peak_rss_mib": built["peak_rss_mib"],
            "peak_rss_mib_after": built["peak_rss_mib_after"],
            "block_fp16_bytes": 2 * block, "block_f32_bytes": 4 * block,
            "table_f32_bytes": 4 * config["vocab_size"] * config["hidden_size"],
            "compile_peak_rss_mib": built["peak_rss_mib_after"]["compile"],
            "weights_peak_over_block_f32":
                (built["peak_rss_mib"] - built["peak_rss_mib_after"]["compile"]) * (1 << 20) / (4 * block),
            "peak_over_block_f32": built["peak_rss_mib"] * (1 << 20) / (4 * block),
            "peak_over_model_f32": built["peak_rss_mib"] * (1 << 20) / (4 * params),
            "machine": _machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(artifact, ignore_errors=True)
            if not args.out:
                shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"memory_bound_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"memory_bound_{args.shape}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child_build(*sys.argv[2:])
    else:
        main()
