"""``llmopt eval MODEL --compare SPECS``: one model built in several compressed variants, side by side.

Every variant is built from the same traced model: ``fp32`` without compression (always there,
always first); any other spec is ``+``-joined steps, each ``prune=METHOD:LEVEL`` (``--prune``),
``lowrank=METHOD:RATIO[:ALLOCATION]`` (``--lowrank``), ``dtype=fp16`` (``--dtype``), ``act=int8``
(``--activations``), ``kv=int8`` (``--kv-cache``) or a ``--quant``
spec (``quant=`` optional), e.g. ``w4g128``, ``prune=wanda:0.5+w4g128``, ``lowrank=asvd:0.2+w8``,
``dtype=fp16``. Per variant:

- parameters: what the weights stand for (``ir.parameters``: a quantized weight counts its
  dequantized values, factors and structurally pruned layers their smaller shapes, zeros of
  unstructured pruning count);
- weight bytes: the artifact's weight shard files; bytes/param divides them by the number of
  values the fp32 artifact stores; artifact bytes: all of the artifact's files;
- peak RSS, prefill and decode tok/s: measured in a child process per variant with ``threads``
  threads (``llmopt.runtime.speed``), on the first ``prompt_tokens`` tokens of the text;
- perplexity (``runtime.perplexity``, the same windows for every variant) and, from the same pass
  of logits, KL(p_fp32 || p_variant) of the next-token distribution and how often the two agree
  on the most likely token, both averaged over the scored positions. The fp32 log-probabilities
  of every scored position stay in memory meanwhile (``tokens x vocab`` float32s).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .compiler import ACTIVATIONS, KV_CACHES
from .errors import LLMOptError
from .runtime.perplexity import Perplexity, log_softmax, perplexity

BASELINE = "fp32"
MAX_REFERENCE_BYTES = 4 << 30  # the fp32 log-probabilities kept for the KL


@dataclass(frozen=True)
class CompareSettings:
    text: str
    context: int = 256
    max_tokens: int | None = 2048
    threads: int = os.cpu_count() or 1
    prompt_tokens: int = 128
    decode_tokens: int = 32
    repeats: int = 3
    pipeline: str = "default"


@dataclass(frozen=True)
class Variant:
    spec: str
    path: Path  # its artifact
    build_s: float


@dataclass(frozen=True)
class Score:
    perplexity: Perplexity
    kl: float  # mean KL(p_fp32 || p_variant) over the scored positions, nats
    top1_agreement: float  # share of scored positions where both rank the same token first


@dataclass
class Comparison:
    settings: dict
    rows: list[dict]  # one per variant, fp32 first

    def to_json(self) -> dict:
        return {"settings": self.settings, "rows": self.rows}


def parse_specs(text: str) -> list[str]:
    """The variants of ``--compare``: comma-separated specs, duplicates dropped, ``fp32`` first."""
    return list(dict.fromkeys([BASELINE, *(spec.strip() for spec in text.split(",") if spec.strip())]))


STEPS = ("prune", "lowrank", "quant", "dtype", "act", "kv")
FIELDS = {"act": "activations", "kv": "kv_cache"}  # steps named other than their build option
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class VariantSpec:
    """The build options of one ``--compare`` spec (see the module docstring)."""

    prune: str | None = None
    lowrank: str | None = None
    quant: str | None = None
    dtype: str = "fp32"
    activations: str = "f32"
    kv_cache: str = "f32"


def parse_variant(spec: str) -> VariantSpec:
    """``spec`` as build options; LLMOptError on an unknown or repeated step."""
    steps: dict[str, str] = {}
    if spec == BASELINE:
        return VariantSpec()
    for part in spec.split("+"):
        key, sep, value = part.strip().partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("quant", key.strip())
        if key not in STEPS or not value:
            raise LLMOptError(f"--compare variant {spec!r}: {part!r} is not a step.",
                              "Join steps with '+': prune=METHOD:LEVEL, lowrank=METHOD:RATIO[:ALLOCATION], "
                              "dtype=fp16, act=int8, kv=int8 and a --quant spec, e.g. prune=wanda:0.5+w4g128.")
        if FIELDS.get(key, key) in steps:
            raise LLMOptError(f"--compare variant {spec!r} has two {key} steps.", "Give each step at most once.")
        if key == "dtype" and value not in DTYPES:
            raise LLMOptError(f"--compare variant {spec!r}: dtype={value} is not one of {', '.join(DTYPES)}.",
                              "Write dtype=fp16 (fp32 is the default).")
        if key == "act" and value not in ACTIVATIONS:
            raise LLMOptError(f"--compare variant {spec!r}: act={value} is not one of {', '.join(ACTIVATIONS)}.",
                              "Write act=int8 (f32 is the default), e.g. w4g128+act=int8.")
        if key == "kv" and value not in KV_CACHES:
            raise LLMOptError(f"--compare variant {spec!r}: kv={value} is not one of {', '.join(KV_CACHES)}.",
                              "Write kv=int8 (f32 is the default), e.g. w4g128+kv=int8.")
        steps[FIELDS.get(key, key)] = value
    return VariantSpec(**steps)


# ---- building ----------------------------------------------------------------------------------


@contextmanager
def _naming(spec: str):
    """Say which variant an LLMOptError is about."""
    try:
        yield
    except LLMOptError as err:
        raise LLMOptError(f"--compare variant {spec!r}: {err.message}", err.hint) from None


def check_specs(specs: list[str]) -> None:
    """Fail before any build on a spec the compiler does not know."""
    from .compiler import quantization_pass
    from .passes.lowrank import lowrank_pass
    from .passes.prune import pruning_pass
    for spec in specs:
        variant = parse_variant(spec)
        with _naming(spec):
            for step, make in ((variant.prune, pruning_pass), (variant.lowrank, lowrank_pass),
                               (variant.quant, quantization_pass)):
                if step is not None:
                    make(step)


def build_variants(model, specs: list[str], folder: Path, pipeline: str,
                   report: Callable[[str], None]) -> list[Variant]:
    """Trace ``model`` once and build one artifact per spec under ``folder``."""
    from .compiler import BuildOptions, build, load
    module = load(model)
    variants = []
    for spec in specs:
        report(f"building {spec}")
        out = folder / re.sub(r"[^A-Za-z0-9._-]", "_", spec)
        start = time.perf_counter()
        with _naming(spec):
            build(module, out, BuildOptions(pipeline=pipeline, **asdict(parse_variant(spec))), force=True)
        variants.append(Variant(spec, out, time.perf_counter() - start))
    return variants


# ---- measuring ---------------------------------------------------------------------------------


def artifact_sizes(artifact: Path) -> dict:
    """Bytes of the weight shards, bytes of the whole artifact, and how many values the weights hold."""
    from .runtime.manifest import read_manifest, resolve
    manifest = read_manifest(artifact)
    shards = {w.file for w in manifest.weights}
    return {"parameters": manifest.created_by.get("parameters"),
            "weight_bytes": sum(resolve(artifact, f).stat().st_size for f in shards),
            "artifact_bytes": sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()),
            "stored_values": sum(math.prod(w.shape) for w in manifest.weights)}


def next_token_log_probs(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities [n - 1, vocab] of the positions that predict a scored token."""
    return log_softmax(logits[:-1]).astype(np.float32)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats per row, from log-probabilities ``reference`` (p) and ``other`` (q)."""
    p, q = reference.astype(np.float64), other.astype(np.float64)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def score(forward_logits, ids, context: int, max_tokens: int | None, reference: list[np.ndarray] | None = None,
          progress=None) -> tuple[Score, list[np.ndarray]]:
    """Perplexity over ``ids`` and KL / top-1 agreement against ``reference`` (the fp32 log-probabilities
    of each window; None: this is the reference). Returns the score and, when ``reference`` is None,
    this model's log-probabilities to be the reference."""
    kept, kl, agree = [], [], []

    def forward(window):
        logits = forward_logits(window)
        logp = next_token_log_probs(logits)
        ref = logp if reference is None else reference[len(kl)]
        kl.append(kl_divergence(ref, logp))
        agree.append(ref.argmax(axis=-1) == logp.argmax(axis=-1))
        if reference is None:
            kept.append(logp)
        return logits

    result = perplexity(forward, ids, context, max_tokens, progress)
    return Score(result, float(np.concatenate(kl).mean()), float(np.concatenate(agree).mean())), kept


def check_reference_fits(ids, context: int, max_tokens: int | None, vocab: int) -> None:
    """Refuse settings whose fp32 log-probabilities would not fit comfortably in memory."""
    tokens = len(ids[:max_tokens]) // context * context
    need = tokens * vocab * 4
    if need > MAX_REFERENCE_BYTES:
        raise LLMOptError(f"--compare keeps fp32's next-token distributions of all {tokens} tokens in memory: "
                          f"{need / 2**30:.1f} GiB for a vocabulary of {vocab}, more than the "
                          f"{MAX_REFERENCE_BYTES / 2**30:.0f} GiB allowed.",
                          f"Pass fewer --tokens, e.g. --tokens {MAX_REFERENCE_BYTES // (vocab * 4) // context * context}.")


def measure_variant(variant: Variant, ids: list[int], settings: CompareSettings, reference, report):
    """One row of the table (all but bytes/param), the perplexity result, and (when ``reference`` is None)
    the variant's log-probabilities."""
    from .runtime import load
    from .runtime.speed import measure_in_child
    model = load(variant.path)
    quality, kept = score(model.forward_logits, ids, settings.context, settings.max_tokens, reference,
                          lambda done, total: report(f"{variant.spec}: window {done}/{total}"))
    del model  # before timing, so the child has the machine to itself
    report(f"{variant.spec}: timing prefill and decode")
    speed = measure_in_child(variant.path, ids[:settings.prompt_tokens], settings.decode_tokens, settings.repeats,
                             settings.threads)
    row = {"spec": variant.spec, **artifact_sizes(variant.path),
           "peak_rss_mib": speed["peak_rss_mib"], "prefill_tok_s": speed["prefill_tok_s"],
           "decode_tok_s": speed["decode_tok_s"], "load_s": speed["load_s"],
           "perplexity": quality.perplexity.perplexity, "mean_nll": quality.perplexity.mean_nll,
           "kl_mean": quality.kl, "top1_agreement": quality.top1_agreement, "build_s": variant.build_s}
    return row, quality.perplexity, kept


def compare(model, specs: list[str], settings: CompareSettings, artifacts_dir: str | Path | None = None,
            report: Callable[[str], None] = lambda line: None) -> Comparison:
    """Build ``model`` once per spec (``fp32`` added first) and measure every variant. The artifacts
    go to ``artifacts_dir/<spec>`` (replacing what is there) when given, else to a temporary folder."""
    if isinstance(model, (str, Path)) and (Path(model) / "manifest.json").is_file():
        raise LLMOptError(f"{model} is an artifact; --compare needs the model, to build it once per variant.",
                          "Give the model instead: an HF folder, a .gguf file or 'smollm2'.")
    specs = parse_specs(",".join(specs))
    check_specs(specs)
    load_average = os.getloadavg()
    kept = nullcontext(artifacts_dir) if artifacts_dir is not None else None
    with kept or tempfile.TemporaryDirectory(prefix="llmopt-compare-") as folder:
        variants = build_variants(model, specs, Path(folder), settings.pipeline, report)
        from .runtime import load
        baseline = load(variants[0].path)
        ids = baseline.tokenizer.encode(Path(settings.text).read_text(encoding="utf-8"))
        check_reference_fits(ids, settings.context, settings.max_tokens, baseline.vocab_size or 0)
        del baseline
        if len(ids) < settings.prompt_tokens:
            raise LLMOptError(f"{settings.text} has {len(ids)} tokens, fewer than the {settings.prompt_tokens}-token "
                              "prompt timed.", "Use a longer text.")
        rows, reference = [], None
        for variant in variants:
            row, ppl, log_probs = measure_variant(variant, ids, settings, reference, report)
            if reference is None:
                reference = log_probs
            rows.append({**row, "artifact": str(variant.path) if kept else None})
    parameters = rows[0]["stored_values"]
    for row in rows:
        row["bytes_per_param"] = row["weight_bytes"] / parameters
    return Comparison({**_settings(model, settings, ppl, parameters), "load_average_at_start": load_average}, rows)


def _settings(model, settings: CompareSettings, ppl: Perplexity, parameters: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    name = str(model) if isinstance(model, (str, Path)) else "an ir.Module"
    return {**asdict(settings), "model": name, "tokens": ppl.tokens, "scored": ppl.scored,
            "windows": ppl.windows, "parameters": parameters, "cpu": cpu, "logical_cores": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---- reporting ---------------------------------------------------------------------------------


COLUMNS = [  # (header, row key, format)
    ("variant", "spec", "{}"),
    ("params M", "parameters", lambda v: f"{v / 1e6:.4g}"),
    ("weights MB", "weight_bytes", lambda v: f"{v / 1e6:.4g}"),
    ("bytes/param", "bytes_per_param", "{:.3f}"),
    ("artifact MB", "artifact_bytes", lambda v: f"{v / 1e6:.4g}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("prefill tok/s", "prefill_tok_s", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.2f}"),
    ("perplexity", "perplexity", "{:.4f}"),
    ("KL nats", "kl_mean", "{:.4g}"),
    ("top-1 agree", "top1_agreement", "{:.1%}"),
]


def _cells(row: dict) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row[key]
        cells.append("-" if value is None else fmt(value) if callable(fmt) else fmt.format(value))
    return cells


def describe(comparison: Comparison) -> str:
    """What was measured, how, in one paragraph (under the table)."""
    s = comparison.settings
    return (f"{s['model']}; quality: {s['windows']} windows of {s['context']} tokens, the first {s['tokens']} tokens "
            f"of {Path(s['text']).name} ({s['scored']} scored positions); KL = mean over them of "
            f"KL(p_fp32 || p_variant) of the next token, nats; top-1 agree = share of them where the variant's "
            f"most likely token is fp32's. Speed and peak RSS: a child process per variant, {s['threads']} "
            f"thread(s), {s['prompt_tokens']}-token prefill and {s['decode_tokens']} decode steps, median of "
            f"{s['repeats']} runs. bytes/param = weight bytes / {s['parameters']} values stored by fp32.")


def render_table(comparison: Comparison):
    """The comparison as a rich Table."""
    from rich.table import Table
    table = Table(title="variants", caption=describe(comparison), caption_justify="left")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "variant" else "right")
    for row in comparison.rows:
        table.add_row(*_cells(row))
    return table


def to_markdown(comparison: Comparison) -> str:
    s = comparison.settings
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in comparison.rows]
    return "\n".join([f"# Variants of {s['model']}", "", *lines, "", describe(comparison), "",
                      f"Machine: {s['cpu']}, {s['logical_cores']} logical cores; load average at start "
                      f"{', '.join(f'{x:.2f}' for x in s['load_average_at_start'])}; {s['date']}.", ""])


def write_outputs(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``compare.json`` and ``compare.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "compare.json", out_dir / "compare.md"
    json_path.write_text(json.dumps(comparison.to_json(), indent=2) + "\n")
    md_path.write_text(to_markdown(comparison))
    return json_path, md_path
