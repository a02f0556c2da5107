"""`llmopt eval MODEL --compare SPECS`: one row per quantization variant, fp32 first, with sizes,
speed, perplexity and KL against fp32 that match independent computations on separately built artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from llmopt.cli import main
from llmopt.compare import Comparison, render_table
from llmopt.errors import USER_ERROR_EXIT
from llmopt.runtime import load
from llmopt.runtime.perplexity import perplexity, windows
from tiny_models import VOCAB

CONTEXT, TOKENS = 32, 256
SPECS = "w8,fp32,w4g32-asym,w8"  # fp32 moves first, the repeated w8 is dropped


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Words of the tiny word-level vocabulary, in a fixed pseudo-random order."""
    path = tmp_path_factory.mktemp("compare_text") / "words.txt"
    rng = np.random.default_rng(0)
    path.write_text(" ".join(f"w{i}" for i in rng.integers(0, VOCAB, size=600)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compared(tiny_llama, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_out")
    main(["eval", str(tiny_llama), "--compare", SPECS, "--text", str(text), "--context", str(CONTEXT),
          "--tokens", str(TOKENS), "--threads", "1", "--out-dir", str(out), "--keep-artifacts"])  # returns on success
    return out, json.loads((out / "compare.json").read_text())


@pytest.fixture(scope="module")
def artifacts(compared):
    """The variants' artifacts, kept by --keep-artifacts: the rows are recomputed from them here."""
    folder = compared[0] / "artifacts"
    assert [row["artifact"] for row in compared[1]["rows"]] == [str(folder / name) for name in ("fp32", "w8", "w4g32-asym")]
    return folder


def _rows(compared) -> dict:
    return {row["spec"]: row for row in compared[1]["rows"]}


def test_rows_come_in_order_with_fp32_first(compared):
    _, data = compared
    assert [row["spec"] for row in data["rows"]] == ["fp32", "w8", "w4g32-asym"]
    settings = data["settings"]
    assert (settings["context"], settings["tokens"], settings["windows"], settings["scored"], settings["threads"]) == (
        CONTEXT, TOKENS, TOKENS // CONTEXT, TOKENS // CONTEXT * (CONTEXT - 1), 1)


def test_fp32_row_is_the_plain_perplexity_with_zero_kl(compared, artifacts, text):
    fp32 = _rows(compared)["fp32"]
    model = load(artifacts / "fp32")
    ids = model.tokenizer.encode(text.read_text(encoding="utf-8"))
    expected = perplexity(model.forward_logits, ids, CONTEXT, TOKENS)
    assert fp32["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert 1 < fp32["perplexity"] < 10 * VOCAB  # a random model: around the vocabulary size
    assert abs(fp32["kl_mean"]) < 1e-9 and fp32["top1_agreement"] == 1.0


def test_quantized_row_matches_torch_kl_and_perplexity(compared, artifacts, text):
    row = _rows(compared)["w4g32-asym"]
    fp32, quant = load(artifacts / "fp32"), load(artifacts / "w4g32-asym")
    ids = np.asarray(fp32.tokenizer.encode(text.read_text(encoding="utf-8")))[:TOKENS]
    kl, nll, agree = [], [], []
    for window in windows(ids, CONTEXT):
        p = torch.log_softmax(torch.from_numpy(fp32.forward_logits(window)[:-1]).double(), dim=-1)
        q = torch.log_softmax(torch.from_numpy(quant.forward_logits(window)[:-1]).double(), dim=-1)
        kl.append(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1))
        nll.append(-q[torch.arange(len(window) - 1), torch.from_numpy(window[1:])])
        agree.append(p.argmax(-1) == q.argmax(-1))
    assert row["kl_mean"] == pytest.approx(torch.cat(kl).mean().item(), rel=1e-4)
    assert row["kl_mean"] > 1e-6
    assert row["perplexity"] == pytest.approx(torch.cat(nll).mean().exp().item(), rel=1e-9)
    assert row["top1_agreement"] == pytest.approx(torch.cat(agree).double().mean().item())
    assert _rows(compared)["w8"]["kl_mean"] > 0


def test_sizes_shrink_with_the_bits(compared, artifacts, tiny_llama):
    rows = _rows(compared)
    parameters = _hf_parameters(tiny_llama)  # every value of the checkpoint, stored once by fp32
    assert compared[1]["settings"]["parameters"] == parameters
    for spec in ("fp32", "w4g32-asym"):  # same builds, same shard bytes
        shard_bytes = sum(p.stat().st_size for p in (artifacts / spec / "weights").iterdir())
        assert rows[spec]["weight_bytes"] == shard_bytes
        assert rows[spec]["artifact_bytes"] > rows[spec]["weight_bytes"]
    assert 4 <= rows["fp32"]["bytes_per_param"] < 4.1  # f32, plus the safetensors header
    assert rows["fp32"]["weight_bytes"] > rows["w8"]["weight_bytes"] > rows["w4g32-asym"]["weight_bytes"]
    assert rows["w8"]["bytes_per_param"] == pytest.approx(rows["w8"]["weight_bytes"] / parameters)


def _hf_parameters(folder) -> int:
    from safetensors.numpy import load_file
    return sum(array.size for array in load_file(folder / "model.safetensors").values())


def test_speed_and_memory_are_measured(compared):
    for row in compared[1]["rows"]:
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
        assert 50 < row["peak_rss_mib"] < 4096  # python + TVM + a tiny model, in its own child process


def test_json_markdown_and_table_hold_the_rows(compared):
    out, data = compared
    markdown = (out / "compare.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table_lines] == ["| variant", "| fp32", "| w8", "| w4g32-asym"]
    for line, row in zip(table_lines[1:], data["rows"]):
        assert f"| {row['perplexity']:.4f} |" in line and f"| {row['kl_mean']:.4g} |" in line
    assert f"{TOKENS // CONTEXT} windows of {CONTEXT} tokens" in markdown
    console = Console(record=True, width=200)
    console.print(render_table(Comparison(data["settings"], data["rows"])))
    shown = console.export_text()
    assert all(f"{row['perplexity']:.4f}" in shown for row in data["rows"])


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_spec_is_a_user_error(tiny_llama, text, tmp_path, capsys):
    err = _fails(["eval", str(tiny_llama), "--compare", "w8,nosuch4", "--text", str(text), "--context", str(CONTEXT),
                  "--tokens", str(TOKENS), "--out-dir", str(tmp_path / "out")], capsys)
    assert "'nosuch4'" in err and "--compare" in err
    assert not (tmp_path / "out").exists()


def test_an_artifact_cannot_be_compared(artifacts, capsys):
    err = _fails(["eval", str(artifacts / "fp32"), "--compare", "w8"], capsys)
    assert "is an artifact" in err and "hint:" in err


def test_threads_need_compare(artifacts, capsys):
    assert "apply only to eval --compare" in _fails(["eval", str(artifacts / "fp32"), "--threads", "2"], capsys)


MIXED = "prune=magnitude:0.5,lowrank=svd:0.3+w8,prune=magnitude:2:4+quant=w4g32,dtype=fp16"


@pytest.fixture(scope="module")
def mixed(tiny_llama, text, tmp_path_factory):
    """A comparison of pruned, factorized and mixed variants (calibration-free methods, to stay quick)."""
    out = tmp_path_factory.mktemp("compare_mixed")
    main(["eval", str(tiny_llama), "--compare", MIXED, "--text", str(text), "--context", str(CONTEXT),
          "--tokens", str(TOKENS), "--threads", "1", "--out-dir", str(out), "--keep-artifacts"])
    return out, json.loads((out / "compare.json").read_text())


def test_pruned_and_factorized_variants_get_rows(mixed, tiny_llama):
    from llmopt.compare import parse_variant
    from llmopt.compiler import BuildOptions, load as trace, optimize
    from llmopt.ir.parameters import logical_parameters
    from llmopt.runtime.artifact_weights import read_weights
    from llmopt.runtime.manifest import read_manifest
    out, data = mixed
    rows = {row["spec"]: row for row in data["rows"]}
    assert list(rows) == ["fp32", *MIXED.split(",")]
    dense = _hf_parameters(tiny_llama)
    assert rows["fp32"]["parameters"] == dense
    assert rows["prune=magnitude:0.5"]["parameters"] == dense  # unstructured zeros are still parameters
    factorized = rows["lowrank=svd:0.3+w8"]["parameters"]
    assert factorized < dense
    assert factorized == logical_parameters(optimize(trace(str(tiny_llama)), BuildOptions(
        **vars(parse_variant("lowrank=svd:0.3+w8")))))
    for spec in MIXED.split(","):
        assert rows[spec]["perplexity"] != rows["fp32"]["perplexity"] and rows[spec]["kl_mean"] > 0
    assert rows["prune=magnitude:2:4+quant=w4g32"]["weight_bytes"] < rows["lowrank=svd:0.3+w8"]["weight_bytes"]
    half = rows["dtype=fp16"]["weight_bytes"] / rows["fp32"]["weight_bytes"]  # f16 matrices, f32 norm weights
    assert 0.5 < half < 0.52 and rows["dtype=fp16"]["parameters"] == dense
    assert rows["dtype=fp16"]["kl_mean"] < 1e-5 < rows["prune=magnitude:0.5"]["kl_mean"]
    artifact = out / "artifacts" / "prune_magnitude_0.5"
    manifest = read_manifest(artifact)
    projections = [a for i, a in read_weights(artifact, manifest)  # decoded: pruned weights are stored encoded
                   if "layers" in manifest.weights[i].name and "norm" not in manifest.weights[i].name]
    assert any(w.encoding for w in manifest.weights)
    zeros = sum(int((a == 0).sum()) for a in projections) / sum(a.size for a in projections)
    assert 0.45 < zeros < 0.55  # half of every layer's linear weights, in the stored (blocked) layout
    markdown = (out / "compare.md").read_text()
    assert all(f"| {spec} |" in markdown for spec in rows)


@pytest.mark.parametrize("spec, message", [
    ("foo=bar", "'foo=bar' is not a step"),
    ("prune=magnitude:0.5+prune=wanda:0.5", "has two prune steps"),
    ("prune=nosuch:0.5", "'prune=nosuch:0.5'"),
    ("lowrank=svd:2", "'lowrank=svd:2'"),
    ("w8+dtype=fp8", "dtype=fp8 is not one of fp32, fp16"),
    ("w8+kv=int4", "kv=int4 is not one of f32, int8"),
    ("kv=int8+kv=f32", "has two kv steps"),
])
def test_bad_variant_steps_are_user_errors(tiny_llama, text, tmp_path, capsys, spec, message):
    err = _fails(["eval", str(tiny_llama), "--compare", spec, "--text", str(text), "--context", str(CONTEXT),
                  "--tokens", str(TOKENS), "--out-dir", str(tmp_path / "out")], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()
