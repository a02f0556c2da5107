"""The tokenizer wrapper and the incremental (streaming) detokenizer."""

from __future__ import annotations

import pytest
from runtime_toy import BOS
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmopt.runtime.tokenizer import Tokenizer

TEXT = "héllo wörld, naïve café 你好 🙂🙂 end"


@pytest.fixture(scope="module")
def byte_level_path(tmp_path_factory):
    """A byte-level BPE with few merges, so that non-ASCII characters span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world end"] * 20, trainer)
    path = tmp_path_factory.mktemp("bytelevel") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_encode_decode_and_bos(toy_model):
    tok = toy_model.tokenizer
    assert tok.encode("t5 t9") == [BOS, 5, 9]  # the artifact says add_bos
    assert tok.encode("t5 t9", add_bos=False) == [5, 9]
    assert tok.decode([5, 9]) == "t5 t9"
    assert tok.eos_token_ids == (2,)


def test_incremental_decoder_streams_whole_characters(byte_level_path):
    tok = Tokenizer(byte_level_path)
    ids = tok.encode(TEXT)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == TEXT == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended mid-character and was held back


def test_flush_returns_an_unfinished_character(byte_level_path):
    tok = Tokenizer(byte_level_path)
    ids = tok.encode("a🙂")
    stream = tok.stream()
    assert [stream.push(i) for i in ids[:-1]] == ["a"] + [""] * (len(ids) - 2)
    assert stream.flush() == "\ufffd"
