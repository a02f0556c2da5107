"""prune-structured: importance scores against direct numpy references, the global / uniform plans,
and on the tiny GQA Llama (4 query heads, 2 kv heads): smaller shapes in every function, GQA kept,
the shrunk model equal to the dense one with the removed heads' and channels' columns zeroed, a
zero fraction a no-op, bias compensation closer to dense, wanda-sp's sequential choice, the
build placing it before fuse-linears, and the artifact (per-layer KV cache) matching the interpreter."""

import json

import numpy as np
import pytest

from llmopt.compiler import BuildOptions, build, load, optimize
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import run_module, verify_module
from llmopt.ir.weights import WeightStore
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.prune import PruneStructured, pruning_pass
from llmopt.passes.prune.blocks import AttentionBlock, MlpBlock, Projection, find_blocks
from llmopt.passes.prune.importance import (InputStats, fluctuation, group_sums, standardized, structure_scores,
                                            wanda_sp)
from llmopt.passes.prune.shrink import kept_head_rows
from llmopt.passes.prune.structure_plan import (channel_cost, chunk_sizes, global_removal, group_cost, min_channels,
                                                uniform_counts)
from llmopt.runtime import load as load_artifact
from llmopt.runtime.manifest import read_manifest
from prune_data import CALIBRATION, K, TOKENS, WEIGHT

FEED = {"ids": TOKENS[:1], "pos": np.arange(TOKENS.shape[1], dtype=np.int32)}


def test_input_stats_and_scores_match_numpy():
    x = np.concatenate(CALIBRATION).reshape(-1, K).astype(np.float64)
    stats = InputStats.of(CALIBRATION, K)
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.variance, x.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.square_sum, (x ** 2).sum(axis=0), rtol=1e-12)
    w = WEIGHT.astype(np.float64)
    np.testing.assert_allclose(fluctuation(WEIGHT, stats), x.var(axis=0) * (w ** 2).sum(axis=0), rtol=1e-9)
    wanda = np.array([sum(abs(w[i, j]) * np.sqrt((x[:, j] ** 2).sum()) for i in range(w.shape[0]))
                      for j in range(K)])
    np.testing.assert_allclose(wanda_sp(WEIGHT, stats), wanda, rtol=1e-10)
    # kv groups of 2 query heads of 16 dims: 8 groups of 32 columns each
    np.testing.assert_allclose(group_sums(wanda, 8), [wanda[g * 32:(g + 1) * 32].sum() for g in range(8)], rtol=1e-12)
    np.testing.assert_allclose(standardized(wanda), (wanda - wanda.mean()) / wanda.std(ddof=1), rtol=1e-12)
    flap = fluctuation(WEIGHT, stats)
    np.testing.assert_allclose(structure_scores("flap", "attention", flap, True), standardized(flap ** 2), rtol=1e-12)
    np.testing.assert_allclose(structure_scores("flap", "mlp", flap, True), standardized(flap), rtol=1e-12)
    np.testing.assert_array_equal(structure_scores("wanda-sp", "mlp", wanda, False), wanda)


def projection(name: str, out_features: int, in_features: int) -> Projection:
    return Projection(name, name, None, out_features, in_features, name)


def attention_block(name: str, kv_heads: int = 2, group: int = 2, head_dim: int = 4, hidden: int = 8):
    q = kv_heads * group * head_dim
    return AttentionBlock(projection(f"{name}.q", q, hidden), projection(f"{name}.k", kv_heads * head_dim, hidden),
                          projection(f"{name}.v", kv_heads * head_dim, hidden), projection(name, hidden, q),
                          ("", "", "", ""), None, kv_heads * group, kv_heads, head_dim)


def mlp_block(name: str, intermediate: int = 32, hidden: int = 8) -> MlpBlock:
    return MlpBlock(projection(f"{name}.gate", intermediate, hidden), projection(f"{name}.up", intermediate, hidden),
                    projection(name, hidden, intermediate))


def test_global_plan_removes_the_lowest_units_up_to_the_target():
    a0, a1, m0, m1 = attention_block("a0"), attention_block("a1"), mlp_block("m0"), mlp_block("m1")
    assert group_cost(a0) == 2 * 4 * (8 + 8) + 4 * (8 + 8) and channel_cost(m0) == 24
    rng = np.random.default_rng(0)
    s0, s1 = rng.standard_normal(32), rng.standard_normal(32) + 0.5
    heads = {"a0": (a0, np.array([-3.0, 1.0])), "a1": (a1, np.array([-2.0, -5.0]))}
    channels = {"m0": (m0, s0), "m1": (m1, s1)}
    target = 2 * group_cost(a0) + 10 * channel_cost(m0)  # two groups and ten channels' worth
    removal = global_removal(heads, channels, target, multiple=1)
    assert removal.groups == {"a0": (0,), "a1": (1,)}  # a1 keeps its other group although it scores -2
    removed = sorted([(s, "m0", j) for j, s in enumerate(s0)] + [(s, "m1", j) for j, s in enumerate(s1)])[:10]
    for key in ("m0", "m1"):
        assert removal.channels.get(key, ()) == tuple(sorted(j for _, k, j in removed if k == key))
    assert removal.params([a0, a1], [m0, m1]) == target
    # in chunks of 8 channels (lowest first): a chunk's score is its mean; 10 channels' worth -> one chunk
    # (8 channels; taking a second, 16, overshoots by more than stopping misses)
    chunked = global_removal(heads, channels, target, multiple=8)
    assert sum(map(len, chunked.channels.values())) == 8
    key = next(iter(chunked.channels))
    scores = s0 if key == "m0" else s1
    assert chunked.channels[key] == tuple(sorted(np.argsort(scores, kind="stable")[:8]))


def test_plans_keep_a_group_and_some_channels_per_block():
    a, m = attention_block("a"), mlp_block("m", intermediate=40)
    everything = group_cost(a) * 2 + channel_cost(m) * 40
    removal = global_removal({"a": (a, np.zeros(2))}, {"m": (m, np.arange(40.0))}, everything, multiple=8)
    assert len(removal.groups["a"]) == 1
    kept = 40 - len(removal.channels["m"])
    assert kept >= min_channels(40) and kept % 8 == 0  # chunks of 8 after a first chunk of 40 % 8 = 0 -> 8
    assert chunk_sizes(40, 8) == [8] * 5 and chunk_sizes(42, 8) == [2] + [8] * 5 and chunk_sizes(5, 8) == [5]
    groups, channels = uniform_counts([a], [m], 0.5, 0.5 * (everything + 0), multiple=1)
    assert groups == {"a": 1}  # floor(0.5 * 2)
    assert channels == {"m": round((0.5 * everything - group_cost(a)) / channel_cost(m))}


def shapes(module, func="prefill"):
    return {n.attr["name"]: n.type.shape for n in module.functions[func].nodes if n.op == "weight"}


@pytest.fixture(scope="module")
def dense(tiny_llama):
    return load_hf_folder(tiny_llama)


@pytest.fixture(scope="module")
def half(dense):
    """flap at half the parameters, single channels, no compensation: removes a kv group."""
    return PruneStructured(sparsity=0.5, channel_multiple=1, compensate="no").apply_with_tokens(dense, TOKENS)


def test_shapes_shrink_consistently_in_every_function(dense, half):
    verify_module(half.module)
    stats = half.stats
    assert stats["kv_groups_removed"] >= 1 and stats["channels_removed"] > 0
    assert stats["params"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 96)  # q, o; k, v; gate, up, down
    assert abs(stats["removed_fraction"] - 0.5) < 0.01
    layers = half.module.meta["decoder"]["layers"]
    kv = half.module.meta["kv_cache"]["layer_kv_heads"]
    assert [layer["num_kv_heads"] for layer in layers] == kv and min(kv) >= 1 and kv != [2, 2]
    params = 0
    for name, func in half.module.functions.items():
        attention, mlp = find_blocks(func)
        assert len(attention) == len(mlp) == 2
        weights = shapes(half.module, name)
        for i, (a, m, layer) in enumerate(zip(attention, mlp, layers)):
            assert a.heads % a.kv_heads == 0 and a.heads // a.kv_heads == 2  # GQA: same group size
            assert (a.heads, a.kv_heads, m.intermediate) == (layer["num_heads"], layer["num_kv_heads"],
                                                             layer["intermediate_size"])
            assert weights[a.q.weight] == (a.heads * 16, 64) and weights[a.k.weight] == (a.kv_heads * 16, 64)
            assert weights[a.v.weight] == (a.kv_heads * 16, 64) and weights[a.o.weight] == (64, a.heads * 16)
            assert weights[m.gate.weight] == weights[m.up.weight] == (m.intermediate, 64)
            assert weights[m.down.weight] == (64, m.intermediate)
            if name == "decode":
                types = func.types()
                assert a.cache == (f"k.{i}", f"v.{i}")
                assert types[f"k.{i}"].shape[2] == types[f"v.{i}"].shape[2] == a.kv_heads
            if name == "prefill":
                params += sum(p.out_features * p.in_features for p in [*a.projections(), *m.projections()])
                outputs = dict(func.outputs)
                assert func.types()[outputs[f"k.{i}"]].shape[2] == a.kv_heads
    assert params == stats["params"] - stats["params_removed"]
    for func in half.module.functions.values():  # a weight is either the original or a derived, shrunk one
        for node in func.nodes:
            if node.op == "weight" and ".pruned-structured" not in node.attr["name"]:
                assert node.type == dense.weights.type(node.attr["name"])
            elif node.op == "weight":
                assert node.created_by == "prune-structured"


def masked_dense(dense, half) -> tuple:
    """The dense module with the o_proj columns of the removed heads and the down_proj columns of the
    removed channels zeroed (what removing them means), from the pruned module's kept weights."""
    store = WeightStore()
    for name in dense.weights:
        entry = dense.weights.entry(name)
        store.add(name, entry.type, entry.load, entry.origin)
    attention, mlp = find_blocks(dense.functions["prefill"])
    for a, layer in zip(attention, half.module.meta["decoder"]["layers"]):
        o = dense.weights.get(a.o.weight)
        pruned_o = half.module.weights.get(a.o.weight + ".pruned-structured") \
            if a.o.weight + ".pruned-structured" in half.module.weights else o
        kept_columns = [j for j in range(o.shape[1]) if any(np.array_equal(o[:, j], c) for c in pruned_o.T)]
        assert len(kept_columns) == layer["num_heads"] * 16
        masked = np.zeros_like(o)
        masked[:, kept_columns] = o[:, kept_columns]
        store.add_array(a.o.weight, masked)
    for m, layer in zip(mlp, half.module.meta["decoder"]["layers"]):
        down = dense.weights.get(m.down.weight)
        pruned = half.module.weights.get(m.down.weight + ".pruned-structured")
        kept = [j for j in range(down.shape[1]) if any(np.array_equal(down[:, j], c) for c in pruned.T)]
        assert len(kept) == layer["intermediate_size"]
        masked = np.zeros_like(down)
        masked[:, kept] = down[:, kept]
        store.add_array(m.down.weight, masked)
    return type(dense)(dense.functions, store, dense.meta)


def test_shrunk_model_equals_dense_with_removed_structures_zeroed(dense, half):
    """Removing a kv group (its q/k/v rows and o_proj columns) or an MLP channel is zeroing the o_proj /
    down_proj columns it feeds: the rows kept in q/k/v must be the heads whose o_proj columns are kept."""
    reference = masked_dense(dense, half)
    for entry in ("logits", "prefill"):
        want = run_module(reference, entry, FEED)["logits"]
        got = run_module(half.module, entry, FEED)["logits"]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.abs(run_module(dense, "logits", FEED)["logits"] - want).max() > 1e-2  # the pruning did something


def test_decode_extends_the_smaller_cache_like_logits(half):
    out = run_module(half.module, "prefill", FEED)
    n = FEED["ids"].shape[1]
    caches = {k: np.concatenate([v, np.zeros((1, 4) + v.shape[2:], v.dtype)], axis=1)
              for k, v in out.items() if k != "logits"}  # capacity for the new row
    step = run_module(half.module, "decode", {"ids": np.array([[5]], np.int32),
                                              "pos": np.array([n], np.int32), **caches})
    ids = np.append(FEED["ids"][0], 5).astype(np.int32)[None]
    full = run_module(half.module, "logits", {"ids": ids, "pos": np.arange(n + 1, dtype=np.int32)})["logits"]
    np.testing.assert_allclose(step["logits"][0, 0], full[0, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("metric", ["flap", "wanda-sp"])
def test_zero_fraction_leaves_the_model_unchanged(dense, metric):
    result = PruneStructured(sparsity=0.0, metric=metric).apply_with_tokens(dense, TOKENS)
    assert result.module.functions == dense.functions and result.stats["params_removed"] == 0
    np.testing.assert_array_equal(run_module(result.module, "logits", FEED)["logits"],
                                  run_module(dense, "logits", FEED)["logits"])


def o_and_down_inputs(module) -> dict[str, np.ndarray]:
    """Every token's input to each o_proj and down_proj on TOKENS (interpreter), by weight name."""
    func = module.functions["prefill"]
    attention, mlp = find_blocks(func)
    nodes = func.node_map()
    readers = {nodes[b.projections()[-1].value].inputs[0]: b.key for b in [*attention, *mlp]}
    seen: dict[str, list] = {}
    for row in TOKENS:
        run_module(module, "prefill", {"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)},
                   on_node=lambda node, value: seen.setdefault(readers[node.name], []).append(value)
                   if node.name in readers else None)
    return {key: np.concatenate(values).reshape(-1, values[0].shape[-1]) for key, values in seen.items()}


def test_bias_compensation_adds_the_removed_mean_and_moves_toward_dense(dense, half):
    compensated = PruneStructured(sparsity=0.5, channel_multiple=1).apply_with_tokens(dense, TOKENS)
    assert compensated.stats["params_removed"] == half.stats["params_removed"]  # same structures removed
    inputs = o_and_down_inputs(dense)  # FLaP calibrates on the dense model
    attention, mlp = find_blocks(dense.functions["prefill"])
    for block in [*attention, *mlp]:
        pruned = block.key + ".pruned-structured"
        if pruned not in half.module.weights:
            continue
        w, kept = dense.weights.get(block.key), half.module.weights.get(pruned)
        removed = [j for j in range(w.shape[1]) if not any(np.array_equal(w[:, j], c) for c in kept.T)]
        want = w[:, removed].astype(np.float64) @ inputs[block.key][:, removed].astype(np.float64).mean(axis=0)
        bias = compensated.module.weights.get(block.key.removesuffix(".weight") + ".bias.pruned-structured")
        np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)
    errors = {}
    for name, module in (("with", compensated.module), ("without", half.module)):
        errors[name] = np.mean([np.mean((run_module(module, "logits", feed)["logits"]
                                         - run_module(dense, "logits", feed)["logits"]) ** 2)
                                for feed in ({"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)}
                                             for row in TOKENS)])
    print(f"mean squared logit error vs dense on the calibration tokens: {errors}")
    assert errors["with"] < 0.85 * errors["without"]


def test_wanda_sp_scores_each_block_on_the_already_pruned_model(dense):
    result = PruneStructured(sparsity=0.3, metric="wanda-sp", channel_multiple=1).apply_with_tokens(dense, TOKENS)
    assert result.stats["kv_groups_removed"] == 0  # floor(0.3 * 2) groups per layer
    layers = result.module.meta["decoder"]["layers"]
    assert layers[0]["intermediate_size"] == layers[1]["intermediate_size"]  # uniform
    _, mlp = find_blocks(dense.functions["prefill"])
    inputs = o_and_down_inputs(dense)  # the first MLP's inputs: the same in the dense and the pruned model
    down = dense.weights.get(mlp[0].key)
    scores = wanda_sp(down, InputStats.of([inputs[mlp[0].key]], down.shape[1]))
    removed = 96 - layers[0]["intermediate_size"]
    want = np.sort(np.argsort(scores, kind="stable")[:removed])
    kept = result.module.weights.get(mlp[0].key + ".pruned-structured")
    np.testing.assert_array_equal(kept, down[:, np.setdiff1d(np.arange(96), want)])
    assert not any("bias" in n for n in result.module.weights.names() if "pruned" in n)  # no compensation


def test_kept_head_rows_follow_the_attention_grouping():
    block = attention_block("a", kv_heads=3, group=2, head_dim=2)
    q, kv = kept_head_rows(block, (1,))
    np.testing.assert_array_equal(q, [0, 1, 2, 3, 8, 9, 10, 11])  # query heads 0, 1 and 4, 5
    np.testing.assert_array_equal(kv, [0, 1, 4, 5])  # kv heads 0 and 2


def test_options_and_fused_graphs_are_user_errors(dense):
    for options in ({"metric": "magnitude"}, {"nm": "2:4"}, {"rules": "layers.0=0.3"}, {"allocation": "x"},
                    {"channel_multiple": 0}):
        with pytest.raises(LLMOptError):
            PruneStructured(**options)
    with pytest.raises(LLMOptError, match="flap removes a fraction"):
        pruning_pass("flap:2:4")
    assert pruning_pass("wanda-sp:0.25").metric == "wanda-sp" and pruning_pass("flap:0.2").sparsity == 0.2
    fused = PassManager(build_pipeline("fuse-linears,fold-constants,dce")).run(dense)
    with pytest.raises(LLMOptError, match="fused"):
        PruneStructured().apply_with_tokens(fused, TOKENS)


def test_skip_rules_keep_layers_whole(dense):
    result = PruneStructured(sparsity=0.3, channel_multiple=1, rules="layers.0.=skip").apply_with_tokens(dense, TOKENS)
    layers = result.module.meta["decoder"]["layers"]
    assert layers[0] == {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96}
    assert layers[1]["intermediate_size"] < 96


def test_build_prunes_before_fusion_and_the_artifact_matches_the_interpreter(tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 37) % 128}" for i in range(600)))
    calibration = (("calibration", str(text)), ("samples", "4"), ("seq_len", "16"))
    options = BuildOptions(prune="flap:0.5", calibration=calibration)
    build(tiny_llama, tmp_path / "dense", BuildOptions())
    build(tiny_llama, tmp_path / "flap", options)
    manifest = json.loads((tmp_path / "flap" / "manifest.json").read_text())
    assert manifest["pipeline"] == ["prune-structured", "fuse-linears", "fold-constants", "cse", "dce"]
    module = optimize(load(tiny_llama), options)
    kv = module.meta["kv_cache"]["layer_kv_heads"]
    assert read_manifest(tmp_path / "flap").kv_cache.layer_kv_heads == tuple(kv) and kv != [2, 2]
    sizes = {name: sum(f.stat().st_size for f in (tmp_path / name / "weights").iterdir()) for name in ("dense", "flap")}
    assert sizes["flap"] < sizes["dense"]

    artifact = load_artifact(tmp_path / "flap")
    ids = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)
    expected = run_module(module, "logits", {"ids": ids[None], "pos": np.arange(len(ids), dtype=np.int32)})["logits"]
    np.testing.assert_allclose(artifact.forward_logits(ids), expected[0], atol=1e-4, rtol=0)
    logits, cache = artifact.prefill(ids)
    assert [t.shape[2] for t in cache.tensors] == [h for h in kv for _ in "kv"]
    np.testing.assert_allclose(logits, expected[0, -1], atol=1e-4, rtol=0)
    for token in (5, 77, 3):  # decode on the per-layer cache vs the interpreter on the whole sequence
        logits, cache = artifact.decode(token, cache)
        ids = np.append(ids, token).astype(np.int32)
        want = run_module(module, "logits", {"ids": ids[None], "pos": np.arange(len(ids), dtype=np.int32)})["logits"]
        np.testing.assert_allclose(logits, want[0, -1], atol=1e-4, rtol=0)


def test_manifest_kv_cache_describes_per_layer_heads():
    from llmopt.runtime.manifest import KVCacheInfo
    info = KVCacheInfo(layers=3, kv_heads=3, head_dim=64, dtype="f32", layer_kv_heads=[3, 2, 1])
    assert info.layer_kv_heads == (3, 2, 1) and info.kv_heads_of(1) == 2 and info.total_kv_heads() == 6
    assert KVCacheInfo(layers=2, kv_heads=3, head_dim=64, dtype="f32").total_kv_heads() == 6
    with pytest.raises(TypeError):
        KVCacheInfo(layers=2, kv_heads=3, head_dim=64, dtype="f32", layer_kv_heads=[3])
