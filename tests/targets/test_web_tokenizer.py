"""The WebGPU page's tokenizer (web/page/llmopt_tokenizer.js), run in Node, against the `tokenizers`
library on SmolLM2's byte-level BPE: the same ids for every text, and the same text back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from llmopt.frontend.zoo import smollm2_hf_folder

TOKENIZER_JS = Path(__file__).resolve().parents[2] / "web" / "page" / "llmopt_tokenizer.js"
PERSUASION = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen" / "persuasion.txt"
RUN = """
const fs = require("fs");
const { Tokenizer } = require(process.argv[1]);
const tok = new Tokenizer(JSON.parse(fs.readFileSync(process.argv[2], "utf8")));
const texts = JSON.parse(fs.readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(texts.map((t) => { const ids = tok.encode(t); return { ids, text: tok.decode(ids) }; })));
"""
TEXTS = ["The capital of France is", "Hello,   world!\n\nNew line\ttab", "don't I'll we've they're 'quoted'",
         "1234567 + 89 = 1234656", "naïve café — 東京 🙂 ü", "<|im_start|>user\nHi there<|im_end|>\n",
         "  leading spaces", "trailing   ", ""]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (installed by .ci/setup_web.sh)")
def test_page_tokenizer_matches_tokenizers_on_smollm2():
    path = smollm2_hf_folder() / "tokenizer.json"
    texts = TEXTS + [PERSUASION.read_text(encoding="utf-8")[:20_000]]
    done = subprocess.run(["node", "-e", RUN, str(TOKENIZER_JS), str(path)], input=json.dumps(texts),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reference = Tokenizer.from_file(str(path))
    for text, got in zip(texts, json.loads(done.stdout), strict=True):
        want = reference.encode(text, add_special_tokens=False).ids
        assert got["ids"] == want, text[:60]
        assert got["text"] == reference.decode(want, skip_special_tokens=False) == text, text[:60]
    assert len(json.loads(done.stdout)[-1]["ids"]) > 4000  # the long text really was tokenized
