"""prune-wanda: the score is |W_ij| * ||X_j||_2 and each output row drops its lowest scores, the kept
weights unchanged; in a model, each linear is scored on the outputs of the already-pruned layers."""

import numpy as np

from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import run_module
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.prune import Level, PruneWanda, keep_mask, wanda_scores
from prune_data import CALIBRATION, K, TOKENS, WEIGHT


def test_wanda_score_is_weight_times_input_norm_and_rows_are_cut_alike():
    x = np.concatenate(CALIBRATION).reshape(-1, K).astype(np.float64)
    want = np.abs(WEIGHT.astype(np.float64)) * np.sqrt((x ** 2).sum(axis=0))
    np.testing.assert_allclose(wanda_scores(WEIGHT, CALIBRATION), want, rtol=1e-12)
    pruned = PruneWanda().prune_weight(WEIGHT, CALIBRATION, Level(sparsity=0.5))
    for row, scores, original in zip(pruned, want, WEIGHT):
        kept = np.argsort(scores)[K // 2:]
        np.testing.assert_array_equal(np.flatnonzero(row), np.sort(kept))
        np.testing.assert_array_equal(row[kept], original[kept])  # Wanda does not update weights


def linear_inputs(module, tokens) -> dict[str, list[np.ndarray]]:
    """Each prefill linear's inputs on every row of ``tokens``, by the weight it reads, from the interpreter."""
    func = module.functions["prefill"]
    weight_of = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
    readers = {n.inputs[0]: weight_of[n.inputs[1]] for n in func.nodes if n.op == "linear" and n.inputs[1] in weight_of}
    seen: dict[str, list[np.ndarray]] = {}
    for row in tokens:
        run_module(module, "prefill", {"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)},
                   on_node=lambda node, value: seen.setdefault(readers[node.name], []).append(value)
                   if node.name in readers else None)
    return seen


def test_wanda_calibrates_each_layer_on_the_already_pruned_layers(tiny_llama):
    """The pruned module's own linear inputs (the interpreter on the pruned model) are what the stream
    gave Wanda: recomputing each mask from them gives the pass's weights; the dense model's inputs do not."""
    module = PassManager(build_pipeline("default")).run(load_hf_folder(tiny_llama))  # fused q/k/v, gate/up
    result = PruneWanda().apply_with_tokens(module, TOKENS)
    pruned_inputs, dense_inputs = linear_inputs(result.module, TOKENS), linear_inputs(module, TOKENS)
    differ = 0
    for derived, inputs in pruned_inputs.items():
        if ".pruned-" not in derived:
            continue
        source = derived.partition(".pruned-")[0]
        original = module.weights.get(source)
        want = np.where(keep_mask(wanda_scores(original, inputs), Level(sparsity=0.5)), original, 0)
        np.testing.assert_array_equal(result.module.weights.get(derived), want)
        from_dense = np.where(keep_mask(wanda_scores(original, dense_inputs[source]), Level(sparsity=0.5)), original, 0)
        differ += not np.array_equal(from_dense, want)
    print(f"{differ} of 8 masks differ from the dense model's")
    assert len(pruned_inputs) == 9 and differ == 7  # 4 fused linears per layer and the lm_head; only the first
    # (q/k/v of layer 0, reading the embeddings) sees the same inputs as in the dense model
