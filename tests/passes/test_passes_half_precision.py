"""``half-precision`` as a pipeline step: named in a pipeline spec it gives a verified f16 module
that computes what the fp32 one does within f16's rounding. (The pass in builds, its refusals and
the GPU graph are tested in tests/targets/test_fp16.py.)"""

from __future__ import annotations

import numpy as np

from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.verify import verify_module
from llmopt.passes import build_pipeline
from llmopt.passes.manager import PassManager

FEED = {"ids": np.array([[1, 17, 99, 3, 42, 7]], np.int32), "pos": np.arange(6, dtype=np.int32)}


def test_pipeline_spec_runs_half_precision_last(tiny_llama):
    module = load_hf_folder(tiny_llama)
    manager = PassManager(build_pipeline("fuse-linears,fold-constants,dce,half-precision"))
    half = manager.run(module)
    verify_module(half)
    stats = dict(manager.stats)["half-precision"]
    assert stats["weights"] == len(half.weight_names()) and stats["casts"] == 3  # logits of 3 entry points
    assert {half.weights.type(name).dtype for name in half.weight_names()} == {"f16"}
    want, got = run_module(module, "logits", FEED)["logits"], run_module(half, "logits", FEED)["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
