"""``compact-sparse`` on the tiny Llama: after 2:4 pruning every pruned linear weight is stored as
values + indices and the model computes exactly what the pruned one did; dense weights stay.
(The op, the format and the codegen are tested in tests/prune/test_sparse_storage.py.)"""

from __future__ import annotations

import numpy as np

from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.verify import verify_module
from llmopt.passes import build_pipeline
from llmopt.passes.prune.compact import CompactSparse

FEED = {"ids": np.array([[1, 17, 99, 3, 42, 7]], np.int32), "pos": np.arange(6, dtype=np.int32)}


def test_compacts_the_pruned_weights_of_tiny_llama_and_keeps_its_logits(tiny_llama):
    module = load_hf_folder(tiny_llama)
    pruned = module
    for pass_ in build_pipeline("fuse-linears,fold-constants,prune-magnitude{nm=2:4}"):
        pruned = pass_.apply(pruned).module
    result = CompactSparse().apply(pruned)
    verify_module(result.module)
    stats = result.stats
    assert stats["weights_compacted"] == 8  # 4 fused linears per layer, 2 layers; lm_head stays dense (skip)
    assert stats["not_sparse"] >= 1  # lm_head
    assert stats["compact_bytes"] < 0.54 * stats["dense_bytes"]  # 2:4: 2.125 of every 4 bytes
    densified = [n for n in result.module.functions["logits"].nodes if n.op == "densify"]
    assert len(densified) == 8 and all((n.attr["n"], n.attr["m"]) == (2, 4) for n in densified)
    np.testing.assert_array_equal(run_module(result.module, "logits", FEED)["logits"],
                                  run_module(pruned, "logits", FEED)["logits"])
    dense = CompactSparse().apply(module)  # nothing pruned: nothing to compact
    assert dense.stats["weights_compacted"] == 0
