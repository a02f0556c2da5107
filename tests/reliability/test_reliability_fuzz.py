"""Readers of untrusted input, fuzzed: they return a result or raise their documented error, never another.

The IR parser raises ``IRParseError``; the Hugging Face config and safetensors header readers and
the GGUF reader raise ``ModelInputError`` (an ``LLMOptError``). Inputs are random, or a valid input
with random bytes changed, inserted, deleted or cut off. Each test runs a bounded number of examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmopt.errors import ModelInputError
from llmopt.frontend.gguf_file import load_gguf
from llmopt.frontend.hf_folder import _read_header, load_hf_folder, read_config, spec_from_config
from llmopt.ir.graph import Module
from llmopt.ir.parser import IRParseError, parse_module
from llmopt.ir.printer import print_module

from gguf_tiny_models import tiny_model as tiny_torch_model, write_gguf

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few random edits: flipped, replaced, inserted or deleted bytes, or cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate"]))
        if kind == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "replace" and data:
            data[where] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[where:where + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[where:]
    return bytes(data)


def _text_edits(original: str):
    """Line-level edits of IR text: a line dropped, duplicated, or with characters changed."""
    lines = original.splitlines()
    return st.tuples(st.integers(0, len(lines) - 1), st.sampled_from(["drop", "dup", "chars"]),
                     st.text(alphabet="%@#=(){}[],:.-_ 0123456789abfi\"'", max_size=6), st.integers(0, 200))


@pytest.fixture(scope="module")
def ir_text(tiny_model) -> str:
    return print_module(load_hf_folder(tiny_model))


def _parses_or_refuses(text: str) -> None:
    try:
        assert isinstance(parse_module(text), Module)
    except IRParseError:
        pass


@FUZZ
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_parser_on_random_text(text):
    _parses_or_refuses("# llmopt-ir v1\n" + text)
    _parses_or_refuses(text)


@pytest.mark.parametrize("text", [
    "meta [1, 2]",  # found by fuzzing: a meta line that is not an object
    "meta " + "[" * 100_000,  # JSON nested too deeply for the json module
    "func @f(%x: f32[2]) {\n  %0 = neg(%x) {a=" + "-" * 100_000 + "1} : f32[2]\n}",  # ast gives up
])
def test_parser_refuses_pathological_text(text):
    with pytest.raises(IRParseError):
        parse_module("# llmopt-ir v1\n" + text)


def test_parser_on_edited_ir(ir_text):
    lines = ir_text.splitlines()

    @FUZZ
    @given(edits=st.lists(_text_edits(ir_text), min_size=1, max_size=3))
    def check(edits):
        edited = list(lines)
        for index, kind, chars, column in edits:
            index %= len(edited)
            if kind == "drop":
                del edited[index]
            elif kind == "dup":
                edited.insert(index, edited[index])
            else:
                line = edited[index]
                column %= len(line) + 1
                edited[index] = line[:column] + chars + line[column + len(chars):]
            if not edited:
                break
        _parses_or_refuses("\n".join(edited))

    check()


def _model_input_or_result(read) -> None:
    try:
        read()
    except ModelInputError:
        pass


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings"]
VALID_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, max_size=4),
       rope=st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings", "rope_theta"]),
                            st.sampled_from(["llama3", "linear", "default", "yarn"]) | JSON_VALUES, max_size=4))
@example(changes={"num_attention_heads": 0}, rope={})  # found by fuzzing: ZeroDivisionError
@example(changes={"architectures": 1.0}, rope={})  # found by fuzzing: TypeError
@example(changes={"architectures": [["LlamaForCausalLM"]]}, rope={})
@example(changes={"hidden_size": float("inf")}, rope={})
def test_spec_from_config_on_random_configs(changes, rope):
    _model_input_or_result(lambda: spec_from_config({**VALID_CONFIG, **changes}))
    _model_input_or_result(lambda: spec_from_config({**VALID_CONFIG, "rope_scaling": rope}))
    _model_input_or_result(lambda: spec_from_config(changes))


def test_read_config_on_random_bytes(tmp_path):
    valid = json.dumps(VALID_CONFIG).encode()

    @FUZZ
    @given(data=st.binary(max_size=200) | mutated(valid))
    def check(data):
        (tmp_path / "config.json").write_bytes(data)
        _model_input_or_result(lambda: read_config(tmp_path))

    check()


def test_safetensors_header_on_mutated_files(tiny_model, tmp_path):
    original = (tiny_model / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    path = tmp_path / "model.safetensors"

    @FUZZ
    @given(data=mutated(original[:header_end + 64]) | st.binary(max_size=64))
    def check(data):
        path.write_bytes(data + original[header_end + 64:])
        _model_input_or_result(lambda: _read_header(path))

    check()


def test_safetensors_header_entry_without_offsets_is_refused(tiny_model, tmp_path):
    """Found by fuzzing: a tensor entry without data_offsets raised KeyError."""
    original = (tiny_model / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    path = tmp_path / "model.safetensors"
    path.write_bytes(original[:header_end].replace(b'"data_offsets"', b'"eata_offsets"', 1) + original[header_end:])
    with pytest.raises(ModelInputError, match="header is malformed"):
        _read_header(path)


def test_gguf_string_that_is_not_utf8_is_refused(tmp_path):
    """Found by fuzzing: a metadata string that is not UTF-8 raised UnicodeDecodeError."""
    valid = write_gguf(tiny_torch_model("llama"), tmp_path / "tiny.gguf", "llama").read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(valid.replace(b"llama", b"\xeclama", 1))  # the architecture's "l" becomes 0xec
    with pytest.raises(ModelInputError, match="not UTF-8"):
        load_gguf(path)


def test_gguf_reader_on_mutated_files(tmp_path):
    valid = write_gguf(tiny_torch_model("llama"), tmp_path / "tiny.gguf", "llama").read_bytes()
    path = tmp_path / "mutated.gguf"

    @FUZZ
    @given(data=mutated(valid[:4096]))
    def check(data):
        path.write_bytes(data + valid[4096:])
        _model_input_or_result(lambda: load_gguf(path))

    check()
