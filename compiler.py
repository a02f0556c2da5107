"""The compiler driver: model -> IR -> passes -> TVM -> artifact directory.

Each stage is a function of the one before; ``build`` strings them together for the CLI and for
Python users. Progress goes to ``report`` (a callable taking a line), timings into the manifest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import LLMOptError
from .ir.graph import Module
from .ir.parameters import logical_parameters
from .ir.printer import print_module


@dataclass(frozen=True)
class BuildOptions:
    target: str = "cpu"
    arch: str | None = None
    pipeline: str = "default"
    disabled_passes: tuple[str, ...] = ()
    dump_dir: str | None = None
    verify: bool = False
    quant: str | None = None  # "[METHOD:]SCHEME": a method in QUANT_METHODS (default rtn), a scheme name
    quant_rules: str | None = None  # per-layer schemes, "pattern=scheme;..." (None: the pass's default)
    calibration: tuple[tuple[str, str], ...] = ()  # (option, value) for calibrated methods: text, samples, ...
    bits_budget: float | None = None  # plan per-layer schemes for this average bits/weight (quantize-mixed)
    prune: str | None = None  # "METHOD:LEVEL" (magnitude:0.5, wanda:0.5, sparsegpt:2:4): prune, then quantize
    lowrank: str | None = None  # "METHOD:RATIO[:ALLOCATION]" (svd:0.2, asvd:0.2): factorize, then quantize
    dtype: str = "fp32"  # "fp16": weights, activations and KV cache in f16 (half-precision, last pass)
    weight_storage: str = "auto"  # "auto": mostly-one-value (pruned) weights stored compactly; "plain": as is
    activations: str = "f32"  # "int8": the 4-bit linears take int8 activations (int8-activations, W4A8)
    kv_cache: str = "f32"  # "int8": the KV cache as int8 codes and a scale per token and kv head (quantize-kv-cache)

    def to_json(self) -> dict:
        return asdict(self)


WEIGHT_STORAGE = ("auto", "plain")
ACTIVATIONS = ("f32", "int8")
KV_CACHES = ("f32", "int8")


def check_kv_cache(options: BuildOptions) -> None:
    """An LLMOptError naming what to change unless ``options.kv_cache`` can be built."""
    if options.kv_cache not in KV_CACHES:
        raise LLMOptError(f"--kv-cache {options.kv_cache!r} is unknown.", f"Use one of: {', '.join(KV_CACHES)}.")
    if options.kv_cache == "int8" and options.dtype != "fp32":
        raise LLMOptError(f"--kv-cache int8 with --dtype {options.dtype}: the int8 cache is defined on f32 models.",
                          "Use --dtype fp32 with --kv-cache int8, or an fp16 cache (leave --kv-cache out).")


def check_activations(options: BuildOptions, spec) -> None:
    """An LLMOptError naming what to change unless ``options.activations`` can be built for ``spec``."""
    if options.activations not in ACTIVATIONS:
        raise LLMOptError(f"--activations {options.activations!r} is unknown.", f"Use one of: {', '.join(ACTIVATIONS)}.")
    if options.activations == "f32":
        return
    if not spec.int8_activations:
        raise LLMOptError(f"--activations int8: target {spec.name} has no int8-activation (W4A8) kernels.",
                          "Build it for --target cpu, or leave --activations out.")
    if options.dtype != "fp32":
        raise LLMOptError(f"--activations int8 with --dtype {options.dtype}: int8 activations are defined on f32 "
                          "models.", "Use --dtype fp32 with --activations int8.")
    if not options.quant and options.bits_budget is None:
        raise LLMOptError("--activations int8 needs 4-bit weights: no --quant was given.",
                          "Add --quant w4g128 (or another symmetric 4-bit scheme: w4g32, w4g64, gptq:w4g128, ...).")


@dataclass
class BuildReport:
    seconds: dict[str, float] = field(default_factory=dict)
    pass_stats: list = field(default_factory=list)


def load(model) -> Module:
    """A model given as a name, a path or an already traced ``ir.Module``."""
    if isinstance(model, Module):
        return model
    from .frontend.load import load_model
    return load_model(str(model))


def optimize(module: Module, options: BuildOptions, report: BuildReport | None = None) -> Module:
    """Run the pass pipeline named in ``options`` with the instruments it asks for."""
    from .passes.instruments import DumpIR, InterpreterCheck, Verify, debug_instruments
    from .passes.manager import PassManager, build_pipeline
    checks = [Verify(), InterpreterCheck()] if options.verify else []
    instruments = (([DumpIR(options.dump_dir)] if options.dump_dir else []) + checks
                   + debug_instruments())  # LLMOPT_DEBUG levels; last, so a dump is on disk before Verify stops
    passes = build_pipeline(options.pipeline)
    if options.prune:  # placed where quantization goes, so a quantization pass added below comes after it
        from .passes.prune import pruning_pass
        prune_pass = pruning_pass(options.prune, options.calibration)
        passes = (before_fusion(passes, prune_pass) if getattr(prune_pass, "before_fusion", False)
                  else with_quantization(passes, prune_pass))
    if options.lowrank:  # likewise, after any pruning
        from .passes.lowrank import lowrank_pass
        passes = with_quantization(passes, lowrank_pass(options.lowrank, options.calibration))
    if options.prune and compacts_sparse(options, prune_pass):  # values + indices (passes/prune/compact.py)
        from .passes.prune.compact import CompactSparse
        passes = with_quantization(passes, CompactSparse())
    if options.quant or options.bits_budget is not None:
        quant_pass = quantization_pass(options.quant or "w4g128", options.quant_rules, options.calibration)
        if options.bits_budget is not None:  # measured and planned on the graph quant_pass would see
            from .passes.quant.mixed_precision import planned_quantization
            quant_pass = planned_quantization(quant_pass, options.bits_budget, options.quant_rules, options.calibration)
        passes = with_quantization(passes, quant_pass)
    if options.activations == "int8":  # after quantization: it rewrites the quantized linears
        from .passes.quant.int8_activations import Int8Activations
        passes = with_quantization(passes, Int8Activations())
    if options.kv_cache == "int8":
        from .passes.quant.kv_cache import QuantizeKVCache
        passes = with_quantization(passes, QuantizeKVCache())
    if options.dtype == "fp16":  # last: every pass before it computes in f32
        from .passes.half_precision import HalfPrecision
        from .targets import get_target
        passes = passes + [HalfPrecision(activations="f16" if get_target(options.target).fp16_activations else "f32")]
    manager = PassManager(passes, instruments, options.disabled_passes)
    module = manager.run(module)
    if report is not None:
        report.pass_stats = manager.stats
    return module


def compacts_sparse(options: BuildOptions, prune_pass) -> bool:
    """Whether the build stores its pruned weights N:M-compact: an N:M ``prune_pass``, fp32 weights (a
    quantized build stores the pruned weights' codes dense, as before) and a target whose kernels
    read the compact form (``TargetSpec.compact_sparse``)."""
    from .targets import get_target
    return (bool(getattr(prune_pass, "nm", "")) and not options.quant and options.bits_budget is None
            and options.dtype == "fp32" and get_target(options.target).compact_sparse)


QUANT_METHODS = {"rtn": "quantize-rtn", "gptq": "quantize-gptq", "awq": "quantize-awq",
                 "smoothquant": "quantize-smoothquant"}


def quantization_pass(spec: str, rules: str | None = None, calibration: tuple[tuple[str, str], ...] = ()):
    """The pass a ``--quant`` spec names: ``SCHEME`` (round-to-nearest) or ``METHOD:SCHEME``."""
    from .ir.quant_schemes import get_scheme
    from .passes.manager import PASSES
    from .passes.quant.calibrated import CalibratedQuantization
    method, _, scheme = spec.rpartition(":")
    method = method or "rtn"
    if method not in QUANT_METHODS or QUANT_METHODS[method] not in PASSES:
        known = [m for m, name in QUANT_METHODS.items() if name in PASSES]
        raise LLMOptError(f"unknown quantization method {method!r} in --quant {spec}.",
                          f"Write --quant [METHOD:]SCHEME with METHOD one of {', '.join(known)}, e.g. gptq:w4g128.")
    get_scheme(scheme)  # an unknown name fails before any work
    cls = PASSES[QUANT_METHODS[method]]
    options = {"scheme": scheme, **({"rules": rules} if rules is not None else {})}
    if issubclass(cls, CalibratedQuantization):
        types = {"calibration": str, "samples": int, "seq_len": int, "seed": int}
        for key, value in calibration:
            if key not in types:
                raise LLMOptError(f"unknown calibration option {key!r}.", f"Known: {', '.join(types)}.")
            options[key] = types[key](value)
    return cls(**options)


def with_quantization(passes: list, quant_pass) -> list:
    """``passes`` with ``quant_pass`` before cleanup: after fusion and folding (so fused weights are
    quantized whole), before ``cse``, and a ``dce`` after it so the float weights it replaced are
    not stored."""
    from .passes.dce import DeadCodeElimination
    names = [p.name for p in passes]
    at = names.index("cse") if "cse" in names else len(passes)
    passes = passes[:at] + [quant_pass] + passes[at:]
    return passes if "dce" in names[at:] else passes + [DeadCodeElimination()]


def before_fusion(passes: list, shape_pass) -> list:
    """``passes`` with ``shape_pass`` (one that changes the model's shapes, e.g. structured pruning)
    first, and a ``dce`` at the end (if none) so the weights it replaced are not stored."""
    from .passes.dce import DeadCodeElimination
    return [shape_pass] + passes + ([] if "dce" in [p.name for p in passes] else [DeadCodeElimination()])


def _input_hashes(module: Module) -> dict[str, str]:
    """sha256 of each file the model was read from, by file name (recorded in the manifest)."""
    from .runtime.manifest import sha256_file
    source = module.meta.get("source", {})
    path = Path(source["path"]) if "path" in source else None
    if path is None or not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {f.name: sha256_file(f) for f in files}  # by name, so the same model elsewhere hashes the same


def _manifest_fields(module: Module, options: BuildOptions, library, spec, report: BuildReport) -> dict:
    tokenizer = dict(module.meta.get("tokenizer") or {})
    entry_points = [{"name": f.name, "inputs": [p.name for p in f.params]} for f in module.functions.values()]
    return {
        "created_by": {"options": options.to_json(), "llmopt": __version__, "parameters": logical_parameters(module),
                       **({"quant_plan": module.meta["quant_plan"]} if "quant_plan" in module.meta else {})},
        "target": {"name": spec.name, "tvm": library.target, "device": spec.device, "archs": list(library.archs),
                   "device_needs": spec.device_needs, "weight_layout": library.layout_note()},
        "library": spec.library_file,
        "entry_points": entry_points,
        "kv_cache": module.meta["kv_cache"],
        "tokenizer": {"file": "tokenizer.json", "bos_token_id": tokenizer.get("bos_token_id"),
                      "eos_token_ids": tokenizer.get("eos_token_ids", []),
                      "add_bos": bool(tokenizer.get("add_bos", False)),
                      "chat_template": tokenizer.get("chat_template")},
        "model": module.meta.get("decoder", {}),
        "pipeline": [name for name, _ in report.pass_stats],
        "inputs": _input_hashes(module),
    }


def build(model, out: str | Path, options: BuildOptions = BuildOptions(), force: bool = False,
          report: Callable[[str], None] = lambda line: None):
    """Build ``model`` into the artifact directory ``out``; returns its Manifest."""
    from .codegen.artifact_writer import check_output_path, write_artifact
    from .codegen.build import compile_module
    from .targets import check_arch, check_dtype, get_target

    spec = get_target(options.target)  # unknown targets fail before any work
    out = Path(out)
    if out.exists() and not force:
        raise LLMOptError(f"output {out} already exists.", "Pass --force to replace it, or choose another -o.")
    check_output_path(out)  # a file in the way or a folder not writable: before any work
    check_arch(spec, options.arch)  # likewise an --arch the target does not know
    check_dtype(spec, options.dtype)  # and a --dtype it has no kernels for
    check_activations(options, spec)
    check_kv_cache(options)
    if options.weight_storage not in WEIGHT_STORAGE:
        raise LLMOptError(f"weight storage {options.weight_storage!r} is unknown.",
                          f"Use one of: {', '.join(WEIGHT_STORAGE)}.")
    if spec.check_toolchain is not None:
        spec.check_toolchain(options.arch)  # and a missing device compiler (e.g. nvcc)
    build_report = BuildReport()

    def step(name: str, fn):
        report(f"{name}...")
        start = time.perf_counter()
        value = fn()
        build_report.seconds[name] = round(time.perf_counter() - start, 3)
        report(f"{name}: {build_report.seconds[name]:.1f} s")
        return value

    module = step("trace", lambda: load(model))
    if "kv_cache" not in module.meta or "prefill" not in module.functions:
        raise LLMOptError("this model has no prefill/decode entry points, so it cannot become a generating artifact.",
                          "llmopt build takes Llama-family models (HF folders, GGUF); use llmopt.frontend.torch_export "
                          "and the IR API for other modules.")
    tokenizer_file = (module.meta.get("tokenizer") or {}).get("file")
    if not tokenizer_file or not Path(tokenizer_file).is_file():
        raise LLMOptError(f"the model has no tokenizer.json (looked for {tokenizer_file}).",
                          "Put the Hugging Face tokenizer.json next to config.json.")
    module = step("optimize", lambda: optimize(module, options, build_report))
    for name, stats in build_report.pass_stats:
        if "calibration_peak_mib" in stats:
            report(f"{name}: calibration held at most {stats['calibration_peak_mib']} MiB (activations and the "
                   f"weights in use); process peak RSS {stats['calibration_rss_mib']} MiB")
    library = step("compile", lambda: compile_module(module, spec, options.arch))
    fields = _manifest_fields(module, options, library, spec, build_report)
    return step("write", lambda: write_artifact(out, executable=library.executable,
                                                 weights=library.stored_weights(module),
                                                 tokenizer_json_path=tokenizer_file, ir_text=print_module(module),
                                                 manifest_fields=fields, overwrite=force,
                                                 encode_weights=options.weight_storage == "auto"))
