"""A quantized tiny Llama builds for CPU and its artifact computes what the interpreter computes."""

import numpy as np
import pytest

from llmopt.codegen.weight_layout import packed_weights
from llmopt.compiler import BuildOptions, build
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.passes import PassManager, build_pipeline
from llmopt.runtime import load
from llmopt.targets import get_target

IDS = np.array([1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8])


@pytest.mark.parametrize("scheme", ["w8", "w4g32-asym"])
def test_quantized_artifact_matches_the_interpreter(tiny_llama, tmp_path, scheme):
    pipeline = f"fuse-linears,fold-constants,quantize-rtn{{scheme={scheme}}},cse,dce"
    quantized = PassManager(build_pipeline(pipeline)).run(load_hf_folder(tiny_llama))
    parts = {name for name in quantized.weight_names() if name.endswith((".packed", ".scales", ".zeros"))}
    assert parts and packed_weights(quantized) == {"lm_head.weight"}  # no fused kernel: parts keep the IR layout
    fused = packed_weights(quantized, get_target("cpu").quant_linear_supports)
    assert fused == {"lm_head.weight"} | parts  # the CPU kernels read the parts blocked, like f32 weights
    build(load_hf_folder(tiny_llama), tmp_path / "artifact", BuildOptions(pipeline=pipeline))
    feed = {"ids": IDS[None, :].astype(np.int32), "pos": np.arange(len(IDS), dtype=np.int32)}
    want = run_module(quantized, "logits", feed)["logits"][0]
    got = load(tmp_path / "artifact").forward_logits(IDS)
    print(f"{scheme}: max |artifact - interpreter| = {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
