"""Llama-family decoders described as data, and the one graph builder they all share.

Llama, Mistral, Qwen2 and SmolLM differ only in values: sizes, RoPE base and scaling, which
projections carry a bias, whether the LM head is tied to the embedding. ``DecoderSpec`` holds
those values; ``build_module`` emits the IR for any of them. Weight names follow the Hugging Face
layout (``model.layers.{i}.self_attn.q_proj.weight``), which the GGUF frontend maps onto.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..ir.graph import Builder, Function, Module
from ..ir.types import TensorType
from ..ir.weights import WeightStore


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # rope attrs beyond theta (see ir/rope.py)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"

    def to_json(self) -> dict:
        return asdict(self)


CAPACITY = "capacity"
"""The symbolic rows of decode's cache buffers (the runtime allocates them, and grows them when full)."""

LAYER = "model.layers.{i}."
WEIGHT_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": LAYER + "input_layernorm.weight",
    "mlp_norm": LAYER + "post_attention_layernorm.weight",
    "q": LAYER + "self_attn.q_proj",
    "k": LAYER + "self_attn.k_proj",
    "v": LAYER + "self_attn.v_proj",
    "o": LAYER + "self_attn.o_proj",
    "gate": LAYER + "mlp.gate_proj",
    "up": LAYER + "mlp.up_proj",
    "down": LAYER + "mlp.down_proj",
}


def expected_weights(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    """Every weight the spec needs, with its shape (what a checkpoint must provide)."""
    h, d, kvd = spec.hidden_size, spec.head_dim, spec.num_kv_heads * spec.head_dim
    qd, ffn = spec.num_heads * spec.head_dim, spec.intermediate_size
    shapes = {WEIGHT_NAMES["embed"]: (spec.vocab_size, h), WEIGHT_NAMES["final_norm"]: (h,)}
    if not spec.tie_word_embeddings:
        shapes[WEIGHT_NAMES["lm_head"]] = (spec.vocab_size, h)
    linears = {"q": (qd, h, spec.qkv_bias), "k": (kvd, h, spec.qkv_bias), "v": (kvd, h, spec.qkv_bias),
               "o": (h, qd, spec.o_bias), "gate": (ffn, h, spec.mlp_bias), "up": (ffn, h, spec.mlp_bias),
               "down": (h, ffn, spec.mlp_bias)}
    for i in range(spec.num_layers):
        shapes[WEIGHT_NAMES["attn_norm"].format(i=i)] = (h,)
        shapes[WEIGHT_NAMES["mlp_norm"].format(i=i)] = (h,)
        for role, (out_f, in_f, bias) in linears.items():
            prefix = WEIGHT_NAMES[role].format(i=i)
            shapes[prefix + ".weight"] = (out_f, in_f)
            if bias:
                shapes[prefix + ".bias"] = (out_f,)
    return shapes


class _DecoderEmitter:
    """Emits one entry point. ``with_past``: take the KV cache as inputs (decode)."""

    def __init__(self, spec: DecoderSpec, weights: WeightStore, builder: Builder):
        self.spec, self.weights, self.b = spec, weights, builder

    def weight(self, name: str) -> str:
        """A weight node; its provenance names the checkpoint tensor when that is named otherwise
        (a GGUF file's ``blk.0.attn_q.weight``)."""
        tensor = self.weights.entry(name).origin.rpartition(":")[2]
        return self.b.weight(name, self.weights.type(name), source=tensor if tensor != name else None)

    def linear(self, x: str, prefix: str, bias: bool) -> str:
        with self.b.at(source=prefix):
            args = [x, self.weight(prefix + ".weight")] + ([self.weight(prefix + ".bias")] if bias else [])
            return self.b.add("linear", *args)

    def heads(self, x: str, seq, count: int, source: str) -> str:
        with self.b.at(source=source):
            return self.b.add("reshape", x, shape=(1, seq, count, self.spec.head_dim))

    def rms_norm(self, x: str, weight_name: str) -> str:
        with self.b.at(source=weight_name.rsplit(".", 1)[0]):
            return self.b.add("rms_norm", x, self.weight(weight_name), eps=self.spec.rms_norm_eps)

    def attention(self, x: str, i: int, seq, pos: str, past: tuple[str, str] | None):
        s, b = self.spec, self.b
        names = {r: WEIGHT_NAMES[r].format(i=i) for r in ("q", "k", "v", "o")}
        q = self.heads(self.linear(x, names["q"], s.qkv_bias), seq, s.num_heads, names["q"])
        k = self.heads(self.linear(x, names["k"], s.qkv_bias), seq, s.num_kv_heads, names["k"])
        v = self.heads(self.linear(x, names["v"], s.qkv_bias), seq, s.num_kv_heads, names["v"])
        attn = LAYER.format(i=i) + "self_attn"
        with b.at(source=attn):
            q = b.add("rope", q, pos, theta=s.rope_theta, **s.rope_scaling)
            k = b.add("rope", k, pos, theta=s.rope_theta, **s.rope_scaling)
            scale = 1.0 / math.sqrt(s.head_dim)
            if past is None:
                out = b.add("attention", q, k, v, scale=scale, causal=True)
            else:  # write the new row into the cache in place, attend up to it
                k = b.add("kv_write", past[0], k, pos)
                v = b.add("kv_write", past[1], v, pos)
                out = b.add("attention", q, k, v, pos, scale=scale, causal=True)
            out = b.add("reshape", out, shape=(1, seq, s.num_heads * s.head_dim))
        return self.linear(out, names["o"], s.o_bias), k, v

    def mlp(self, x: str, i: int) -> str:
        s, b = self.spec, self.b
        gate = self.linear(x, WEIGHT_NAMES["gate"].format(i=i), s.mlp_bias)
        up = self.linear(x, WEIGHT_NAMES["up"].format(i=i), s.mlp_bias)
        with b.at(source=LAYER.format(i=i) + "mlp"):
            act = b.add("mul", b.add("silu", gate), up)
        return self.linear(act, WEIGHT_NAMES["down"].format(i=i), s.mlp_bias)

    def emit(self, with_past: bool, all_logits: bool = False, with_cache: bool = True) -> Function:
        s, b = self.spec, self.b
        seq = 1 if with_past else "seq"
        ids = b.param("ids", TensorType("i32", (1, seq)))
        pos = b.param("pos", TensorType("i32", (seq,)))
        past = []
        for i in range(s.num_layers if with_past else 0):
            cache_type = TensorType("f32", (1, CAPACITY, s.num_kv_heads, s.head_dim))
            past.append((b.param(f"k.{i}", cache_type), b.param(f"v.{i}", cache_type)))
        with b.at(source="model.embed_tokens"):
            h = b.add("embedding", ids, self.weight(WEIGHT_NAMES["embed"]))
        caches = []
        for i in range(s.num_layers):
            x = self.rms_norm(h, WEIGHT_NAMES["attn_norm"].format(i=i))
            attn, k, v = self.attention(x, i, seq, pos, past[i] if with_past else None)
            with b.at(source=LAYER.format(i=i).rstrip(".")):
                h = b.add("add", h, attn)
            x = self.rms_norm(h, WEIGHT_NAMES["mlp_norm"].format(i=i))
            mlp = self.mlp(x, i)
            with b.at(source=LAYER.format(i=i).rstrip(".")):
                h = b.add("add", h, mlp)
            caches.append((k, v))
        if not all_logits:  # generation needs the next token's logits only
            with b.at(source="model.norm"):
                h = b.add("take_last", h, axis=1)
        h = self.rms_norm(h, WEIGHT_NAMES["final_norm"])
        head = WEIGHT_NAMES["embed" if s.tie_word_embeddings else "lm_head"]
        with b.at(source="lm_head"):
            logits = b.add("linear", h, self.weight(head))
        b.output("logits", logits)
        for i, (k, v) in enumerate(caches if with_cache else ()):
            b.output(f"k.{i}", k)
            b.output(f"v.{i}", v)
        return b.finish()


ENTRY_POINTS = {  # name: (takes the KV cache, logits of every position, returns the KV cache)
    "prefill": (False, False, True),
    "decode": (True, False, True),
    "logits": (False, True, False),
}


def build_module(spec: DecoderSpec, weights: WeightStore, meta: dict | None = None) -> Module:
    """The IR of a decoder: ``prefill(ids, pos)``, ``decode(ids, pos, k.*, v.*)`` and ``logits(ids, pos)``.

    prefill returns the next token's ``logits`` f32[1, 1, vocab] and the KV cache (``k.i``/``v.i``:
    f32[1, tokens, kv_heads, head_dim]). decode takes the cache in buffers of ``capacity`` rows
    (rows ``0 .. pos - 1`` filled, ``capacity > pos``), writes the new token's row ``pos`` with
    ``kv_write`` (in place once compiled), attends over rows ``0 .. pos`` and returns the buffers.
    ``logits`` scores every position (for perplexity) and keeps no cache.
    """
    functions = {name: _DecoderEmitter(spec, weights, Builder(name, created_by="")).emit(*flags)
                 for name, flags in ENTRY_POINTS.items()}
    info = {"decoder": spec.to_json(),
            "kv_cache": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads,
                         "head_dim": spec.head_dim, "dtype": "f32"}}
    info.update(meta or {})
    return Module(functions, weights, info)
