"""GGUF files (llama.cpp's format) of the Llama family, read with the ``gguf`` library.

Metadata becomes a ``DecoderSpec`` through a table of keys; tensors get their Hugging Face names
through one name table and are dequantized to float32 lazily, one tensor per ``WeightStore.get``
(a tensor holding NaN or Inf is refused then, ``finite.check_finite``).
Two things llama.cpp's converter did to the tensors are undone here:

- shapes are stored innermost dimension first (ggml's ``ne`` order): the Hugging Face shape is the
  reverse (``gguf.quants.dequantize`` already returns arrays in that row-major order);
- for ``llama`` the rows of Q and K (weights and biases) are permuted from Hugging Face's
  half-split RoPE layout to llama.cpp's interleaved one; ``_undo_rope_permutation`` is the inverse,
  the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.

The tokenizer is rebuilt from the metadata by transformers' GGUF tokenizer conversion and written
into llmopt's cache under a hash of its content, so the path in ``meta["tokenizer"]["file"]`` stays
valid for as long as the cache does (a module copied by a pass, or saved, never points at a
deleted temporary file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelInputError
from ..ir.graph import Module
from ..ir.rope import inv_freq, rope_attrs_inv_freq
from ..ir.types import TensorType
from ..ir.weights import WeightStore
from .decoder import DecoderSpec, build_module, expected_weights
from .finite import check_finite
from .zoo import cache_root, write_atomically

K = gguf.Keys
REEXPORT_HINT = "Convert the model again with llama.cpp's convert_hf_to_gguf.py, or pass its Hugging Face folder."


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp wrote one ``general.architecture``."""

    hf_architecture: str
    rope_permuted: bool  # Q/K rows permuted to llama.cpp's interleaved RoPE layout


ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", rope_permuted=True),  # Mistral too: llama.cpp writes it as llama
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", rope_permuted=False),
}

SPEC_KEYS = {  # DecoderSpec field -> metadata key; every one is required
    "hidden_size": K.LLM.EMBEDDING_LENGTH,
    "intermediate_size": K.LLM.FEED_FORWARD_LENGTH,
    "num_layers": K.LLM.BLOCK_COUNT,
    "num_heads": K.Attention.HEAD_COUNT,
    "rms_norm_eps": K.Attention.LAYERNORM_RMS_EPS,
}
OPTIONAL_SPEC_KEYS = {  # DecoderSpec field -> metadata key, used when present
    "num_kv_heads": K.Attention.HEAD_COUNT_KV,
    "head_dim": K.Attention.KEY_LENGTH,
    "rope_theta": K.Rope.FREQ_BASE,
    "max_position_embeddings": K.LLM.CONTEXT_LENGTH,
}

TENSOR_NAMES = {  # GGUF name -> Hugging Face name; both take the same ".weight" / ".bias" suffix
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
ROPE_PERMUTED_HEADS = {"blk.{i}.attn_q": "num_heads", "blk.{i}.attn_k": "num_kv_heads"}  # tensor -> its head count
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE scaling, as per-frequency divisors
INTEGER_TYPES = {gguf.GGMLQuantizationType[name] for name in ("I8", "I16", "I32", "I64")}  # never a weight's type


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's reader; a missing, foreign, cut-short or corrupt file is a ModelInputError."""
    if not path.is_file():
        raise ModelInputError(f"{path}: no such file.", "Pass the path of a .gguf file.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelInputError(f"{path}: not a GGUF file (it starts with {magic!r}; GGUF files start with b'GGUF').",
                              "Pass a .gguf file written by llama.cpp, or a Hugging Face model folder.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as err:
        raise ModelInputError(f"{path}: the GGUF file is cut short or corrupt ({err}).",
                              "Download or copy the file again.") from None


def _metadata(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    try:
        return default if field is None else field.contents()
    except UnicodeDecodeError:
        raise ModelInputError(f"{reader.data.filename}: the metadata value of {key!r} is not UTF-8 text.",
                              "The file is corrupt: download or copy it again.") from None


def architecture(reader: gguf.GGUFReader, path: Path) -> str:
    arch = _metadata(reader, K.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise ModelInputError(f"{path}: GGUF architecture {arch!r} is not supported.",
                              f"llmopt reads GGUF files of the architectures {', '.join(sorted(ARCHITECTURES))}.")
    return arch


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))


def _llama3_rope(factors: np.ndarray, head_dim: int, theta: float, original_max_position: int, path: Path) -> dict:
    """Llama 3's RoPE attributes from llama.cpp's per-frequency divisors (``rope_freqs.weight``).

    The file keeps the divisors, not the parameters that made them. Every Llama 3.x uses low and high
    frequency factors 1 and 4; the scale factor is the largest divisor. The parameters are accepted
    only if they reproduce the file's divisors.
    """
    attrs = {"rope_type": "llama3", "factor": _decimal(factors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position": original_max_position}
    divisors = inv_freq(head_dim, theta) / rope_attrs_inv_freq(head_dim, {"theta": theta, **attrs})
    if divisors.shape != factors.shape or not np.allclose(divisors, factors, rtol=1e-4):
        raise ModelInputError(f"{path}: {ROPE_FREQS} holds RoPE frequency factors that are not Llama 3's scaling.",
                              "Only Llama 3-style rope_freqs are supported.")
    return attrs


def _rope_scaling(reader, arch: str, tensors: dict, head_dim: int, theta: float, path: Path) -> dict:
    """The ``rope`` attributes beyond theta: none, linear, or Llama 3's (from ``rope_freqs.weight``)."""
    if ROPE_FREQS in tensors:
        original = int(_metadata(reader, K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), 8192))
        factors = gguf.quants.dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type)
        return _llama3_rope(np.asarray(factors, np.float64).reshape(-1), head_dim, theta, original, path)
    kind = _metadata(reader, K.Rope.SCALING_TYPE.format(arch=arch), "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(_metadata(reader, K.Rope.SCALING_FACTOR.format(arch=arch)))}
    raise ModelInputError(f"{path}: RoPE scaling {kind!r} is not supported (supported: none, linear, Llama 3's).",
                          "Use a model without this RoPE scaling.")


def _single(value, key: str, path: Path) -> int:
    """A per-model count; some files store one per layer, which llmopt accepts only when all agree."""
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:
        raise ModelInputError(f"{path}: {key} differs between layers ({sorted(values)}).",
                              "Models whose layers differ in shape are not supported.")
    return int(values.pop())


def spec_from_gguf(reader: gguf.GGUFReader, tensors: dict, arch: str, path: Path) -> DecoderSpec:
    """A DecoderSpec from the file's metadata and which tensors it holds."""
    values = {}
    for table, required in ((SPEC_KEYS, True), (OPTIONAL_SPEC_KEYS, False)):
        for name, key in table.items():
            value = _metadata(reader, key.format(arch=arch))
            if value is None and required:
                raise ModelInputError(f"{path}: the metadata key {key.format(arch=arch)!r} is missing.", REEXPORT_HINT)
            if value is not None:
                values[name] = value
    for name in ("num_heads", "num_kv_heads"):
        if name in values:
            values[name] = _single(values[name], name, path)
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", int(values["hidden_size"]) // values["num_heads"])
    rope_dims = _metadata(reader, K.Rope.DIMENSION_COUNT.format(arch=arch), values["head_dim"])
    if rope_dims != values["head_dim"]:
        raise ModelInputError(f"{path}: RoPE covers {rope_dims} of {values['head_dim']} head dimensions.",
                              "Partial rotary embeddings are not supported.")
    if "token_embd.weight" not in tensors:
        raise ModelInputError(f"{path}: the tensor 'token_embd.weight' is missing.", REEXPORT_HINT)
    theta = _decimal(values.pop("rope_theta", 10000.0))
    return DecoderSpec(
        vocab_size=_hf_shape(tensors["token_embd.weight"])[0], rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, tensors, int(values["head_dim"]), theta, path),
        tie_word_embeddings="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors, mlp_bias="blk.0.ffn_gate.bias" in tensors,
        architecture=ARCHITECTURES[arch].hf_architecture,
        **{name: _decimal(v) if name == "rms_norm_eps" else int(v) for name, v in values.items()})


def gguf_names(spec: DecoderSpec) -> dict[str, tuple[str, str]]:
    """Hugging Face name -> (GGUF name, the GGUF name's template) for every tensor the table knows."""
    names = {}
    for gguf_template, hf_template in TENSOR_NAMES.items():
        for i in range(spec.num_layers) if "{i}" in gguf_template else [None]:
            for suffix in (".weight", ".bias"):
                names[hf_template.format(i=i) + suffix] = (gguf_template.format(i=i) + suffix, gguf_template)
    return names


def _undo_rope_permutation(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute``: per head, interleaved rotary pairs back to halves."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _loader(tensor, shape: tuple[int, ...], heads: int | None, path: Path):
    def load() -> np.ndarray:
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ModelInputError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the "
                                  "gguf library cannot dequantize.", "Use a file with another quantization.") from None
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        check_finite(values, path, tensor.name)  # indices as stored, before the RoPE rows are put back
        return np.ascontiguousarray(_undo_rope_permutation(values, heads) if heads else values)
    return load


def load_weights(tensors: dict, spec: DecoderSpec, arch: str, path: Path) -> WeightStore:
    """A lazy store of float32 weights under Hugging Face names, checked against what ``spec`` needs."""
    names = gguf_names(spec)
    store = WeightStore()
    for name, shape in expected_weights(spec).items():
        gguf_name, template = names[name]
        if gguf_name not in tensors:
            raise ModelInputError(f"{path}: the tensor {gguf_name!r} is missing.", REEXPORT_HINT)
        tensor = tensors[gguf_name]
        if _hf_shape(tensor) != shape:
            raise ModelInputError(f"{path}: tensor {gguf_name!r} has shape {list(_hf_shape(tensor))}, the metadata "
                                  f"implies {list(shape)}.", REEXPORT_HINT)
        if tensor.tensor_type in INTEGER_TYPES:
            raise ModelInputError(f"{path}: tensor {gguf_name!r} is stored as {tensor.tensor_type.name}, an integer "
                                  "type, not as float or quantized weights.", REEXPORT_HINT)
        heads = None
        if ARCHITECTURES[arch].rope_permuted and template in ROPE_PERMUTED_HEADS:
            heads = getattr(spec, ROPE_PERMUTED_HEADS[template])
        store.add(name, TensorType("f32", shape), _loader(tensor, shape, heads, path),
                  origin=f"{path.name}:{gguf_name}")
    return store


def write_tokenizer_json(reader: gguf.GGUFReader, arch: str, path: Path) -> Path:
    """The file's tokenizer as a Hugging Face ``tokenizer.json`` in the cache (content-addressed).

    transformers' GGUF tokenizer conversion builds it, from the metadata its own key table names.
    """
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    metadata = {name: _metadata(reader, f"tokenizer.{key}")
                for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()}
    try:
        tokenizer, _ = convert_gguf_tokenizer(arch, {k: v for k, v in metadata.items() if v is not None})
    except (ValueError, KeyError) as err:
        raise ModelInputError(f"{path}: cannot build a tokenizer from its metadata ({err}).",
                              "Use a GGUF file whose tokenizer transformers can convert.") from None
    text = tokenizer.to_str()
    folder = cache_root() / "tokenizers" / hashlib.sha256(text.encode()).hexdigest()[:24]
    if not folder.is_dir():
        write_atomically(folder, lambda tmp: (tmp / "tokenizer.json").write_text(text))
    return folder / "tokenizer.json"


def tokenizer_info(reader: gguf.GGUFReader, arch: str, path: Path) -> dict:
    """Tokenizer file and special ids, shaped like ``hf_folder.tokenizer_info``; file None without a vocabulary."""
    t = K.Tokenizer
    eos = [_metadata(reader, key) for key in (t.EOS_ID, t.EOT_ID, t.EOM_ID)]
    # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary whose file does not say otherwise
    add_bos_default = _metadata(reader, t.MODEL) == "llama"
    return {"file": str(write_tokenizer_json(reader, arch, path)) if reader.get_field(t.LIST) is not None else None,
            "chat_template": _metadata(reader, t.CHAT_TEMPLATE), "bos_token_id": _metadata(reader, t.BOS_ID),
            "eos_token_ids": list(dict.fromkeys(e for e in eos if e is not None)),
            "add_bos": bool(_metadata(reader, t.ADD_BOS, add_bos_default))}


def load_gguf(path: str | Path) -> Module:
    """The IR module of the Llama-family model in the GGUF file ``path``."""
    path = Path(path)
    reader = open_gguf(path)
    arch = architecture(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    spec = spec_from_gguf(reader, tensors, arch, path)
    weights = load_weights(tensors, spec, arch, path)
    return build_module(spec, weights, {"source": {"kind": "gguf", "path": str(path)},
                                         "tokenizer": tokenizer_info(reader, arch, path)})
