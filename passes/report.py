"""Where a pipeline's numerical error comes from: relative errors per decoder layer and per linear.

``layer_error_report(before, after, ids)`` runs an entry point (``logits``) of both modules on the
same token ids with the reference interpreter and compares what the two compute for the same
provenance (node ``source``):

- layers: decoder block N's output is the last node whose source is exactly ``model.layers.N``
  (its second residual add);
- linears: each ``linear`` node of ``before`` stands for the projection its source names
  (``model.layers.0.self_attn.q_proj``).

Matching, the same rule for both kinds and both modules: the value of provenance S is the LAST
node, in execution order, whose source is S and whose shape is the shape of the reference node
(the block's last node, the linear). It survives rewrites that keep provenance: after
``fuse-linears`` the q projection is the ``slice`` with source ``...q_proj`` (the fused linear,
source ``...self_attn``, is no projection of ``before`` and is not reported); a projection split
into a matmul and a bias add is its last node of that shape; the reshape into heads that follows
(same source, other shape) is never taken. A reference with no match in ``after`` is listed in
``unmatched``.

Errors are ``||after - before|| / ||before||`` over the whole value, in float64 (nan when a value
is not finite). A linear's weight error is the same measure on its weight when ``after``'s entry
still reads a weight of that name (after fusion the q/k/v linears read a fused weight: no weight
error). The report also names the first node of ``after``, in execution order, whose value has a
NaN or Inf (weights and constants are not nodes of interest: the node reading them is; it lists
the non-finite weights it reads). While the interpreter runs, only the matched values are kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LLMOptError
from ..ir.graph import Function, Module, Node
from ..ir.interp import run_module

BLOCK = re.compile(r"model\.layers\.\d+")  # the source of a decoder block's residual adds


@dataclass(frozen=True)
class ErrorRow:
    """``kind`` is ``layer`` or ``linear``; ``name`` the provenance; errors are relative."""

    kind: str
    name: str
    output_error: float
    weight_error: float | None = None


@dataclass(frozen=True)
class NonFinite:
    """The first computed value with a NaN or Inf, and the non-finite weights that node reads."""

    node: str
    op: str
    source: str
    weights: tuple[str, ...] = ()

    def describe(self) -> str:
        reads = f" (reads non-finite weight {', '.join(self.weights)})" if self.weights else ""
        return f"%{self.node} = {self.op} from {self.source or '(no source)'}{reads}"


@dataclass(frozen=True)
class ErrorReport:
    """Layers worst first, then linears worst first (nan counts as worst)."""

    entry: str
    tokens: int
    rows: tuple[ErrorRow, ...]
    first_nonfinite: NonFinite | None
    unmatched: tuple[str, ...] = ()

    def render(self) -> str:
        lines = [f"relative error ||after - before|| / ||before|| of @{self.entry} on {self.tokens} tokens",
                 f"first NaN/Inf: {self.first_nonfinite.describe() if self.first_nonfinite else 'none'}"]
        for kind, header in (("layer", ("layer", "output error")),
                             ("linear", ("linear", "output error", "weight error"))):
            rows = [r for r in self.rows if r.kind == kind]
            if not rows:
                continue
            width = max(len(header[0]), *(len(r.name) for r in rows))
            lines += ["", "  ".join([header[0].ljust(width), *(h.rjust(12) for h in header[1:])])]
            for row in rows:
                cells = [_format(row.output_error)] + ([_format(row.weight_error)] if kind == "linear" else [])
                lines.append("  ".join([row.name.ljust(width), *(c.rjust(12) for c in cells)]))
        if self.unmatched:
            lines += ["", f"unmatched (no value of that provenance and shape after the pipeline): "
                          f"{', '.join(self.unmatched)}"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        """Plain data; non-finite errors are the strings ``nan`` / ``inf``."""
        nonfinite = self.first_nonfinite
        return {"entry": self.entry, "tokens": self.tokens,
                "rows": [{"kind": r.kind, "name": r.name, "output_error": _json_float(r.output_error),
                          "weight_error": _json_float(r.weight_error)} for r in self.rows],
                "first_nonfinite": None if nonfinite is None else {
                    "node": nonfinite.node, "op": nonfinite.op, "source": nonfinite.source,
                    "weights": list(nonfinite.weights)},
                "unmatched": list(self.unmatched)}


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _json_float(value: float | None):
    return value if value is None or math.isfinite(value) else str(value)


def relative_error(want: np.ndarray, got: np.ndarray) -> float:
    """``||got - want|| / ||want||`` in float64; 0 when both are 0, inf when only ``want`` is."""
    want = np.asarray(want, dtype=np.float64)
    norm = float(np.linalg.norm(want))
    diff = float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want))
    if norm == 0:
        return 0.0 if diff == 0 else diff * math.inf  # nan stays nan
    return diff / norm


class _Recorder:
    """The interpreter's ``on_node``: keeps the values of ``wanted`` (node -> provenance) and,
    with ``watch``, finds the first computed value that is not finite."""

    def __init__(self, wanted: dict[str, str], watch: bool):
        self.wanted, self.watch = wanted, watch
        self.values: dict[str, np.ndarray] = {}
        self.first_nonfinite: NonFinite | None = None
        self._bad_weights: dict[str, str] = {}  # weight node -> weight name

    def __call__(self, node: Node, value: np.ndarray) -> None:
        if node.name in self.wanted:
            self.values[self.wanted[node.name]] = value
        if not self.watch or self.first_nonfinite is not None or value.dtype.kind != "f" or np.isfinite(value).all():
            return
        if node.op == "weight":
            self._bad_weights[node.name] = node.attr["name"]
        elif node.op != "constant":
            self.first_nonfinite = NonFinite(node.name, node.op, node.source,
                                             tuple(self._bad_weights[i] for i in node.inputs if i in self._bad_weights))


def _references(func: Function) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Shapes of the layers' outputs and of the linears' outputs, by provenance."""
    layers = {n.source: n.type.shape for n in func.nodes if BLOCK.fullmatch(n.source)}  # the last node wins
    linears = {n.source: n.type.shape for n in func.nodes if n.op == "linear" and n.source}
    return layers, linears


def _matches(func: Function, shapes: dict[str, tuple]) -> dict[str, str]:
    """Node name -> provenance, for the last node of each provenance with the reference shape."""
    last = {n.source: n.name for n in func.nodes if shapes.get(n.source, None) == n.type.shape}
    return {name: source for source, name in last.items()}


def _weight_read(func: Function, source: str) -> str | None:
    """The weight name the last linear of ``source`` multiplies by, if it is a weight node."""
    nodes = func.node_map()
    linear = [n for n in func.nodes if n.op == "linear" and n.source == source][-1]
    weight = nodes.get(linear.inputs[1])
    return weight.attr["name"] if weight is not None and weight.op == "weight" else None


def _weight_error(before: Module, after: Module, name: str | None, after_reads: set[str]) -> float | None:
    if name is None or name not in after_reads:
        return None
    want, got = before.weights.get(name), after.weights.get(name)
    return relative_error(want, got) if want.shape == got.shape else None


def _inputs(module: Module, entry: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    if entry not in module.functions:
        raise LLMOptError(f"report: the model has no entry point {entry!r}.",
                          f"Choose one of: {', '.join(module.functions)}.")
    params = [p.name for p in module.functions[entry].params]
    if params != ["ids", "pos"]:
        raise LLMOptError(f"report: @{entry} takes {', '.join(params)}, not just token ids and positions.",
                          "Report on an entry point like logits or prefill.")
    ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    vocab = (module.meta.get("decoder") or {}).get("vocab_size")
    if ids.size == 0 or (vocab is not None and (ids.min() < 0 or ids.max() >= vocab)):
        raise LLMOptError(f"report: the token ids must be a non-empty list of ids below the vocabulary size {vocab}.",
                          "Tokenize the text with the model's own tokenizer.")
    return {"ids": ids, "pos": np.arange(ids.shape[1], dtype=np.int32)}


def _worst_first(rows: list[ErrorRow]) -> list[ErrorRow]:
    return sorted(rows, key=lambda r: -math.inf if math.isnan(r.output_error) else -r.output_error)


def layer_error_report(before: Module, after: Module, ids: np.ndarray, entry: str = "logits") -> ErrorReport:
    """Relative errors of ``after`` against ``before`` per layer and per linear on the tokens ``ids``."""
    inputs = _inputs(before, entry, ids)
    _inputs(after, entry, ids)
    func_before, func_after = before.functions[entry], after.functions[entry]
    layers, linears = _references(func_before)
    shapes = {**layers, **linears}
    want = _Recorder(_matches(func_before, shapes), watch=False)
    run_module(before, entry, inputs, on_node=want)
    got = _Recorder(_matches(func_after, shapes), watch=True)
    run_module(after, entry, inputs, on_node=got)

    after_reads = set(func_after.weight_names())
    layer_rows = [ErrorRow("layer", s, relative_error(want.values[s], got.values[s]))
                  for s in layers if s in got.values]
    linear_rows = [ErrorRow("linear", s, relative_error(want.values[s], got.values[s]),
                            _weight_error(before, after, _weight_read(func_before, s), after_reads))
                   for s in linears if s in got.values]
    unmatched = tuple(s for s in shapes if s not in got.values)
    return ErrorReport(entry, inputs["ids"].shape[1], tuple(_worst_first(layer_rows) + _worst_first(linear_rows)),
                       got.first_nonfinite, unmatched)


def tokenize_text(module: Module, path: str | Path, tokens: int) -> np.ndarray:
    """The first ``tokens`` ids of the text file at ``path``, with the model's tokenizer (and BOS
    when the model adds one)."""
    from ..runtime.tokenizer import Tokenizer
    info = module.meta.get("tokenizer") or {}
    if not info.get("file") or not Path(info["file"]).is_file():
        raise LLMOptError(f"report: the model has no tokenizer.json (looked for {info.get('file')}).",
                          "Put the Hugging Face tokenizer.json next to config.json.")
    if not Path(path).is_file():
        raise LLMOptError(f"report: the text file {path} does not exist.", "Pass --text with a UTF-8 text file.")
    tokenizer = Tokenizer(info["file"], bos_token_id=info.get("bos_token_id"), add_bos=bool(info.get("add_bos")))
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"))[:tokens]
    if not ids:
        raise LLMOptError(f"report: {path} gives no tokens.", "Pass --text with a non-empty file and --tokens >= 1.")
    return np.asarray(ids, dtype=np.int32)
