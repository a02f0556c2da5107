"""The artifact manifest (`manifest.json`): its schema, (de)serialization and verification.

An artifact directory holds `manifest.json`, the compiled library (`library`), safetensors weight
shards under `weights/`, `tokenizer.json` and `model.ir`. The manifest records a sha256 of every
other file in the directory (`files`, keyed by POSIX path relative to the directory); `verify`
re-hashes them. Files present in the directory but not listed are ignored.

This module imports neither TVM nor torch: the compiler's artifact writer uses it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError
from .weight_encoding import WeightEncoding

FORMAT_VERSION = 2
"""2: decode takes the KV cache in capacity buffers and writes its row in place (1: returned a longer
copy); a runtime must not run a library of the other convention."""
MANIFEST_NAME = "manifest.json"

_REBUILD = "rebuild the artifact with `llmopt build ... -o DIR` (or copy it again)"


@dataclass(frozen=True)
class WeightInfo:
    """One weight tensor: its IR name, shape, numpy dtype name and the shard file holding it; with an
    `encoding`, the shard holds its encoded parts (`weight_encoding`) instead of the tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    encoding: WeightEncoding | None = None


@dataclass(frozen=True)
class KVCacheInfo:
    """The functional KV cache: per layer the tensors named in `tensors` (`{i}` is the layer), in
    the entry points' order; by default a k and a v of `dtype` [1, len, kv_heads, head_dim]. An int8
    cache (`quantize-kv-cache`) holds k.{i}, k.{i}.scale, v.{i}, v.{i}.scale: codes and f32 scales.
    After structured pruning layers may differ: `layer_kv_heads` lists each layer's kv heads (empty:
    all have `kv_heads`, which is then their maximum)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    tensors: tuple[str, ...] = ("k.{i}", "v.{i}")
    layer_kv_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "layer_kv_heads", tuple(int(h) for h in self.layer_kv_heads))
        if self.layer_kv_heads and len(self.layer_kv_heads) != self.layers:
            raise TypeError(f"kv_cache lists {len(self.layer_kv_heads)} layer_kv_heads for {self.layers} layers")

    def kv_heads_of(self, layer: int) -> int:
        """The kv heads of `layer`'s cache."""
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.kv_heads

    def total_kv_heads(self) -> int:
        """The kv heads of all layers together (cache elements per token = 2 * this * head_dim)."""
        return sum(self.kv_heads_of(i) for i in range(self.layers))

    def names(self) -> list[str]:
        """Every cache tensor, layer by layer (`k.0`, `v.0`, `k.1`, ...): the entry points' order."""
        return [t.format(i=i) for i in range(self.layers) for t in self.tensors]


@dataclass(frozen=True)
class TokenizerInfo:
    """Where the tokenizer is and how prompts are framed."""

    file: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None = None


@dataclass
class Manifest:
    """Everything the runtime needs to know about an artifact.

    `entry_points` is a list of {"name": str, "inputs": [...]} (at least `prefill` and `decode`);
    `target` is {"name", "tvm" (TVM's dict form of the target), "device", "archs" (what the library
    has code for, e.g. ["sm_80", "sm_90"] for cuda; empty: what "tvm" names), "device_needs" (in
    words)}, the last two absent in older artifacts; `files` maps every file except the manifest
    itself to its sha256.
    """

    format_version: int
    llmopt_version: str
    created_by: dict[str, Any]
    target: dict[str, Any]
    library: str
    entry_points: list[dict[str, Any]]
    kv_cache: KVCacheInfo
    weights: list[WeightInfo]
    tokenizer: TokenizerInfo
    model: dict[str, Any]
    pipeline: list[Any]
    inputs: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as the text of `manifest.json`."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = MANIFEST_NAME) -> Manifest:
        """Build a manifest from parsed JSON; raises ArtifactError naming `source` if malformed."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: not a JSON object", hint=_REBUILD, path=source)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: artifact format version {version!r}, this llmopt reads version "
                f"{FORMAT_VERSION}",
                hint=f"{_REBUILD} using this llmopt, or run it with the llmopt that built it "
                f"(version {data.get('llmopt_version', 'unknown')})",
                path=source,
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "files"]
        missing = [n for n in names if n not in data]
        if missing:
            raise ArtifactError(
                f"{source}: missing field(s) {', '.join(missing)}", hint=_REBUILD, path=source
            )
        try:
            kwargs = {n: data[n] for n in names}
            kwargs["kv_cache"] = KVCacheInfo(**data["kv_cache"])
            kwargs["tokenizer"] = TokenizerInfo(
                **{**data["tokenizer"], "eos_token_ids": tuple(data["tokenizer"]["eos_token_ids"])}
            )
            kwargs["weights"] = [
                WeightInfo(**{**w, "shape": tuple(w["shape"]),
                              "encoding": WeightEncoding(**w["encoding"]) if w.get("encoding") else None})
                for w in data["weights"]
            ]
            return cls(**kwargs, files=dict(data.get("files", {})))
        except (TypeError, KeyError) as err:
            raise ArtifactError(
                f"{source}: malformed manifest ({err})", hint=_REBUILD, path=source
            ) from err

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> Manifest:
        """Parse the text of `manifest.json`; raises ArtifactError naming `source` if malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(
                f"{source}: not valid JSON ({err})", hint=_REBUILD, path=source
            ) from err
        return cls.from_dict(data, source=source)

    def referenced_files(self) -> list[str]:
        """The files the runtime opens: library, tokenizer and weight shards (each once)."""
        files = [self.library, self.tokenizer.file, *(w.file for w in self.weights)]
        return list(dict.fromkeys(files))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and parse `manifest.json` of an artifact without checking any hashes."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ArtifactError(
            f"no artifact directory at {artifact_dir}",
            hint="pass the directory written by `llmopt build ... -o DIR`",
            path=artifact_dir,
        )
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: {artifact_dir} is not a complete llmopt artifact",
            hint=_REBUILD,
            path=path,
        )
    return Manifest.from_json(path.read_text(encoding="utf-8"), source=str(path))


def resolve(artifact_dir: str | Path, rel: str) -> Path:
    """The path of a manifest-listed file; refuses paths that leave the artifact directory."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ArtifactError(
            f"manifest lists {rel!r}, which is outside the artifact directory {artifact_dir}",
            hint=_REBUILD,
            path=rel,
        )
    return Path(artifact_dir, *pure.parts)


def verify(artifact_dir: str | Path) -> Manifest:
    """Read the manifest and re-hash every file it lists; return the manifest if all match.

    Raises ArtifactError naming the offending file for: a missing or malformed manifest, a format
    version this llmopt does not read, a file the runtime needs but the manifest does not hash, a
    missing file, or a hash mismatch.
    """
    manifest = read_manifest(artifact_dir)
    for rel in manifest.referenced_files():
        if rel not in manifest.files:
            raise ArtifactError(
                f"{Path(artifact_dir, MANIFEST_NAME)} uses {rel} but records no sha256 for it",
                hint=_REBUILD,
                path=rel,
            )
    for rel, expected in manifest.files.items():
        path = resolve(artifact_dir, rel)
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing", hint=_REBUILD, path=path)
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact file {path} is damaged or was modified "
                f"(sha256 {actual[:12]}…, manifest says {expected[:12]}…)",
                hint=_REBUILD,
                path=path,
            )
    return manifest
