"""Calibration for the data-aware methods (GPTQ, AWQ, ...): token windows from a text file, and a
streaming run of the model that hands each linear's inputs to the method and continues with the
weight the method returns.

``calibration_tokens`` cuts ``samples`` windows of ``seq_len`` tokens at seeded random offsets
from a UTF-8 text (default: Pride and Prejudice in ``shared/data``), tokenized with the model's
own tokenizer: deterministic for a given text, seed and tokenizer.

``stream_linears`` runs one function of the module (``prefill``: no LM head over every position)
with the reference interpreter's op semantics, node by node, over all samples at once. When it
reaches a linear that reads a stored weight, it calls ``visit(linear, weight, inputs)`` with that
linear's input for every sample; ``visit`` may return a replacement weight (the method's
dequantized result), which this and every later read of that weight then use. So block ``i`` is
calibrated on the outputs of the already-quantized blocks before it. Values are freed after their
last reader, weights are loaded when read and dropped (replacements too) after their last reader,
so peak memory is the calibration activations plus the weights in use, not the model. The run
returns ``StreamMemory``: the most bytes it held at once (measured on the arrays it holds after
each node) and the process's peak RSS, so a build can report what calibration cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Module, Node
from ...ir.interp import bind_symbols
from ...ir.ops import OPS
from ...ir.types import DTYPES
from ..base import Pass, PassResult
from .rewrite import linear_weights

DEFAULT_CALIBRATION_TEXT = (Path(__file__).resolve().parents[3] / "shared" / "data" / "austen"
                            / "pride_and_prejudice.txt")

Visit = Callable[[Node, Node, list[np.ndarray]], "np.ndarray | None"]


class CalibrationError(LLMOptError):
    pass


def _tokenizer_of(module: Module):
    from tokenizers import Tokenizer
    file = (module.meta.get("tokenizer") or {}).get("file")
    if not file or not Path(file).is_file():
        raise CalibrationError("the model has no tokenizer.json, so calibration text cannot be tokenized.",
                               "Put the Hugging Face tokenizer.json next to config.json, or calibrate with "
                               "token ids through the Python API.")
    return Tokenizer.from_file(str(file))


def read_calibration_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text {path} does not exist.", "Pass a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CalibrationError(f"calibration text {path} is not UTF-8 ({error.reason} at byte {error.start}).",
                               "Pass a UTF-8 text file.") from None
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty.", "Pass a file with some pages of text.")
    return text


def calibration_tokens(module: Module, text: str | Path = DEFAULT_CALIBRATION_TEXT, samples: int = 32,
                       seq_len: int = 256, seed: int = 0) -> np.ndarray:
    """int32 ``[samples, seq_len]``: windows at seeded random offsets of the tokenized ``text``."""
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"calibration needs samples >= 1 and seq_len >= 2 (got {samples}, {seq_len}).",
                               "Pass positive calibration sizes.")
    ids = np.asarray(_tokenizer_of(module).encode(read_calibration_text(text)).ids, np.int32)
    if len(ids) < seq_len:
        raise CalibrationError(f"calibration text {text} has {len(ids)} tokens, fewer than one window of "
                               f"seq_len={seq_len}.", "Pass a longer text or a smaller seq_len.")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, samples)
    return np.stack([ids[start:start + seq_len] for start in starts])


@dataclass(frozen=True)
class StreamMemory:
    """What a calibration stream held: ``peak_bytes``, the most bytes of activations (every
    sample's live values) and weights in use (loaded or replaced) held at once, after any node;
    ``activation_bytes``, the activations' share at that moment; ``process_peak_rss_bytes``, the
    process's peak resident memory when the stream ended (it includes what ran before)."""

    peak_bytes: int
    activation_bytes: int
    process_peak_rss_bytes: int

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _process_peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stream_linears(module: Module, tokens: np.ndarray, visit: Visit, entry: str = "prefill") -> StreamMemory:
    """Run ``entry`` on every row of ``tokens`` (see the module docstring), calling ``visit`` at
    each linear that reads a stored f32 weight, in program order; returns what the run held."""
    func = module.functions[entry]
    feeds = [{"ids": row[None, :].astype(np.int32), "pos": np.arange(len(row), dtype=np.int32)} for row in tokens]
    missing = [p.name for p in func.params if p.name not in feeds[0]]
    if missing:
        raise CalibrationError(f"@{entry} takes {', '.join(missing)} besides ids and pos, so it cannot be "
                               "calibrated on text.", "Calibrate a decoder's prefill entry point.")
    values = [{p.name: np.asarray(feed[p.name], DTYPES[p.type.dtype]) for p in func.params} for feed in feeds]
    env = bind_symbols(func, values[0])
    last_use = {name: index for index, node in enumerate(func.nodes) for name in node.inputs}
    weights_of = linear_weights(func)
    weight_names = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
    last_read_of_weight: dict[str, int] = {}  # stored weight name -> index of its last reader
    for value, name in weight_names.items():
        last_read_of_weight[name] = max(last_read_of_weight.get(name, -1), last_use.get(value, -1))
    replaced: dict[str, np.ndarray] = {}  # weight name -> what visit returned, until its last reader
    loaded: dict[str, np.ndarray] = {}  # weight value -> array, while some node still reads it
    peak = (0, 0)  # (bytes held, of which activations)

    def read(sample: dict, value: str) -> np.ndarray:
        if value not in weight_names:
            return sample[value]
        if value not in loaded:  # loaded on first read
            name = weight_names[value]
            loaded[value] = replaced[name] if name in replaced else module.weights.get(name)
        return loaded[value]

    for index, node in enumerate(func.nodes):
        if node.op == "weight":
            continue
        weight = weights_of.get(node.name)
        if weight is not None:
            new = visit(node, weight, [sample[node.inputs[0]] for sample in values])
            if new is not None:
                replaced[weight.attr["name"]] = np.asarray(new, np.float32)
                loaded.pop(weight.name, None)
        if node.name in last_use:  # outputs nobody reads (the logits, the KV cache) are not needed
            for sample in values:
                sample[node.name] = np.asarray(OPS[node.op].ref([read(sample, i) for i in node.inputs],
                                                                node.attr, env))
        activations = sum(array.nbytes for sample in values for array in sample.values())
        weights = {id(a): a.nbytes for a in [*loaded.values(), *replaced.values()]}
        peak = max(peak, (activations + sum(weights.values()), activations))
        for name in node.inputs:
            if last_use.get(name) == index:
                loaded.pop(name, None)
                if name in weight_names and last_read_of_weight[weight_names[name]] == index:
                    replaced.pop(weight_names[name], None)
                for sample in values:
                    sample.pop(name, None)
    return StreamMemory(peak[0], peak[1], _process_peak_rss_bytes())


@dataclass(frozen=True)
class CalibratedPass(Pass):
    """The options every calibrated pass takes (the text, samples x seq_len tokens, the seed) and its
    ``apply``: tokenize the calibration text, then ``apply_with_tokens``. Put it first among the
    bases (``class CalibratedPruning(CalibratedPass, Pruning)``) so its fields come after the method's."""

    calibration: str = str(DEFAULT_CALIBRATION_TEXT)
    samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def apply(self, module: Module) -> PassResult:
        tokens = calibration_tokens(module, self.calibration, self.samples, self.seq_len, self.seed)
        return self.apply_with_tokens(module, tokens)

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement apply_with_tokens()")
