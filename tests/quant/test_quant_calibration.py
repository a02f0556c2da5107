"""Calibration: seeded token windows, clear errors for unusable text, and the streaming run that
calibrates each linear on the outputs of the layers quantized before it."""

import numpy as np
import pytest

from llmopt.compiler import BuildOptions, quantization_pass
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant.calibration import CalibrationError, calibration_tokens, stream_linears

TOKENS = np.random.default_rng(0).integers(0, 100, (3, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def fused(tiny_llama):
    return PassManager(build_pipeline("default")).run(load_hf_folder(tiny_llama))


def test_windows_are_seeded_slices_of_the_tokenized_text(fused, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    tokens = calibration_tokens(fused, text, samples=4, seq_len=16, seed=7)
    again = calibration_tokens(fused, text, samples=4, seq_len=16, seed=7)
    other = calibration_tokens(fused, text, samples=4, seq_len=16, seed=8)
    assert tokens.shape == (4, 16) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, other)
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(fused.meta["tokenizer"]["file"]).encode(text.read_text()).ids
    joined = " ".join(map(str, ids))
    assert all(" ".join(map(str, row)) in joined for row in tokens)  # every window is a contiguous slice


@pytest.mark.parametrize("content, message", [("", "is empty"), ("w1 w2 w3", "fewer than one window"),
                                              (b"\xff\xfe\x00", "is not UTF-8")])
def test_unusable_calibration_text_is_a_user_error(fused, tmp_path, content, message):
    text = tmp_path / "calib.txt"
    text.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CalibrationError, match=message) as error:
        calibration_tokens(fused, text, samples=2, seq_len=16)
    assert str(text) in error.value.message
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_tokens(fused, tmp_path / "missing.txt")


def linear_inputs(module, row):
    """Every linear's input on one sample, by linear name, from the reference interpreter."""
    func = module.functions["prefill"]
    linears = {n.inputs[0]: n.name for n in func.nodes if n.op == "linear"}
    seen = {}
    run_module(module, "prefill", {"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)},
               on_node=lambda node, value: seen.update({linears[node.name]: value} if node.name in linears else {}))
    return seen


def test_stream_hands_each_linear_the_interpreters_inputs(fused):
    visits = []
    stream_linears(fused, TOKENS, lambda linear, weight, inputs: visits.append((linear.name, weight.attr["name"],
                                                                                 inputs)))
    func = fused.functions["prefill"]
    assert [name for name, _, _ in visits] == [n.name for n in func.nodes if n.op == "linear"]
    want = [linear_inputs(fused, row) for row in TOKENS]
    for name, _, inputs in visits:
        assert len(inputs) == len(TOKENS)
        for sample, value in enumerate(inputs):
            np.testing.assert_allclose(value, want[sample][name], rtol=1e-6, atol=1e-6)


def test_stream_continues_with_the_weight_visit_returns(fused):
    """Zeroing the first layer's QKV weight in the stream changes what every later layer sees,
    exactly as running the interpreter on a module with that weight zeroed."""
    first = None

    def visit(linear, weight, inputs):
        nonlocal first
        if first is None:
            first = weight.attr["name"]
            return np.zeros(weight.type.shape, np.float32)
        seen[linear.name] = inputs[0]

    seen = {}
    stream_linears(fused, TOKENS[:1], visit)
    from llmopt.ir.weights import WeightStore
    store = WeightStore()
    for name in fused.weights:
        entry = fused.weights.entry(name)
        load = (lambda e=entry: np.zeros(e.type.shape, np.float32)) if name == first else entry.load
        store.add(name, entry.type, load)
    zeroed = linear_inputs(type(fused)(fused.functions, store, fused.meta), TOKENS[0])
    normal = linear_inputs(fused, TOKENS[0])
    last = list(seen)[-2]  # the last decoder block's down projection
    np.testing.assert_allclose(seen[last], zeroed[last], rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[last], normal[last], atol=1e-3)


def test_stream_memory_grows_with_one_block_not_with_the_model(tmp_path):
    """The same tiny model with 2 and with 8 decoder blocks, every linear replaced by a new weight
    as a quantizer does: what the stream holds at its peak differs by less than one block's
    weights, and is below the 8-block model's weights."""
    from tiny_models import save_tiny

    def held(layers: int):
        folder = tmp_path / f"l{layers}"
        save_tiny("llama", folder, num_hidden_layers=layers, hidden_size=128, intermediate_size=384)
        module = PassManager(build_pipeline("default")).run(load_hf_folder(folder))
        memory = stream_linears(module, TOKENS, lambda linear, weight, inputs: module.weights.get(
            weight.attr["name"]) * np.float32(0.5))
        block = sum(module.weights.get(name).nbytes for name in module.weights if ".layers.0." in name
                    or name.startswith("model.layers.0."))
        total = sum(module.weights.get(name).nbytes for name in module.weights)
        return memory, block, total

    (two, block, _), (eight, _, total8) = held(2), held(8)
    assert block > 0
    assert eight.activation_bytes > 0 and eight.peak_bytes >= eight.activation_bytes
    assert abs(eight.peak_bytes - two.peak_bytes) < block
    assert eight.peak_bytes < total8
    assert eight.process_peak_rss_bytes > eight.peak_bytes


def test_calibrated_passes_report_calibration_memory(fused, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    from llmopt.passes.quant.gptq import QuantizeGPTQ
    stats = QuantizeGPTQ(scheme="w8", calibration=str(text), samples=2, seq_len=16).apply(fused).stats
    assert 0 < stats["calibration_peak_mib"] <= stats["calibration_rss_mib"]


def test_quant_spec_names_a_method_and_a_scheme():
    assert quantization_pass("w8").name == "quantize-rtn"
    assert quantization_pass("rtn:w4g32-asym", rules="lm_head=w8").rules == "lm_head=w8"
    with pytest.raises(LLMOptError, match="unknown quantization method 'magic'"):
        quantization_pass("magic:w4g128")
    with pytest.raises(LLMOptError, match="unknown quantization scheme"):
        quantization_pass("rtn:w4g7x")
    assert BuildOptions(quant="w8").to_json()["quant"] == "w8"
