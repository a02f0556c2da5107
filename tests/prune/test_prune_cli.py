"""`llmopt build --prune METHOD:LEVEL [--quant ...]`: pruned (then quantized) weights in the artifact,
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


def test_build_with_prune_and_quant(tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 37) % 128}" for i in range(600)))  # words of the tiny vocabulary
    calibration = (("calibration", str(text)), ("samples", "4"), ("seq_len", "16"))
    out = tmp_path / "wanda-w8"
    main(["build", str(tiny_llama), "--prune", "wanda:2:4", "--quant", "w8", "-o", str(out)]
         + [arg for key, value in calibration for arg in ("--calib", f"{key}={value}")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == ["fuse-linears", "fold-constants", "prune-wanda", "quantize-rtn", "cse", "dce"]
    assert manifest["created_by"]["options"]["prune"] == "wanda:2:4"
    names = [w["name"] for w in manifest["weights"]]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight.pruned-2of4.w8.packed" in names
    assert not any(name.endswith(".pruned-2of4") for name in names)  # the float pruned copy is gone too
    assert "lm_head.weight" in names

    ids = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)
    module = optimize(load(tiny_llama), BuildOptions(prune="wanda:2:4", quant="w8", calibration=calibration))
    expected = run_module(module, "logits", {"ids": ids[None], "pos": np.arange(len(ids), dtype=np.int32)})
    np.testing.assert_allclose(load_artifact(out).forward_logits(ids), expected["logits"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec, words", [("prune:0.5", ["prune", "magnitude, wanda, sparsegpt"]),
                                         ("wanda:1.5", ["1.5", "[0, 1)"])])
def test_bad_prune_spec_is_a_user_error(tiny_llama, tmp_path, capsys, spec, words):
    with pytest.raises(SystemExit) as done:
        main(["build", str(tiny_llama), "--prune", spec, "-o", str(tmp_path / "out")])
    assert done.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err
    assert not (tmp_path / "out").exists()
