"""Hugging Face folders (config.json + safetensors, sharded or not) of the Llama family.

The config is read into a ``DecoderSpec`` through a table of architectures (data, not code per
model); weights stay in their files and are read lazily, one tensor at a time, straight into f32
(fp16 and bf16 widened a chunk at a time), so that holding one costs its f32 size only. A weight
that is not stored as a float type is refused when the headers are read; one that holds NaN or Inf,
when it is read (``finite.check_finite``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelInputError
from ..ir.graph import Module
from ..ir.types import TensorType
from ..ir.weights import WeightStore
from .decoder import DecoderSpec, build_module, expected_weights
from .finite import check_finite


@dataclass(frozen=True)
class Family:
    """Which projections carry biases in an architecture: a bool, or the config key that says."""

    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str


ARCHITECTURES = {
    "LlamaForCausalLM": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "MistralForCausalLM": Family(qkv_bias=False, o_bias=False, mlp_bias=False),
    "Qwen2ForCausalLM": Family(qkv_bias=True, o_bias=False, mlp_bias=False),
}


def _flag(config: dict, value: bool | str) -> bool:
    return bool(config.get(value, False)) if isinstance(value, str) else value


def _rope_scaling(config: dict) -> tuple[float, dict]:
    """(theta, rope attrs) from ``rope_theta``/``rope_scaling`` or transformers 5's ``rope_parameters``."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, {}
    attrs = {"rope_type": rope_type, "factor": float(merged.get("factor", 1.0))}
    if rope_type == "llama3":
        attrs.update(low_freq_factor=float(merged["low_freq_factor"]),
                     high_freq_factor=float(merged["high_freq_factor"]),
                     original_max_position=int(merged["original_max_position_embeddings"]))
    elif rope_type != "linear":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
    return theta, attrs


def _positive(config: dict, key: str) -> int:
    """``config[key]`` as a positive int (KeyError if absent, ValueError if not positive)."""
    value = int(config[key])
    if value <= 0:
        raise ValueError(f"{key} is {config[key]!r}, it must be a positive integer")
    return value


def spec_from_config(config: dict, where: str = "config.json") -> DecoderSpec:
    """A DecoderSpec from a Hugging Face config dict; raises ModelInputError naming what is wrong."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelInputError(
            f"{where}: architecture {arch!r} is not supported.",
            f"llmopt builds {', '.join(sorted(ARCHITECTURES))}; set \"architectures\" to one of them "
            "if the model really is one of these families.")
    family = ARCHITECTURES[arch]
    try:
        heads = _positive(config, "num_attention_heads")
        hidden = _positive(config, "hidden_size")
        theta, rope = _rope_scaling(config)
        return DecoderSpec(
            vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=rope,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=_flag(config, family.qkv_bias), o_bias=_flag(config, family.o_bias),
            mlp_bias=_flag(config, family.mlp_bias),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)), architecture=arch)
    except KeyError as key:
        raise ModelInputError(f"{where}: the key {key} is missing.",
                              "A Llama-family config needs hidden_size, intermediate_size, num_hidden_layers, "
                              "num_attention_heads and vocab_size.") from None
    except (TypeError, ValueError, OverflowError) as err:
        raise ModelInputError(f"{where}: {err}.", "Fix the value in the config.") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ModelInputError(f"{folder}: no such model folder.",
                              "Pass a Hugging Face folder (config.json + *.safetensors), a .gguf file, or 'smollm2'.")
    if not path.is_file():
        raise ModelInputError(f"{folder}: there is no config.json in this folder.",
                              "A Hugging Face model folder holds config.json next to its *.safetensors files.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelInputError(f"{path}: not valid JSON ({err}).", "Restore the file from the original model.") from None
    if not isinstance(config, dict):
        raise ModelInputError(f"{path}: expected a JSON object.", "Restore the file from the original model.")
    return config


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelInputError(f"{folder}: no *.safetensors files.",
                              "Save the model with safetensors (pickled .bin checkpoints are refused).")
    return files


def _read_header(path: Path) -> dict:
    """The safetensors header (name -> dtype/shape/offsets), checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ModelInputError(f"{path}: not a safetensors file, or cut short (header length {length}, "
                                  f"file size {size}).", "Download or copy the file again.")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelInputError(f"{path}: the safetensors header is not valid JSON.",
                                  "Download or copy the file again.") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(_is_tensor_entry(v) for v in tensors.values()):
        raise ModelInputError(f"{path}: the safetensors header is malformed (each tensor needs a dtype, a shape "
                              "and data_offsets).", "Download or copy the file again.")
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ModelInputError(f"{path}: the file is cut short: its header describes {8 + length + end} bytes "
                              f"but the file has {size}.", "Download or copy the file again.")
    return header


def _is_tensor_entry(entry) -> bool:
    def naturals(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for v in values)
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and naturals(entry.get("shape"))
            and naturals(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2
            and entry["data_offsets"][0] <= entry["data_offsets"][1])


READ_CHUNK_VALUES = 1 << 22  # values read (and widened) at a time


def _widen(raw: np.ndarray) -> np.ndarray:
    """f32 values of fp16 values, or of bf16 values read as their uint16 bits (both exact)."""
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


_STORED = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # read with plain reads; BF16 as its bits


def _read_f32(path: Path, key: str, info: dict) -> np.ndarray:
    """Tensor ``key`` (F32, F16 or BF16) as f32, read with plain file reads: F32 straight into the
    result, F16 and BF16 a chunk at a time. The file is not mapped, so only the f32 result (and one
    chunk) counts in the resident memory."""
    stored = np.dtype(_STORED[info["dtype"]])
    begin, end = info["data_offsets"]
    out = np.empty(info["shape"], np.float32)
    flat = out.reshape(-1)
    if end - begin != flat.size * stored.itemsize:
        raise ModelInputError(f"{path}: weight {key!r} holds {end - begin} bytes, but {info['dtype']}"
                              f"{info['shape']} needs {flat.size * stored.itemsize}.",
                              "Download or copy the file again.")

    def read_into(array: np.ndarray) -> None:
        if f.readinto(memoryview(array).cast("B")) != array.nbytes:
            raise ModelInputError(f"{path}: weight {key!r} is cut short.", "Download or copy the file again.")

    with path.open("rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little") + begin)
        if stored == np.float32:
            read_into(flat)
            return out
        buffer = np.empty(max(1, min(flat.size, READ_CHUNK_VALUES)), stored)
        for start in range(0, flat.size, len(buffer)):
            raw = buffer[:min(len(buffer), flat.size - start)]
            read_into(raw)
            flat[start:start + len(raw)] = _widen(raw)
    return out


FLOAT_DTYPES = (*_STORED, "F64")  # what a weight may be stored as; F64 is read through torch


def _loader(path: Path, key: str, info: dict):
    def load() -> np.ndarray:
        if info["dtype"] in _STORED:
            values = _read_f32(path, key, info)
        else:
            from safetensors import safe_open  # F64: through torch
            with safe_open(str(path), framework="pt") as f:
                values = f.get_tensor(key).float().numpy()
        check_finite(values, path, key)
        return values
    return load


def load_weights(folder: Path, spec: DecoderSpec) -> WeightStore:
    """A lazy store over the folder's safetensors, checked against what ``spec`` needs."""
    located: dict[str, tuple[Path, dict]] = {}
    for path in _safetensors_files(folder):
        for key, info in _read_header(path).items():
            if key != "__metadata__":
                located[key] = (path, info)
    store = WeightStore()
    for name, shape in expected_weights(spec).items():
        if name not in located:
            raise ModelInputError(f"{folder}: the weight {name!r} is missing from the safetensors files.",
                                  "The checkpoint does not match its config.json (wrong architecture or "
                                  "layer count?).")
        path, info = located[name]
        found = info["shape"]
        if tuple(found) != shape:
            raise ModelInputError(f"{path}: weight {name!r} has shape {found}, config.json implies {list(shape)}.",
                                  "The checkpoint does not match its config.json.")
        if info["dtype"] not in FLOAT_DTYPES:
            raise ModelInputError(f"{path}: weight {name!r} is stored as {info['dtype']}, not as a float type "
                                  f"({', '.join(FLOAT_DTYPES)}).",
                                  "The file is damaged, or holds a quantized checkpoint, which llmopt does not "
                                  "read: give the float model (and quantize with --quant).")
        store.add(name, TensorType("f32", shape), _loader(path, name, info), origin=f"{path.name}:{name}")
    return store


def tokenizer_info(folder: Path, config: dict) -> dict:
    """Where the tokenizer is and its special ids (from config / generation_config / tokenizer_config)."""
    info: dict = {"file": str(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None}
    for extra in ("generation_config.json", "tokenizer_config.json"):
        if (folder / extra).is_file():
            data = json.loads((folder / extra).read_text())
            for key in ("chat_template", "bos_token_id", "eos_token_id"):
                if data.get(key) is not None:
                    info.setdefault(key, data[key])
    for key in ("bos_token_id", "eos_token_id"):
        info.setdefault(key, config.get(key))
    eos = info.pop("eos_token_id")
    info["eos_token_ids"] = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    info.setdefault("chat_template", None)
    info.setdefault("add_bos", False)
    return info


def load_hf_folder(folder: str | Path) -> Module:
    """The IR module of the Llama-family model in ``folder``."""
    folder = Path(folder)
    config = read_config(folder)
    spec = spec_from_config(config, str(folder / "config.json"))
    weights = load_weights(folder, spec)
    return build_module(spec, weights, {"source": {"kind": "hf-folder", "path": str(folder)},
                                         "tokenizer": tokenizer_info(folder, config)})
