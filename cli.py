"""The ``llmopt`` command line: build, run, eval, ir.

User errors (``LLMOptError``) print one paragraph and exit with code 2; anything else is an
llmopt bug: it prints the traceback and exits with code 70.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import click

from .errors import INTERNAL_ERROR_EXIT, USER_ERROR_EXIT, LLMOptError

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "shared" / "data" / "austen" / "persuasion.txt"
REPORT_TEXT = DEFAULT_TEXT.parent / "pride_and_prejudice.txt"


def _console():
    from rich.console import Console
    return Console(stderr=True)


def _is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


@click.group()
@click.version_option(package_name="llmopt")
def cli():
    """llmopt: compile LLMs ahead of time through llmopt's IR and Apache TVM.

    \b
    llmopt build smollm2 --target cpu -o out/smollm2
    llmopt run out/smollm2 --prompt "The capital of France is"
    llmopt eval out/smollm2 --text ../shared/data/austen/persuasion.txt
    llmopt ir smollm2 --pipeline default --dump-dir dumps/
    """


def _build_options(target, arch, pipeline, disable_pass, dump_dir, verify, quant=None, quant_rules=None,
                   calibration=(), bits_budget=None, prune=None, lowrank=None, dtype="fp32",
                   weight_storage="auto", activations="f32", kv_cache="f32"):
    from .compiler import BuildOptions
    return BuildOptions(target=target, arch=arch, pipeline=pipeline, disabled_passes=tuple(disable_pass),
                        dump_dir=dump_dir, verify=verify, quant=quant, quant_rules=quant_rules,
                        calibration=tuple(calibration), bits_budget=bits_budget, prune=prune, lowrank=lowrank,
                        dtype=dtype, weight_storage=weight_storage, activations=activations, kv_cache=kv_cache)


def _key_values(items, option: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LLMOptError(f"{option} {item!r} is not KEY=VALUE.", f"Write e.g. {option} samples=64.")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


_pipeline_option = click.option("--pipeline", default="default", show_default=True,
                                help="Pass pipeline: a named pipeline or a comma list, e.g. 'dce,cse'.")
_disable_option = click.option("--disable-pass", multiple=True, metavar="NAME", help="Skip this pass (repeatable).")


@cli.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Target to compile for (see targets/).")
@click.option("--arch", default=None, help="Target architecture, e.g. an LLVM CPU name for cpu, sm_80,sm_90 "
              "for cuda, gfx90a,gfx942 for rocm, m2 for metal (see llmopt targets).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Float precision of weights, activations and KV cache (fp16: GPU targets; logits stay fp32).")
@_pipeline_option
@_disable_option
@click.option("--dump-dir", type=click.Path(), default=None, help="Write the IR after every pass here.")
@click.option("--verify", is_flag=True, help="After every pass, run the IR verifier and check the reference "
              "interpreter's outputs against the input's.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quant", default=None, metavar="[METHOD:]SCHEME",
              help="Quantize linear weights (lm_head kept): METHOD rtn (default), gptq or awq; SCHEME e.g. w8, "
                   "w4g128, w4g32-asym, w3g128, nf4g64, fp8.")
@click.option("--quant-rules", default=None, metavar="RULES",
              help="Per-layer schemes, first match wins: 'lm_head=w8;layers.0.*=skip' (default lm_head=skip).")
@click.option("--calib", "calibration", multiple=True, metavar="KEY=VALUE",
              help="Calibration for gptq/awq and --bits-budget: calibration=TEXT_FILE, samples=N, seq_len=N, seed=N.")
@click.option("--bits-budget", type=float, default=None, metavar="BITS",
              help="Measure each linear's sensitivity on calibration text and give each its own scheme, at most "
                   "BITS bits/weight on average (LM head float, not counted); --quant picks the method.")
@click.option("--prune", default=None, metavar="METHOD:LEVEL",
              help="Prune linear weights (lm_head kept) before any quantization: METHOD magnitude, wanda or "
                   "sparsegpt; LEVEL a sparsity (0.5) or N:M (2:4). wanda/sparsegpt calibrate with --calib. "
                   "Structured: flap or wanda-sp with a fraction of the layers' parameters (flap:0.2) removes kv "
                   "head groups and MLP channels, shrinking the model.")
@click.option("--lowrank", default=None, metavar="METHOD:RATIO[:ALLOCATION]",
              help="Factorize linear weights into two low-rank linears (lm_head kept) before any quantization, "
                   "removing RATIO of their parameters: METHOD svd or asvd (activation-aware, calibrates with "
                   "--calib); ALLOCATION uniform (default) or energy, e.g. asvd:0.2.")
@click.option("--weight-storage", type=click.Choice(["auto", "plain"]), default="auto", show_default=True,
              help="auto: store weights that are mostly one value (pruned ones) as a bitmask and the other values "
                   "where that saves bytes, decoded bit for bit at load; plain: every weight as is.")
@click.option("--activations", type=click.Choice(["f32", "int8"]), default="f32", show_default=True,
              help="int8: the 4-bit linears (symmetric, groups of 32/64/128) quantize their inputs to int8 per "
                   "token and group and multiply in int8 (W4A8, VNNI on x86): about 2x prefill and faster decode, "
                   "~1% more error per linear. CPU only.")
@click.option("--kv-cache", type=click.Choice(["f32", "int8"]), default="f32", show_default=True,
              help="int8: keep the KV cache as int8 codes with one f32 scale per token and kv head (a quarter "
                   "of the memory; attention reads the codes). fp32 models only.")
def build(model, target, arch, out, dtype, pipeline, disable_pass, dump_dir, verify, force, quant, quant_rules,
          calibration, bits_budget, prune, lowrank, weight_storage, activations, kv_cache):
    """Compile MODEL (an HF folder, a .gguf file, or 'smollm2') into an artifact directory.

    \b
    Examples:
      llmopt build smollm2 --target cpu -o out/smollm2
      llmopt build smollm2 --quant w8 -o out/smollm2-w8
      llmopt build smollm2 --target cuda --arch sm_80,sm_90 -o out/smollm2-cuda
      llmopt build smollm2 --target cuda --dtype fp16 -o out/smollm2-cuda-fp16
      llmopt build smollm2 --target rocm --arch gfx90a,gfx942 -o out/smollm2-rocm
      llmopt build smollm2 --target metal --quant w4g32 -o out/smollm2-metal
      llmopt build smollm2 --quant gptq:w4g128 --calib samples=64 -o out/smollm2-gptq
      llmopt build smollm2 --bits-budget 4.5 -o out/smollm2-mixed
      llmopt build smollm2 --prune wanda:0.5 --quant w8 -o out/smollm2-wanda-w8
      llmopt build smollm2 --lowrank asvd:0.2 --quant w8 -o out/smollm2-asvd-w8
    """
    import torch  # noqa: F401  (torch before tvm: tvm_ffi's torch hooks want it first)
    from .compiler import build as build_artifact
    console = _console()
    options = _build_options(target, arch, pipeline, disable_pass, dump_dir, verify, quant, quant_rules,
                             _key_values(calibration, "--calib"), bits_budget, prune, lowrank, dtype,
                             weight_storage, activations, kv_cache)
    with console.status("building") as status:
        manifest = build_artifact(model, out, options, force, report=lambda line: (status.update(line),
                                                                                    console.log(line)))
    if "quant_plan" in manifest.created_by:
        from .passes.quant.mixed_precision import plan_table
        console.print(plan_table(manifest.created_by["quant_plan"]))
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    encoded = sum(w.encoding is not None for w in manifest.weights)
    console.print(f"wrote {out} ({size / 1e6:.1f} MB, {len(manifest.weights)} weights"
                  + (f", {encoded} of them stored as bitmask + values" if encoded else "") + f", target {target})")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-tokens", default=64, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
def run(artifact, prompt, max_tokens, temperature, top_p, seed):
    """Load ARTIFACT and print the completion of --prompt, token by token.

    \b
    Example:
      llmopt run out/smollm2 --prompt "The capital of France is" --max-tokens 32
    """
    from .runtime import generate, load
    model = load(artifact)
    ids = model.tokenizer.encode(prompt)
    stream = model.tokenizer.stream()
    click.echo(prompt, nl=False)
    for token in generate(model, ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed):
        click.echo(stream.push(token), nl=False)
    click.echo(stream.flush())


@cli.command(name="eval")
@click.argument("model_or_artifact")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_TEXT), show_default=True,
              help="UTF-8 text file to measure perplexity on.")
@click.option("--context", default=None, type=click.IntRange(min=2),
              help="Window length in tokens.  [default: 1024; with --compare 256]")
@click.option("--tokens", "max_tokens", default=None, type=int,
              help="Use only the first N tokens of the text.  [default: all; with --compare 2048]")
@_pipeline_option
@click.option("--compare", "compare_specs", default=None, metavar="SPECS",
              help="Build MODEL once per variant and compare them: comma-separated specs, each a --quant spec "
              "or '+'-joined steps prune=METHOD:LEVEL, lowrank=METHOD:RATIO, dtype=fp16, act=int8, quant=SPEC, e.g. "
              "fp32,w8,gptq:w4g128,prune=wanda:0.5+w4g128,lowrank=asvd:0.2+w8,dtype=fp16 (fp32, uncompressed, is "
              "always included).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="--compare: write compare.json and compare.md here.  [default: out/compare]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="--compare: threads for timing prefill and decode.  [default: all cores]")
@click.option("--keep-artifacts", is_flag=True,
              help="--compare: keep the variants' artifacts, in OUT_DIR/artifacts/<spec>.")
def evaluate(model_or_artifact, text, context, max_tokens, pipeline, compare_specs, out_dir, threads,
             keep_artifacts):
    """Perplexity of an artifact (or of a model, built for the CPU first) on --text.

    With --compare, build the model once per variant (quantized, pruned, factorized, or a mix) and
    print, per variant, parameters, weight and artifact size, peak memory, prefill and decode speed,
    perplexity, and the KL divergence of its next-token distribution from fp32's (also written to
    --out-dir as JSON and Markdown).

    \b
    Examples:
      llmopt eval out/smollm2 --text ../shared/data/austen/persuasion.txt --context 1024 --tokens 8192
      llmopt eval smollm2 --compare fp32,w8,w4g128,w4g32-asym --out-dir out/compare
      llmopt eval smollm2 --compare w4g128,prune=wanda:0.5,prune=wanda:2:4+w4g128,lowrank=asvd:0.2+w8
    """
    if compare_specs is not None:
        _compare(model_or_artifact, compare_specs, text, 256 if context is None else context,
                 2048 if max_tokens is None else max_tokens, threads, Path(out_dir or "out/compare"), pipeline,
                 keep_artifacts)
        return
    if out_dir is not None or threads is not None or keep_artifacts:
        raise LLMOptError("--out-dir, --threads and --keep-artifacts apply only to eval --compare.",
                          "Add --compare SPECS, or leave them out.")
    context = 1024 if context is None else context
    from .runtime import load
    from .runtime.perplexity import perplexity
    console = _console()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = model_or_artifact
        if not _is_artifact(artifact):
            import torch  # noqa: F401
            from .compiler import build as build_artifact
            artifact = str(Path(tmp) / "artifact")
            with console.status("building for the CPU"):
                build_artifact(model_or_artifact, artifact, _build_options("cpu", None, pipeline, (), None, False))
        model = load(artifact)
        ids = model.tokenizer.encode(Path(text).read_text(encoding="utf-8"))
        from rich.progress import Progress
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("windows", total=None)
            result = perplexity(model.forward_logits, ids, context, max_tokens,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    click.echo(f"{Path(text).name}: {result.describe()}")


def _compare(model, specs, text, context, max_tokens, threads, out_dir, pipeline, keep_artifacts):
    import torch  # noqa: F401  (torch before tvm)
    from rich.console import Console
    from .compare import CompareSettings, compare, parse_specs, render_table, write_outputs
    settings = CompareSettings(text=text, context=context, max_tokens=max_tokens, pipeline=pipeline,
                               **({"threads": threads} if threads else {}))
    console = _console()
    with console.status("comparing") as status:
        result = compare(model, parse_specs(specs), settings, out_dir / "artifacts" if keep_artifacts else None,
                         report=lambda line: status.update(line))
    Console(width=None if sys.stdout.isatty() else 160).print(render_table(result))
    json_path, md_path = write_outputs(result, out_dir)
    click.echo(f"wrote {json_path} and {md_path}", err=True)


@cli.command(name="targets")
def list_targets():
    """List the targets of `llmopt build --target`: what each is, its --arch values, and what the
    build machine and the device need."""
    from .targets import get_target, target_names
    for name in target_names():
        spec = get_target(name)
        archs = spec.arch_help or (", ".join(spec.archs) if spec.archs else "free form")
        click.echo(f"{name}: {spec.description}\n  --arch: {archs}\n  --dtype: {', '.join(spec.dtypes)}\n"
                   f"  build needs: {spec.build_needs or 'nothing beyond llmopt'}\n  device needs: {spec.device_needs}")


class _IRGroup(click.Group):
    """``llmopt ir MODEL ...`` shows a model's IR (the ``show`` subcommand, implied);
    ``llmopt ir diff A.ir B.ir`` compares two dumps."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_IRGroup)
def ir():
    """Read the IR: `llmopt ir MODEL` prints it after a pipeline, `llmopt ir diff A B` compares dumps.

    \b
    Examples:
      llmopt ir smollm2 --pipeline none | less
      llmopt ir smollm2 --dump-dir dumps/ && llmopt ir diff dumps/000_input.ir dumps/001_fuse-linears.ir
    """


@ir.command(name="show")
@click.argument("model")
@_pipeline_option
@_disable_option
@click.option("--dump-dir", type=click.Path(), default=None, help="Write NNN_<pass>.ir after every pass here.")
@click.option("--verify", is_flag=True, help="After every pass, run the IR verifier and check the reference "
              "interpreter's outputs against the input's.")
@click.option("-o", "--out", type=click.Path(), default=None, help="Write the final IR here instead of stdout.")
@click.option("--bisect", is_flag=True, help="Find the first pass that changes the logits (interpreter) instead.")
@click.option("--tolerance", default=1e-4, show_default=True, help="--bisect: largest max-abs-diff that is fine.")
@click.option("--entry", default="logits", show_default=True, help="--bisect, --report: the entry point to compare.")
@click.option("--report", is_flag=True, help="Print the relative error of every layer and linear after the pipeline "
              "(interpreter, on --text) instead, worst first.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None,
              help="--report: also write it as JSON here.")
@click.option("--text", "report_text", type=click.Path(dir_okay=False), default=str(REPORT_TEXT), show_default=True,
              help="--report: the text to run through the model.")
@click.option("--tokens", default=64, show_default=True, help="--report: use the first N tokens of --text.")
@click.option("--graph", type=click.Path(), default=None, help="Write the final IR's graph as an HTML page here.")
@click.option("--graph-filter", default=None, metavar="PREFIX", help="--graph: only nodes from PREFIX, "
              "e.g. model.layers.0.")
@click.option("--graph-function", default="prefill", show_default=True, help="--graph: the function to draw.")
def ir_show(model, pipeline, disable_pass, dump_dir, verify, out, bisect, tolerance, entry, report, report_json, report_text,
       tokens, graph, graph_filter, graph_function):
    """Print MODEL's IR after a pipeline (default: the build pipeline; 'none' for the traced IR).

    With --bisect, print which pass first changes the outputs instead; with --report (or
    --report-json), the relative error of each layer and linear, worst first, and the first NaN/Inf;
    with --graph, draw the IR (the IR is then printed only with -o).

    \b
    Examples:
      llmopt ir smollm2 --pipeline none | less
      llmopt ir smollm2 --pipeline dce,cse,fuse-linears --dump-dir dumps/
      llmopt ir smollm2 --bisect --tolerance 1e-4
      llmopt ir smollm2 --report --report-json report.json --tokens 64
      llmopt ir smollm2 --graph block0.html --graph-filter model.layers.0
    """
    from .compiler import load, optimize
    from .ir.printer import print_module
    if bisect:
        click.echo(_bisect(load(model), pipeline, disable_pass, tolerance, entry).describe())
        return
    options = _build_options("cpu", None, pipeline, disable_pass, dump_dir, verify)
    if report or report_json:
        _report(load(model), options, entry, report_text, tokens, report_json)
        return
    module = optimize(load(model), options)
    text = print_module(module)
    if graph:
        _write_graph(module, graph, graph_function, graph_filter)
    if out:
        Path(out).write_text(text)
    elif not graph:
        click.echo(text, nl=False)


def _bisect(module, pipeline, disable_pass, tolerance, entry):
    from .passes.bisect import bisect_pipeline, example_inputs
    from .passes.manager import PassManager, build_pipeline
    manager = PassManager(build_pipeline(pipeline), (), disable_pass)  # checks the disabled names
    passes = [p for p in manager.passes if p.name not in manager.disabled]
    return bisect_pipeline(module, passes, example_inputs(module, entry), tolerance, entry)


def _report(module, options, entry, text, tokens, json_path):
    import json
    from .compiler import optimize
    from .passes.report import layer_error_report, tokenize_text
    ids = tokenize_text(module, text, tokens)
    result = layer_error_report(module, optimize(module, options), ids, entry)
    click.echo(result.render(), nl=False)
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)


def _write_graph(module, path, function, source_prefix):
    from .ir.graphview import write_graph
    if function not in module.functions:
        raise LLMOptError(f"--graph-function {function!r}: the model has no such function.",
                          f"Choose one of: {', '.join(module.functions)}.")
    count = write_graph(module.functions[function], path, source_prefix)
    if count == 0:
        raise LLMOptError(f"--graph-filter {source_prefix!r} selects no node of @{function}.",
                          "Use a prefix of the from= names the IR shows, e.g. model.layers.0.")
    click.echo(f"wrote {path} ({count} nodes of @{function})", err=True)


@ir.command(name="diff")
@click.argument("before", type=click.Path(exists=True, dir_okay=False))
@click.argument("after", type=click.Path(exists=True, dir_okay=False))
def ir_diff(before, after):
    """What changed from the IR file BEFORE to AFTER (e.g. two files of --dump-dir), node by node.

    \b
    Example:
      llmopt ir smollm2 --dump-dir dumps/
      llmopt ir diff dumps/000_input.ir dumps/001_fuse-linears.ir
    """
    from .ir.diff import diff_modules
    text = diff_modules(_read_ir(before), _read_ir(after)).render()
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.text import Text
        styles = {"+": "green", "-": "red", "~": "yellow", ">": "cyan", "@": "bold"}
        console = Console(highlight=False)
        for line in text.splitlines():
            console.print(Text(line, style=styles.get(line.lstrip()[:1], "")), soft_wrap=True)
    else:
        click.echo(text, nl=False)


def _read_ir(path: str):
    from .ir.parser import IRParseError, parse_module
    try:
        return parse_module(Path(path).read_text(encoding="utf-8"))
    except (IRParseError, UnicodeDecodeError) as err:
        raise LLMOptError(f"{path} is not llmopt IR text: {err}",
                          "Give files written by llmopt ir -o or --dump-dir.") from None


def main(argv=None) -> None:
    """Entry point: run the CLI, turning LLMOptError into a one-paragraph message."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(USER_ERROR_EXIT)
    except LLMOptError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(USER_ERROR_EXIT)
    except Exception:  # noqa: BLE001 - anything else is a bug; say so
        traceback.print_exc()
        click.echo("error: internal error in llmopt (a bug); the traceback above helps us fix it.", err=True)
        sys.exit(INTERNAL_ERROR_EXIT)


if __name__ == "__main__":
    main()
