"""Quantized embedding tables in codegen and in artifacts.

Lowering: ``embedding(ids, dequantize(packed, scales[, zeros]))`` gathers the rows the ids pick
from the parts (IR layout, or the CPU kernels' blocked layout when a fused linear reads the same
``dequantize``) and dequantizes only those rows; never the whole table. Artifacts: a tiny Llama
with its own table scheme and a tiny Qwen2 whose tied table follows its quantized LM head compute
what the interpreter computes on the quantized IR, and store the table once, as codes and scales.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tvm
from tvm import relax

from llmopt.codegen.build import compile_module
from llmopt.codegen.kernels.cpu_linear import host_cpu_target
from llmopt.codegen.kernels.cpu_quant_linear import STORED_LAYOUT, supports
from llmopt.codegen.relax_module import Kernels, default_emit_linear, to_relax
from llmopt.codegen.weight_layout import packed_weights
from llmopt.compiler import BuildOptions, build, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.graph import Builder, Module
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.ir.types import TensorType
from llmopt.ir.weights import WeightStore
from llmopt.runtime import load
from llmopt.runtime.manifest import read_manifest
from llmopt.targets import get_target

from tiny_models import save_tiny

RNG = np.random.default_rng(0)
CPU = get_target("cpu")
# the generic path (what a target without our CPU kernels and layout gets, e.g. the GPU TE path)
GENERIC = dataclasses.replace(CPU, name="generic", emit_linear=None, emit_attention=None, emit_quant_linear=None,
                              quant_linear_supports=None, linear_weight_layout=None)
TARGETS = {"cpu": CPU, "generic": GENERIC}

# (scheme, vocab V, row width D): V not a multiple of the 64-row block; ragged groups (D not a
# multiple of the group: the last one short) for symmetric, asymmetric, NF4 and 3-bit codes
CASES = [("w4g32", 70, 40), ("w4g32-asym", 70, 40), ("nf4g64", 100, 80), ("w3g64", 40, 200), ("w8", 130, 64),
         ("w4g32-asym", 20, 96)]


def _table_module(name: str, vocab: int, width: int, with_linear: bool) -> tuple[Module, np.ndarray]:
    """``f(ids[1, seq], x[1, seq, D]) -> embedding(ids, t)`` for ``t = dequantize(...)`` (and
    ``linear(x, t)``, reading the same node, when ``with_linear``), and the dequantized table."""
    scheme = get_scheme(name)
    q = scheme.quantize(RNG.standard_normal((vocab, width)).astype(np.float32))
    store = WeightStore()
    for part, array in zip(["packed", "scales", "zeros"], [scheme.pack(q.codes), q.scales, q.zeros]):
        if array is not None:
            store.add_array(f"t.{part}", array)
    builder = Builder("f")
    ids = builder.param("ids", TensorType("i32", (1, "seq")))
    x = builder.param("x", TensorType("f32", (1, "seq", width)))
    table = builder.add("dequantize", *[builder.weight(n, store.type(n)) for n in store.names()],
                        scheme=name, out_features=vocab, in_features=width)
    builder.output("rows", builder.add("embedding", ids, table))
    if with_linear:
        builder.output("y", builder.add("linear", x, table))
    builder.output("s", builder.add("sum", x, axes=(2,)))  # (a second buffer size: codegen/shape_func_order.py
    # fails on a shape function of one store)
    return Module({"f": builder.finish()}, store), scheme.dequantize(q)


def _relax_functions(module: Module, spec) -> set[str]:
    """Names of the functions in ``module``'s Relax module for ``spec`` (as compile_module builds it)."""
    target = tvm.target.Target(spec.tvm_target(None))
    fuses = spec.quant_linear_supports if spec.emit_quant_linear else None
    layout = spec.linear_weight_layout() if spec.linear_weight_layout else None
    with target:
        packed = packed_weights(module, fuses) if layout is not None else set()
        kernels = Kernels(spec.emit_linear or default_emit_linear, spec.emit_attention, spec.emit_quant_linear, fuses)
        return {gv.name_hint for gv in to_relax(module, kernels, layout, packed).functions}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("with_linear", [True, False], ids=["tied", "table-only"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-v{c[1]}-d{c[2]}" for c in CASES])
def test_gather_dequantize_matches_numpy(case, with_linear, target):
    name, vocab, width = case
    spec = TARGETS[target]
    module, table = _table_module(name, vocab, width, with_linear)
    fused = target == "cpu" and with_linear and supports(get_scheme(name), vocab, width, host_cpu_target())
    library = compile_module(module, spec)
    parts = {n for n in module.weight_names()}
    assert library.packed == (parts if fused else set())  # blocked only when a linear kernel reads them
    functions = _relax_functions(module, spec)
    assert any(f.startswith("gather_dequantize") for f in functions)
    # the whole table is dequantized only for a linear with no fused kernel, never for the embedding
    assert any(f.startswith("dequantize") for f in functions) == (with_linear and not fused)
    stored = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    if fused:
        assert stored[0].shape == STORED_LAYOUT.packed_shape(vocab, get_scheme(name).packed_width(width))
    ids = np.array([[0, vocab - 1, 3, 3, vocab // 2, 1, vocab - 2]], np.int32)
    x = RNG.standard_normal((1, ids.shape[1], width)).astype(np.float32)
    got = relax.VirtualMachine(library.executable, tvm.cpu())["f"](tvm.runtime.tensor(ids), tvm.runtime.tensor(x),
                                                                 *stored)
    np.testing.assert_array_equal(got[0].numpy(), table[ids])  # the same f32 operations: exact
    want = run_module(module, "f", {"ids": ids, "x": x})
    np.testing.assert_array_equal(got[0].numpy(), want["rows"])
    if with_linear:
        np.testing.assert_allclose(got[1].numpy(), want["y"], rtol=0, atol=1e-5 * np.abs(want["y"]).max())


# ---- artifacts: tiny models, prefill and decode against the interpreter ------------------------

IDS = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8, 77, 2]
PROMPT = 9  # tokens prefilled; the rest are decoded one by one
PARTS = (".packed", ".scales", ".zeros")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def table_build(request, tmp_path_factory, tiny_llama):
    """(kind, options, quantized IR, artifact): the untied tiny Llama with its own table scheme and a
    w8 head; the tied tiny Qwen2 with its head (so its table) quantized w4g32."""
    if request.param == "llama":
        folder, options = tiny_llama, BuildOptions(quant="w4g32", quant_rules="embed_tokens=w4g32;lm_head=w8")
    else:
        folder = tmp_path_factory.mktemp("tiny_qwen2") / "hf"
        save_tiny("qwen2", folder)
        options = BuildOptions(quant="w4g32", quant_rules="lm_head=w4g32")
    out = tmp_path_factory.mktemp(f"artifact_{request.param}") / "artifact"
    build(load_hf_folder(folder), out, options)
    return request.param, optimize(load_hf_folder(folder), options), out


def test_artifact_matches_the_interpreter(table_build):
    _, quantized, out = table_build
    feed = {"ids": np.array([IDS], np.int32), "pos": np.arange(len(IDS), dtype=np.int32)}
    want = run_module(quantized, "logits", feed)["logits"][0]
    model = load(out)
    np.testing.assert_allclose(model.forward_logits(np.array(IDS)), want, atol=1e-5, rtol=0)
    logits, cache = model.prefill(np.array(IDS[:PROMPT]))
    np.testing.assert_allclose(logits, want[PROMPT - 1], atol=1e-5, rtol=0)
    for position in range(PROMPT, len(IDS)):
        logits, cache = model.decode(IDS[position], cache)
        np.testing.assert_allclose(logits, want[position], atol=1e-5, rtol=0)


def test_the_table_is_stored_once_as_codes(table_build):
    kind, quantized, out = table_build
    stored = {w.name: w for w in read_manifest(out).weights}
    assert set(stored) == set(quantized.weight_names())
    table = "model.embed_tokens.weight"
    assert table not in stored  # no f32 table left
    assert not [w for w in stored.values() if w.dtype == "float32" and len(w.shape) >= 2
                and not w.name.endswith(PARTS)]  # no f32 matrix at all: every linear and the table quantized
    codes = sorted(name for name in stored if name.startswith(table) and name.endswith(".packed"))
    assert codes == [f"{table}.w4g32.packed"]  # one set of codes (tied: shared with the head)
    scheme = get_scheme("w4g32")
    vocab, words = quantized.weights.type(f"{table}.w4g32.packed").shape
    if kind == "qwen2":  # the head's fused kernel reads the parts blocked; the embedding gathers from them
        assert stored[codes[0]].shape == STORED_LAYOUT.packed_shape(vocab, words)
        assert not [name for name in stored if name.startswith("lm_head")]
    else:  # only the embedding reads them: the IR layout
        assert stored[codes[0]].shape == (vocab, words)
        assert stored["lm_head.weight.w8.packed"].shape[2:] == (64,)
    table_bytes = sum(math.prod(w.shape) * 4 for name, w in stored.items() if name.startswith(table))
    width = words * scheme.codes_per_word  # 4-bit codes fill their words
    assert table_bytes == math.ceil(vocab / 64) * 64 * (width * scheme.bits // 8 + 4 * scheme.groups(width))
