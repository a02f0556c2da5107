"""AWQ on SmolLM2-135M: at int4 g128 symmetric (w4g128) and at int3 g128 (w3g128), AWQ closes at
least half of the perplexity gap between round-to-nearest and fp32 on Persuasion.

Every variant is built into an artifact (``llmopt.compiler.build``) and scored with
``runtime.perplexity`` on the same windows; fp32 is re-measured here. AWQ calibrates on Pride and
Prejudice (the default calibration text). Every linear but the LM head is quantized (rows of 576
inputs end in a short group of 64). Measured (2026-12-01): fp32 45.160; w4g128 RTN 68.248, AWQ
51.683 (72% of the gap closed); w3g128 RTN 624.794, AWQ 99.926 (91%)."""

from pathlib import Path

import numpy as np
import pytest

from llmopt.compiler import BuildOptions, build, load as load_model
from llmopt.runtime import load
from llmopt.runtime.perplexity import perplexity

TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen" / "persuasion.txt"
TOKENS, CONTEXT = 2048, 256
CALIBRATION = (("samples", "16"), ("seq_len", "256"))


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def score(smollm2, tmp_path_factory):
    """spec -> perplexity of the artifact built with ``--quant spec`` (``fp32``: none)."""
    from tokenizers import Tokenizer
    ids = np.asarray(Tokenizer.from_file(smollm2.meta["tokenizer"]["file"]).encode(
        TEXT.read_text(encoding="utf-8")).ids[:TOKENS])
    folder, scores = tmp_path_factory.mktemp("awq_smollm2"), {}

    def measure(spec: str) -> float:
        if spec not in scores:
            options = BuildOptions(quant=None if spec == "fp32" else spec,
                                   calibration=CALIBRATION if spec.startswith("awq:") else ())
            out = folder / spec.replace(":", "_")
            build(smollm2, out, options)
            scores[spec] = perplexity(load(out).forward_logits, ids, CONTEXT).perplexity
        return scores[spec]
    return measure


@pytest.mark.parametrize("scheme", ["w4g128", "w3g128"])
def test_awq_closes_half_of_the_gap_between_rtn_and_fp32(score, scheme):
    fp32, rtn, awq = score("fp32"), score(scheme), score(f"awq:{scheme}")
    print(f"SmolLM2 perplexity on {TOKENS} tokens of Persuasion (context {CONTEXT}): fp32 {fp32:.3f}, "
          f"RTN {scheme} {rtn:.3f}, AWQ {scheme} {awq:.3f} (closes {(rtn - awq) / (rtn - fp32):.0%} of the gap)")
    assert rtn > fp32
    assert awq - fp32 <= 0.5 * (rtn - fp32)
