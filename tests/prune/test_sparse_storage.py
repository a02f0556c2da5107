"""N:M-sparse weights stored compactly: the ``densify`` op, the ``compact-sparse`` pass, the CPU
kernels reading values + indices, and `llmopt build --prune magnitude:2:4` artifacts (smaller,
same results)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from llmopt.codegen.build import compile_module
from llmopt.codegen.lower_sparse import fused_densifies
from llmopt.compiler import BuildOptions, build, load, optimize
from llmopt.ir.graph import Builder, Module
from llmopt.ir.interp import run_module
from llmopt.ir.ops import OPS
from llmopt.ir.sparse_format import NMFormat
from llmopt.ir.types import TensorType
from llmopt.ir.weights import WeightStore
from llmopt.passes.prune import nm_mask
from llmopt.passes.prune.compact import CompactSparse
from llmopt.runtime import load as load_artifact
from llmopt.runtime.generate import generate
from llmopt.targets import get_target

RNG = np.random.default_rng(0)
FORMATS = [(2, 4), (4, 8), (1, 2)]


def _nm_sparse(rows: int, k: int, n: int, m: int) -> np.ndarray:
    """A random f32 ``[rows, k]`` with the n largest |w| of each group of m kept (some groups sparser)."""
    w = RNG.standard_normal((rows, k)).astype(np.float32)
    w = np.where(nm_mask(np.abs(w), n, m), w, np.float32(0))
    w[0, :m] = 0  # an empty group
    w[1, m:2 * m] = np.where(np.arange(m) == m - 1, w[1, m:2 * m] + 1, 0)  # one nonzero, at the last position
    return w


# ---- the op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, m", FORMATS)
def test_densify_reference_matches_a_direct_construction(n, m):
    rows, k = 6, 8 * m
    fmt, groups = NMFormat(n, m), k // m
    positions = np.stack([np.stack([np.sort(RNG.choice(m, n, replace=False)) for _ in range(groups)])
                          for _ in range(rows)])  # [rows, groups, n]
    values = RNG.standard_normal((rows, groups * n)).astype(np.float32)
    dense = np.zeros((rows, k), np.float32)
    words = np.zeros((rows, -(-groups * n * fmt.bits // 32)), np.uint64)
    for r in range(rows):
        for g in range(groups):
            for s in range(n):
                c = g * n + s
                dense[r, g * m + positions[r, g, s]] = values[r, c]
                words[r, c * fmt.bits // 32] |= np.uint64(positions[r, g, s]) << np.uint64(c * fmt.bits % 32)
    attrs = {"n": n, "m": m, "out_features": rows, "in_features": k}
    got = OPS["densify"].ref([values, words.astype(np.uint32)], attrs, {})
    np.testing.assert_array_equal(got, dense)
    assert fmt.bits == {2: 1, 4: 2, 8: 4}[m]


def test_densify_sums_values_at_one_position():
    fmt = NMFormat(2, 4)
    values = np.array([[1.5, 2.0, 3.0, -1.0]], np.float32)  # group 0: both at position 3; group 1: 0 and 2
    indices = fmt.pack(np.array([[3, 3, 0, 2]], np.uint8))
    np.testing.assert_array_equal(fmt.densify(values, indices, 8), [[0, 0, 0, 3.5, 3.0, 0, -1.0, 0]])


@pytest.mark.parametrize("n, m", FORMATS)
def test_compress_round_trips_and_refuses_denser_weights(n, m):
    fmt, w = NMFormat(n, m), _nm_sparse(5, 4 * m, n, m)
    values, indices = fmt.compress(w)
    assert values.shape == (5, 4 * n) and indices.dtype == np.uint32
    np.testing.assert_array_equal(fmt.densify(values, indices, 4 * m), w)
    w[2, :n + 1] = 1.0  # n + 1 nonzeros in one group
    assert not fmt.holds(w)
    with pytest.raises(ValueError, match=f"not {n}:{m} sparse"):
        fmt.compress(w)


# ---- the pass --------------------------------------------------------------------------------

def _module(weights: dict[str, np.ndarray], tied: str | None = None, bias: bool = True) -> Module:
    """Functions ``prefill`` (x [1, seq, K]) and ``decode`` (x [1, 1, K]), each chaining
    ``y = linear(x, w)`` through the weights given (all [K, K] but the last, [N, K]); with ``tied``,
    an embedding of that weight too."""
    store = WeightStore()
    for name, array in weights.items():
        store.add_array(name, array)
    n, k = list(weights.values())[-1].shape
    store.add_array("b", RNG.standard_normal(n).astype(np.float32))
    functions = {}
    for func, seq in (("prefill", "seq"), ("decode", 1)):
        b = Builder(func)
        y = b.param("x", TensorType("f32", (1, seq, k)))
        for i, name in enumerate(weights):
            last = i == len(weights) - 1
            operands = [b.weight(name, store.type(name))] + ([b.weight("b", store.type("b"))] if last and bias else [])
            y = b.add("linear", y, *operands)
        b.output("y", y)
        b.output("x2", b.add("add", y, y))  # (a second buffer size, see tests/codegen/test_cpu_quant_linear.py)
        if tied is not None:
            ids = b.param("ids", TensorType("i32", (1, seq)))
            b.output("e", b.add("embedding", ids, b.weight(tied, store.type(tied))))
        functions[func] = b.finish()
    return Module(functions, store)


def _inputs(func: str, k: int, seq: int = 3, ids: bool = False) -> dict:
    rows = 1 if func == "decode" else seq
    inputs = {"x": RNG.standard_normal((1, rows, k)).astype(np.float32)}
    return {**inputs, "ids": RNG.integers(0, 64, (1, rows)).astype(np.int32)} if ids else inputs


def test_pass_compacts_exactly_the_nm_sparse_linear_weights():
    k = 64
    weights = {"w24": _nm_sparse(k, k, 2, 4), "w48": _nm_sparse(k, k, 4, 8), "dense": RNG.standard_normal((k, k)),
               "tied": _nm_sparse(k, k, 2, 4), "w12": _nm_sparse(40, k, 1, 2)}
    weights = {name: np.asarray(w, np.float32) for name, w in weights.items()}
    module = _module(weights, tied="tied")
    result = CompactSparse().apply(module)
    out = result.module
    formats = {node.inputs[0]: (node.attr["n"], node.attr["m"]) for node in out.functions["decode"].nodes
               if node.op == "densify"}
    nodes = out.functions["decode"].node_map()
    assert {nodes[v].attr["name"]: nm for v, nm in formats.items()} == {
        "w24.2of4.values": (2, 4), "w48.4of8.values": (4, 8), "w12.1of2.values": (1, 2)}
    # w48 holds 4:8 only (not 2:4); w12 holds 1:2 and so 2:4 too, and 1:2 stores fewer bytes (1-bit indices)
    assert result.stats["compacted"] == 6 and result.stats["weights_compacted"] == 3
    assert result.stats["not_sparse"] == 1 and result.stats["not_linear_only"] == 1  # dense; tied (an embedding too)
    expected = sum(NMFormat(n, m).stored_bytes(*weights[w].shape) for w, (n, m) in
                   (("w24", (2, 4)), ("w48", (4, 8)), ("w12", (1, 2))))
    assert result.stats["compact_bytes"] == expected == 64 * (4 * 32 + 4 * 2) + 64 * (4 * 32 + 4 * 4) + 40 * (4 * 32 + 4)
    assert result.stats["dense_bytes"] == 4 * (64 * 64 * 2 + 40 * 64)
    assert out.weights.get("w48.4of8.indices").dtype == np.uint32
    for func in ("prefill", "decode"):
        inputs = _inputs(func, k, ids=True)
        before, after = run_module(module, func, inputs), run_module(out, func, inputs)
        for name in ("y", "e"):
            np.testing.assert_array_equal(after[name], before[name])


def test_pass_leaves_weights_that_would_not_shrink():
    k = 32
    unstructured = RNG.standard_normal((8, k)).astype(np.float32)
    unstructured[RNG.random((8, k)) < 0.5] = 0  # half zeros, not N:M
    result = CompactSparse(patterns="7:8").apply(_module({"w": _nm_sparse(8, k, 7, 8)}))  # 7:8 stores more than dense
    assert result.stats["weights_compacted"] == 0 and result.stats["not_sparse"] == 1
    assert CompactSparse().apply(_module({"w": unstructured})).stats["weights_compacted"] == 0


# ---- codegen ---------------------------------------------------------------------------------

def _run_compiled(module: Module, spec, func: str, inputs: dict) -> list[np.ndarray]:
    library = compile_module(module, spec)
    vm = relax.VirtualMachine(library.executable, tvm.cpu())
    stored = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    args = [tvm.runtime.tensor(inputs[p.name]) for p in module.functions[func].params]
    return [value.numpy() for value in vm[func](*args, *stored)]


@pytest.mark.parametrize("n, m", FORMATS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cpu_kernels_compute_the_sparse_linears(n, m, bias):
    k, rows = 96, 70  # 70 rows: not a multiple of the 64-row blocks of the prefill GEMM
    module = CompactSparse().apply(_module({"a": _nm_sparse(k, k, n, m), "w": _nm_sparse(rows, k, n, m)},
                                           bias=bias)).module
    cpu = get_target("cpu")
    with tvm.target.Target(cpu.tvm_target(None)):
        fused = fused_densifies(module.functions["decode"])
    assert len(fused) == 2  # both read only as linear weights, in a format the GEMV computes
    for func in ("decode", "prefill"):
        inputs = _inputs(func, k, seq=5)
        want = run_module(module, func, inputs)["y"]
        got = _run_compiled(module, cpu, func, inputs)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _kernel_names(library) -> str:
    """The assembly of the compiled library (its symbols name the kernels it runs)."""
    return "".join(lib.inspect_source("asm") for lib in library.executable.mod.imports)


# 2, 3: the GEMV's gathers per row (4 rows at most); 7: one block in 8-lane vectors; 16: one block;
# 33: a 3-block group; 68: a full group of 64 rows, then 4 rows in 4-lane vectors; 100: 64 + 36 rows
PREFILL_ROWS = [2, 3, 7, 16, 33, 68, 100]


@pytest.mark.parametrize("n, m", FORMATS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse_gemm_prefill_matches_the_interpreter(n, m, bias):
    """The prefill GEMM (values + indices read as stored, no dense weight) against the IR
    interpreter, at several M through one build (M is symbolic: every path of the kernel), for
    N = 70 (not a multiple of the 64-row blocks nor of the GEMM's 24-channel tasks) and K = 96
    (2:4: 3 index words per row; 1:2: one full 32-value word and a 16-value tail)."""
    k, rows = 96, 70
    module = CompactSparse().apply(_module({"w": _nm_sparse(rows, k, n, m)}, bias=bias)).module
    cpu = get_target("cpu")
    library = compile_module(module, cpu)
    names = _kernel_names(library)
    assert f"sparse_linear_gemm_{n}of{m}_n{rows}_k{k}" in names and "densify_blocked" not in names
    vm = relax.VirtualMachine(library.executable, tvm.cpu())
    stored = [tvm.runtime.tensor(array) for _, array in library.stored_weights(module)]
    for seq in PREFILL_ROWS:
        inputs = _inputs("prefill", k, seq=seq)
        want = run_module(module, "prefill", inputs)["y"]
        got = vm["prefill"](tvm.runtime.tensor(inputs["x"]), *stored)[0].numpy()
        assert got.shape == want.shape == (1, seq, rows)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"M={seq}")


def test_densified_fallback_matches_numpy():
    """emit_densified_linear (densify into the dense layout, then the dense GEMM): what prefill
    runs for formats the sparse GEMM does not cover, and the benchmark's old-prefill baseline."""
    from tvm import tirx

    from llmopt.codegen.kernels.cpu_linear import host_cpu_target
    from llmopt.codegen.kernels.cpu_sparse_linear import emit_densified_linear, supports_gemm

    fmt, rows, k = NMFormat(2, 4), 70, 96
    w = _nm_sparse(rows, k, 2, 4)
    values, indices = fmt.compress(w)
    target = host_cpu_target(1)
    assert supports_gemm(fmt, rows, k, target) and not supports_gemm(NMFormat(3, 8), rows, k, target)
    x = relax.Var("x", relax.TensorType([tirx.Var("m", "int64"), k], "float32"))
    operands = [relax.Var("values", relax.TensorType(list(values.shape), "float32")),
                relax.Var("indices", relax.TensorType(list(indices.shape), "uint32"))]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *operands]):
        with bb.dataflow():
            y = bb.emit_output(emit_densified_linear(bb, x, *operands, None, fmt=fmt, out_features=rows,
                                                     in_features=k, target=target))
        bb.emit_func_output(y)
    with target:
        vm = relax.VirtualMachine(tvm.compile(bb.get(), target), tvm.cpu())
    x_value = RNG.standard_normal((7, k)).astype(np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x_value, values, indices))).numpy()
    np.testing.assert_allclose(got, x_value @ w.T, rtol=0, atol=1e-4)


def test_cuda_lowers_densify_generically():
    """No sparse kernel on GPUs: the densify is materialized (a TE compute) and the dense linear
    reads it. The graph compiles for cuda, and the same graph run on the CPU computes the model."""
    import dataclasses

    from llmopt.targets.cpu import cpu_target
    k = 64
    module = CompactSparse().apply(_module({"w": _nm_sparse(48, k, 2, 4)})).module
    cuda = get_target("cuda")
    with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
        assert fused_densifies(module.functions["decode"]) == set()
    library = compile_module(module, cuda, "sm_80")
    assert library.executable is not None
    on_cpu = dataclasses.replace(cuda, tvm_target=lambda arch: cpu_target(None), schedule_rules=None,
                                 check_toolchain=None, compile_context=None, package_library=None)
    inputs = _inputs("prefill", k)
    want = run_module(module, "prefill", inputs)["y"]
    np.testing.assert_allclose(_run_compiled(module, on_cpu, "prefill", inputs)[0], want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


# ---- the built artifact ----------------------------------------------------------------------

IDS = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)


def _data_bytes(artifact: Path) -> int:
    """Bytes of tensor data in the artifact's safetensors files (file size less each header)."""
    total = 0
    for path in (artifact / "weights").glob("*.safetensors"):
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += path.stat().st_size - 8 - header
    return total


@pytest.fixture(scope="module")
def pruned_artifacts(tiny_llama, tmp_path_factory):
    """(compact, dense) artifacts of the tiny Llama built with --prune magnitude:2:4 (dense: stored plain)."""
    root = tmp_path_factory.mktemp("sparse_storage")
    build(tiny_llama, root / "compact", BuildOptions(prune="magnitude:2:4"))
    build(tiny_llama, root / "dense", BuildOptions(prune="magnitude:2:4", disabled_passes=("compact-sparse",),
                                                   weight_storage="plain"))
    return root / "compact", root / "dense"


def test_build_stores_nm_pruned_weights_compactly(pruned_artifacts):
    compact, dense = pruned_artifacts
    manifests = [json.loads((a / "manifest.json").read_text()) for a in pruned_artifacts]
    assert manifests[0]["pipeline"] == ["fuse-linears", "fold-constants", "prune-magnitude", "compact-sparse",
                                        "cse", "dce"]
    assert "compact-sparse" not in manifests[1]["pipeline"]
    shapes = [{w["name"]: (tuple(w["shape"]), w["dtype"]) for w in m["weights"]} for m in manifests]
    pruned = {name: shape for name, (shape, _) in shapes[1].items() if name.endswith(".pruned-2of4")}
    assert pruned and not any(name.endswith(".pruned-2of4") for name in shapes[0])
    # the dense pruned weights are stored in the CPU kernels' blocked layout [ceil(N/64), K, 64]
    expected = sum(4 * math.prod(shape) for name, (shape, _) in shapes[1].items() if name not in pruned)
    for name in pruned:
        n, k = _ir_shape(dense, name)
        assert shapes[0][f"{name}.2of4.values"] == ((n, k // 2), "float32")
        assert shapes[0][f"{name}.2of4.indices"] == ((n, -(-(k // 2) // 16)), "uint32")
        expected += n * (4 * (k // 2) + 4 * -(-(k // 2) // 16))
    assert _data_bytes(compact) == expected
    saved = _data_bytes(dense) - _data_bytes(compact)
    pruned_bytes = sum(4 * math.prod(shape) for shape in pruned.values())
    assert saved > 0.45 * pruned_bytes  # 2:4 keeps 2.125 of every 4 bytes (53.1 %)


def _ir_shape(artifact: Path, weight: str) -> tuple[int, int]:
    """[N, K] of ``weight`` as the IR declares it (model.ir: ``%3 = weight @name : f32[N, K]``)."""
    for line in (artifact / "model.ir").read_text().splitlines():
        if f"weight @{weight} : f32[" in line:
            dims = line.split(f"weight @{weight} : f32[", 1)[1].split("]", 1)[0]
            return tuple(int(d) for d in dims.split(","))
    raise AssertionError(f"{weight} not in model.ir")


def test_compact_artifact_matches_the_interpreter_and_the_dense_one(pruned_artifacts, tiny_llama):
    compact, dense = (load_artifact(a) for a in pruned_artifacts)
    module = optimize(load(tiny_llama), BuildOptions(prune="magnitude:2:4"))
    assert any(node.op == "densify" for node in module.functions["decode"].nodes)
    expected = run_module(module, "logits", {"ids": IDS[None], "pos": np.arange(len(IDS), dtype=np.int32)})
    np.testing.assert_allclose(compact.forward_logits(IDS), expected["logits"][0], atol=1e-4, rtol=0)
    tokens = [list(generate(model, IDS, max_new_tokens=12, stop_ids=())) for model in (compact, dense)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12
