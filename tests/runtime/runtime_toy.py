"""A toy model obeying the artifact calling convention: Relax build, numpy reference, manifest.

Toy (vocab 32, hidden 4, 2 layers, kv_heads 1, head_dim 4), per position t of the sequence:
    x_t = embed[id_t] + 0.01 * t
    k_t^i = x_t @ Wk_i,  v_t^i = x_t @ Wv_i            (the cache rows of layer i)
    h_t = x_t + sum_i sum_{s <= t} (v_s^i + 0.5 * k_s^i)
    logits_t = h_t @ lm_head.T
so decode must read the whole cache (and its k/v order) and the positions to get it right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB, HIDDEN, LAYERS = 32, 4, 2
BOS, EOS = 1, 2


def toy_weights() -> dict[str, np.ndarray]:
    """The toy's weights by IR name, in calling-convention order."""
    rng = np.random.default_rng(0)
    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN))}
    for i in range(LAYERS):
        for proj in ("k_proj", "v_proj"):
            weights[f"model.layers.{i}.self_attn.{proj}.weight"] = 0.3 * rng.standard_normal(
                (HIDDEN, HIDDEN)
            )
    weights["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    return {name: w.astype(np.float32) for name, w in weights.items()}


def toy_reference_logits(ids) -> np.ndarray:
    """Numpy logits [n, vocab] of the toy for the sequence `ids` (positions 0..n-1)."""
    w = list(toy_weights().values())
    ids = np.asarray(ids)
    n = ids.shape[0]
    x = w[0][ids].astype(np.float64) + 0.01 * np.arange(n)[:, None]
    h = x.copy()
    causal = np.tril(np.ones((n, n)))
    for i in range(LAYERS):
        k, v = x @ w[1 + 2 * i], x @ w[2 + 2 * i]
        h += causal @ (v + 0.5 * k)
    return h @ w[-1].T


def toy_greedy(prompt, steps: int) -> list[int]:
    """Greedy continuation of `prompt` by full recomputation with the reference."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(toy_reference_logits(seq)[-1])))
    return seq[len(prompt) :]


def build_toy_executable():
    """Compile the toy's `prefill`, `logits` and `decode` Relax functions for the CPU."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax import op as R

    from llmopt.codegen.lower_kv import make_kv_write

    def weight_vars():
        return [
            relax.Var(name.replace(".", "_"), relax.TensorType(w.shape, "float32"))
            for name, w in toy_weights().items()
        ]

    def embed(bb, ws, ids, pos, n):
        scaled = R.multiply(R.reshape(R.astype(pos, "float32"), (1, n, 1)), relax.const(0.01))
        return bb.emit(R.add(R.take(ws[0], ids, axis=0), scaled))

    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    # prefill: the next token's logits and the cache; logits: every position's logits, no cache
    for name, last_only, with_cache in (("prefill", True, True), ("logits", False, False)):
        ids = relax.Var("ids", relax.TensorType((1, n), "int32"))
        pos = relax.Var("pos", relax.TensorType((n,), "int32"))
        ws = weight_vars()
        with bb.function(name, [ids, pos, *ws]):
            with bb.dataflow():
                x = embed(bb, ws, ids, pos, n)
                causal = R.less_equal(R.expand_dims(pos, 0), R.expand_dims(pos, 1))
                causal = bb.emit(R.astype(causal, "float32"))
                h, cache = x, []
                for i in range(LAYERS):
                    k = bb.emit(R.matmul(x, ws[1 + 2 * i]))
                    v = bb.emit(R.matmul(x, ws[2 + 2 * i]))
                    cache += [R.reshape(k, (1, n, 1, HIDDEN)), R.reshape(v, (1, n, 1, HIDDEN))]
                    kv = R.add(v, R.multiply(k, relax.const(0.5)))
                    h = bb.emit(R.add(h, R.matmul(causal, kv)))
                if last_only:
                    h = bb.emit(R.strided_slice(h, axes=[1], begin=[n - 1], end=[n]))
                logits = R.matmul(h, R.permute_dims(ws[-1]))
                out = bb.emit_output(relax.Tuple([logits, *(cache if with_cache else [])]))
            bb.emit_func_output(out)

    capacity = tirx.Var("capacity", "int64")
    ids = relax.Var("ids", relax.TensorType((1, 1), "int32"))
    pos = relax.Var("pos", relax.TensorType((1,), "int32"))
    cache_type = relax.TensorType((1, capacity, 1, HIDDEN), "float32")
    cache_in = [relax.Var(f"{kv}_{i}", cache_type) for i in range(LAYERS) for kv in "kv"]
    ws = weight_vars()
    write = bb.add_func(make_kv_write((1, HIDDEN), "float32"), "kv_write")
    with bb.function("decode", [ids, pos, *cache_in, *ws]):
        with bb.dataflow():
            x = embed(bb, ws, ids, pos, 1)
            h, cache = x, []
            for i in range(LAYERS):  # rows past pos are zero in the runtime's buffers: summing them adds 0
                k_row = R.reshape(R.matmul(x, ws[1 + 2 * i]), (1, 1, 1, HIDDEN))
                v_row = R.reshape(R.matmul(x, ws[2 + 2 * i]), (1, 1, 1, HIDDEN))
                k = bb.emit(relax.call_tir_inplace(write, [cache_in[2 * i], k_row, pos], [0], cache_type))
                v = bb.emit(relax.call_tir_inplace(write, [cache_in[2 * i + 1], v_row, pos], [0], cache_type))
                cache += [k, v]
                total = R.sum(R.add(v, R.multiply(k, relax.const(0.5))), axis=[1, 2])
                h = bb.emit(R.add(h, R.reshape(total, (1, 1, HIDDEN))))
            logits = R.matmul(h, R.permute_dims(ws[-1]))
            out = bb.emit_output(relax.Tuple([logits, *cache]))
        bb.emit_func_output(out)
    return tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"}))


def write_toy_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json whose 32 tokens are t0..t31 (t1 = BOS, t2 = EOS)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def toy_manifest_fields() -> dict:
    """Every manifest field the compiler supplies, for the toy."""
    cache_type = {"dtype": "float32", "shape": [1, "capacity", 1, HIDDEN]}
    return {
        "created_by": {"command": "pytest tests/runtime", "options": {}},
        "target": {"name": "cpu", "tvm": {"kind": "llvm"}, "device": "cpu"},
        "entry_points": [
            {"name": "prefill", "inputs": [{"name": "ids", "dtype": "int32", "shape": [1, "n"]}]},
            {"name": "decode", "inputs": [{"name": "k_0", **cache_type}]},
            {"name": "logits", "inputs": [{"name": "ids", "dtype": "int32", "shape": [1, "n"]}]},
        ],
        "kv_cache": {"layers": LAYERS, "kv_heads": 1, "head_dim": HIDDEN, "dtype": "float32"},
        "tokenizer": {"bos_token_id": BOS, "eos_token_ids": [EOS], "add_bos": True},
        "model": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS},
        "pipeline": [{"name": "toy", "options": {}}],
        "inputs": {},
    }


def read_manifest_json(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())
