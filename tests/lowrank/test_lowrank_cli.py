"""`llmopt build --lowrank METHOD:RATIO [--quant ...]`: factorized (then quantized) weights in the artifact,
logits equal the interpreter's on the same pipeline; a bad spec is a user error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmopt.cli import main
from llmopt.compiler import BuildOptions, load, optimize
from llmopt.errors import USER_ERROR_EXIT
from llmopt.ir.interp import run_module
from llmopt.runtime import load as load_artifact

IDS = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)


def interpreter_logits(module) -> np.ndarray:
    return run_module(module, "logits", {"ids": IDS[None], "pos": np.arange(len(IDS), dtype=np.int32)})["logits"][0]


@pytest.mark.parametrize("lowrank, quant", [("svd:0.2", None), ("asvd:0.2", "w8")])
def test_build_with_lowrank_and_quant(tiny_llama, tmp_path, lowrank, quant):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 37) % 128}" for i in range(600)))  # words of the tiny vocabulary
    calibration = (("calibration", str(text)), ("samples", "4"), ("seq_len", "16"))
    out = tmp_path / "artifact"
    main(["build", str(tiny_llama), "--lowrank", lowrank, "-o", str(out)] + (["--quant", quant] if quant else [])
         + [arg for key, value in calibration for arg in ("--calib", f"{key}={value}")])
    manifest = json.loads((out / "manifest.json").read_text())
    method = "lowrank-" + lowrank.split(":")[0]
    assert manifest["pipeline"] == ["fuse-linears", "fold-constants", method] + (["quantize-rtn"] if quant else []) \
        + ["cse", "dce"]
    assert manifest["created_by"]["options"]["lowrank"] == lowrank
    names = [w["name"] for w in manifest["weights"]]
    prefix = f"model.layers.0.self_attn.q_proj+k_proj+v_proj.weight.{lowrank.split(':')[0]}-r34"  # [128, 64]: rank 34
    suffix = ".w8.packed" if quant else ""
    assert {f"{prefix}.a{suffix}", f"{prefix}.b{suffix}"} <= set(names)
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" not in names  # the dense weight is gone
    assert "lm_head.weight" in names

    module = optimize(load(tiny_llama), BuildOptions(lowrank=lowrank, quant=quant, calibration=calibration))
    expected = interpreter_logits(module)
    np.testing.assert_allclose(load_artifact(out).forward_logits(IDS), expected, atol=1e-4, rtol=0)
    dense = interpreter_logits(optimize(load(tiny_llama), BuildOptions()))
    assert np.abs(expected - dense).max() > 1e-2


@pytest.mark.parametrize("spec, words", [("lowrank:0.2", ["lowrank", "svd, asvd"]),
                                         ("svd:1.5", ["1.5", "[0, 1)"]),
                                         ("asvd:0.2:greedy", ["greedy", "uniform, energy"])])
def test_bad_lowrank_spec_is_a_user_error(tiny_llama, tmp_path, capsys, spec, words):
    with pytest.raises(SystemExit) as done:
        main(["build", str(tiny_llama), "--lowrank", spec, "-o", str(tmp_path / "out")])
    assert done.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err
    assert not (tmp_path / "out").exists()
