"""`llmopt build --quant SCHEME`: RTN-quantized weights in the artifact, logits equal the interpreter's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmopt.cli import main
from llmopt.compiler import BuildOptions, load, optimize
from llmopt.errors import USER_ERROR_EXIT
from llmopt.ir.interp import run_module
from llmopt.runtime import load as load_artifact


def test_build_with_quant_stores_quantized_weights(tiny_llama, tmp_path):
    out = tmp_path / "w8"
    main(["build", str(tiny_llama), "--quant", "w8", "-o", str(out)])  # returns normally on success
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == ["fuse-linears", "fold-constants", "quantize-rtn", "cse", "dce"]
    names = [w["name"] for w in manifest["weights"]]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight.w8.packed" in names
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight" not in names  # the float copy is gone
    assert "lm_head.weight" in names  # kept in float by default

    ids = np.array([1, 17, 99, 3, 42, 7], dtype=np.int32)
    quantized = optimize(load(tiny_llama), BuildOptions(quant="w8"))
    expected = run_module(quantized, "logits", {"ids": ids[None], "pos": np.arange(len(ids), dtype=np.int32)})
    np.testing.assert_allclose(load_artifact(out).forward_logits(ids), expected["logits"][0], atol=1e-4, rtol=0)


def test_unknown_scheme_is_a_user_error(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["build", str(tiny_llama), "--quant", "int5", "-o", str(tmp_path / "out")])
    assert done.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "int5" in err and "w8" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
