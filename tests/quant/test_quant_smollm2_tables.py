"""SmolLM2-135M at int4 with its tied LM head quantized: the embedding table shares the head's codes,
so the artifact holds no f32 table (about 84 MB of weights instead of 197 MB), and it still
computes what the interpreter computes on the quantized IR and generates."""

from __future__ import annotations

import math

import numpy as np
import torch  # noqa: F401  (torch before tvm)

from llmopt.compiler import BuildOptions, build, optimize
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.frontend.zoo import smollm2_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.runtime import generate, load
from llmopt.runtime.manifest import read_manifest

OPTIONS = BuildOptions(quant="w4g32", quant_rules="lm_head=w4g32")
TABLE = "model.embed_tokens.weight"


def test_int4_smollm2_stores_its_tied_table_once_as_codes(tmp_path):
    out = tmp_path / "artifact"
    build("smollm2", out, OPTIONS)
    stored = {w.name: w for w in read_manifest(out).weights}
    assert TABLE not in stored and not [n for n in stored if n.startswith("lm_head")]
    assert sorted(n for n in stored if n.startswith(TABLE)) == [f"{TABLE}.w4g32.packed", f"{TABLE}.w4g32.scales"]
    scheme, (vocab, width) = get_scheme("w4g32"), (49152, 576)
    table_bytes = sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for n, w in stored.items() if n.startswith(TABLE))
    assert table_bytes == vocab * (width * scheme.bits // 8 + 4 * scheme.groups(width))  # 17.7 MB instead of 113 MB
    payload = sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in stored.values())
    print(f"weights: {payload} bytes")
    assert payload < 90e6

    model = load(out)
    ids = model.tokenizer.encode("The capital of France is")
    quantized = optimize(load_hf_folder(smollm2_hf_folder()), OPTIONS)
    want = run_module(quantized, "logits", {"ids": np.array([ids], np.int32),
                                             "pos": np.arange(len(ids), dtype=np.int32)})["logits"][0]
    np.testing.assert_allclose(model.forward_logits(np.array(ids)), want, atol=1e-3, rtol=0)
    tokens = list(generate(model, ids, max_new_tokens=16, stop_ids=[]))
    print(repr(model.tokenizer.decode(tokens)))
    assert len(tokens) == 16 and tokens[0] == int(np.argmax(want[-1]))
