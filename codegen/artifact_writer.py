"""Write a compiled artifact directory atomically (the format is `llmopt.runtime.manifest`).

Everything is written into a hidden sibling `.<name>.tmp-<pid>`, hashed, described by
`manifest.json` (written last), fsynced, and then renamed to the output path, so a reader never
sees a half-written artifact at that path. On any error the temporary directory is removed.
A build killed outright (SIGKILL, power loss) cannot clean up; the next build to the same path
does: it removes the temporary siblings of builds whose process is gone, and puts back a previous
artifact that a killed overwrite had already moved aside (`.<name>.old-<pid>`) when nothing took
its place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import LLMOptError
from ..runtime.errors import ArtifactError
from ..runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, WeightInfo, sha256_file
from ..runtime import weight_encoding
from ..runtime.safetensors_reader import DTYPES

DEFAULT_LIBRARY = "model.so"
DEFAULT_TOKENIZER = "tokenizer.json"
IR_FILE = "model.ir"
WEIGHTS_DIR = "weights"
MAX_SHARD_BYTES = 1 << 30

_COMPUTED = ("format_version", "llmopt_version", "weights", "files")


def write_artifact(
    out_dir: str | Path,
    *,
    executable: Any,
    weights: Iterable[tuple[str, np.ndarray]],
    tokenizer_json_path: str | Path,
    ir_text: str,
    manifest_fields: dict[str, Any],
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    encode_weights: bool = False,
) -> Manifest:
    """Write an artifact to `out_dir` and return its manifest.

    `executable` is anything with `export_library(path)` (a Relax executable); it is exported
    under `manifest_fields["library"]` (default `model.so`). `weights` yields (IR name, array)
    pairs lazily, in the order the library takes them; they are written to safetensors shards of
    at most `max_shard_bytes` (a larger single tensor gets a shard of its own) as they come, so
    that at most a few MiB besides the current array are held (`_Shard`). `manifest_fields` gives every manifest field except the computed ones
    (format_version, llmopt_version, weights, files); `tokenizer.file` defaults to
    `tokenizer.json`. An existing `out_dir` is an error unless `overwrite`, in which case it is
    replaced only once the new artifact is complete. `encode_weights` stores mostly-one-value
    (pruned) weights compactly, see `_write_shards`.
    """
    out = Path(out_dir).absolute()
    if os.path.lexists(out) and not overwrite:
        raise _exists_error(out)
    fields = _check_fields(manifest_fields)
    check_output_path(out)
    _make_dir(out.parent, out, parents=True)
    _clean_up_after_killed_builds(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left over by a crashed run that had the same pid
    try:
        _make_dir(tmp, out)
        executable.export_library(str(tmp / fields["library"]))
        infos = _write_shards(tmp, weights, max_shard_bytes, encode_weights)
        shutil.copyfile(tokenizer_json_path, tmp / fields["tokenizer"]["file"])
        (tmp / IR_FILE).write_text(ir_text, encoding="utf-8")
        manifest = Manifest.from_dict(
            {
                **fields,
                "format_version": FORMAT_VERSION,
                "llmopt_version": __version__,
                "weights": [dataclasses.asdict(info) for info in infos],
                "files": _hash_tree(tmp),
            },
            source="manifest_fields",
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _fsync_tree(tmp)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    return manifest


def check_output_path(out: str | Path) -> None:
    """An ``LLMOptError`` naming ``out`` unless an artifact can be written there: its nearest
    existing ancestor must be a folder this process may write in. Cheap, so a build checks it
    before any work (the writer checks again, and turns a failing mkdir into the same error)."""
    out = Path(out).absolute()
    ancestor = out.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LLMOptError(f"output {out} cannot be written: {ancestor} is a file, not a folder.",
                          "Choose another -o, in a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LLMOptError(f"output {out} cannot be written: no permission to write in {ancestor}.",
                          "Choose another -o, in a folder you can write to.")


def _make_dir(path: Path, out: Path, parents: bool = False) -> None:
    try:
        path.mkdir(parents=parents, exist_ok=parents)
    except OSError as err:  # a file in the way, a read-only file system, no permission, no space
        raise LLMOptError(f"output {out} cannot be written: creating {path} failed ({err.strerror}).",
                          "Choose another -o, in a folder you can write to.") from None


def _exists_error(out: Path) -> ArtifactError:
    return ArtifactError(
        f"output path {out} already exists",
        hint="pass --force to replace it, or choose another output path",
        path=out,
    )


def _check_fields(manifest_fields: dict[str, Any]) -> dict[str, Any]:
    """Copy of the caller's fields with defaults filled in; ValueError on wrong keys."""
    clashing = [k for k in _COMPUTED if k in manifest_fields]
    if clashing:
        raise ValueError(f"manifest_fields must not set computed field(s): {', '.join(clashing)}")
    required = {f.name for f in dataclasses.fields(Manifest)} - set(_COMPUTED) - {"library"}
    missing = sorted(required - manifest_fields.keys())
    if missing:
        raise ValueError(f"manifest_fields lacks field(s): {', '.join(missing)}")
    fields = {"library": DEFAULT_LIBRARY, **manifest_fields}
    fields["tokenizer"] = {"file": DEFAULT_TOKENIZER, **manifest_fields["tokenizer"]}
    return fields


def _write_shards(
    root: Path, weights: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int, encode: bool = False
) -> list[WeightInfo]:
    """Write weights shard by shard, each array as it comes; return their manifest entries in the
    order produced. With `encode`, a weight that is mostly one value (a pruned one) is stored as
    its fill-bitmask encoding (`runtime/weight_encoding.py`) where that saves bytes."""
    (root / WEIGHTS_DIR).mkdir()
    shards: list[_Shard] = []
    seen: set[str] = set()
    for name, array in weights:
        array = np.ascontiguousarray(array)
        info, parts = _stored(name, array, encode)
        for part_name, _ in parts:
            if part_name in seen:
                raise ValueError(f"weight {part_name!r} was produced twice")
            seen.add(part_name)
        if not shards or not shards[-1].fits(parts, max_shard_bytes):
            if shards:
                shards[-1].close()
            shards.append(_Shard(root / WEIGHTS_DIR / f"shard-{len(shards)}.partial"))
        for part_name, part in parts:
            shards[-1].add(part_name, part)
        shards[-1].weights.append(info)
        del array, parts  # written (or buffered): drop them before the next weight is made
    if shards:
        shards[-1].close()

    infos = []
    file_mode = root.stat().st_mode & 0o666  # what the umask allows (as for the other files)
    for i, shard in enumerate(shards):
        rel = f"{WEIGHTS_DIR}/weights-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(shard.path, root / rel)
        os.chmod(root / rel, file_mode)
        infos += [dataclasses.replace(info, file=rel) for info in shard.weights]
    return infos


def _stored(name: str, array: np.ndarray, encode: bool) -> tuple[WeightInfo, list[tuple[str, np.ndarray]]]:
    """The manifest entry of weight `name` (its shard still unknown) and the tensors that store it:
    itself, or the mask and values of its fill-bitmask encoding where that saves bytes."""
    if array.dtype.name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"weights of dtype {array.dtype} cannot be stored (known: {sorted(_SAFETENSORS_DTYPES)})")
    info = WeightInfo(name, tuple(array.shape), array.dtype.name, "")
    encoded = weight_encoding.encode(name, array) if encode else None
    if encoded is None:
        return info, [(name, array)]
    encoding, mask, values = encoded
    return dataclasses.replace(info, encoding=encoding), [(encoding.mask, mask), (encoding.values, values)]


# numpy dtype name <-> safetensors dtype (the runtime reads them back with the same table)
_SAFETENSORS_DTYPES = {np.dtype(t).name: code for code, t in DTYPES.items()}
_NUMPY_DTYPES = {code: name for name, code in _SAFETENSORS_DTYPES.items()}


class _Shard:
    """One safetensors file, written tensor by tensor.

    Tensors are buffered until STREAM_AFTER bytes; a shard that stays smaller is written at
    `close` with an exact header. Past that, the file is opened with HEADER_RESERVE bytes kept
    for the header, the buffer and every later tensor are appended as they come (and freed by the
    caller), and `close` writes the header into the reserved space, padded with spaces (which the
    safetensors format allows). So at most STREAM_AFTER bytes plus one tensor are held.
    """

    STREAM_AFTER = 16 << 20
    HEADER_RESERVE = 64 << 10

    def __init__(self, path: Path):
        self.path = path
        self.header: dict[str, dict] = {}
        self.weights: list[WeightInfo] = []  # the manifest entries of the weights stored here
        self.buffered: list[np.ndarray] = []
        self.data_bytes = 0
        self.file = None
        self.reserved = 0

    def _entry(self, array: np.ndarray) -> dict:
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
        if dtype is None:
            raise ValueError(f"weights of dtype {array.dtype} cannot be stored (known: {sorted(_SAFETENSORS_DTYPES)})")
        return {"dtype": dtype, "shape": list(array.shape),
                "data_offsets": [self.data_bytes, self.data_bytes + array.nbytes]}

    def fits(self, parts: list[tuple[str, np.ndarray]], max_bytes: int) -> bool:
        """Whether the tensors `parts` may join this shard together (an empty shard takes any)."""
        if not self.header:
            return True
        if self.data_bytes + sum(array.nbytes for _, array in parts) > max_bytes:
            return False
        return self.file is None or len(self._header_json(dict(self._entries(parts)))) <= self.reserved

    def _entries(self, parts: list[tuple[str, np.ndarray]]):
        offset = self.data_bytes
        for name, array in parts:
            yield name, {**self._entry(array), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes

    def add(self, name: str, array: np.ndarray) -> None:
        self.header[name] = self._entry(array)
        self.data_bytes += array.nbytes
        if self.file is not None:
            _write_array(self.file, array)
            return
        self.buffered.append(array)
        if self.data_bytes >= self.STREAM_AFTER:
            self.reserved = max(self.HEADER_RESERVE, _round8(len(self._header_json()) * 2))
            self.file = open(self.path, "wb")
            self.file.write(b"\0" * (8 + self.reserved))
            for buffered in self.buffered:
                _write_array(self.file, buffered)
            self.buffered.clear()

    def _header_json(self, extra: dict | None = None) -> bytes:
        return json.dumps({**self.header, **(extra or {})}, separators=(",", ":")).encode()

    def close(self) -> None:
        header = self._header_json()
        if self.file is None:
            header += b" " * (_round8(len(header)) - len(header))  # the data starts 8-byte aligned
            with open(self.path, "wb") as f:
                f.write(len(header).to_bytes(8, "little") + header)
                for array in self.buffered:
                    _write_array(f, array)
            self.buffered.clear()
        else:
            assert len(header) <= self.reserved, "fits() keeps the header within its reserved space"
            self.file.seek(0)
            self.file.write(self.reserved.to_bytes(8, "little") + header + b" " * (self.reserved - len(header)))
            self.file.close()
            self.file = None


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _write_array(f, array: np.ndarray) -> None:
    """Append `array`'s bytes, little-endian, without copying a native little-endian array."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    f.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def _hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST_NAME
    }


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`; with `overwrite`, swap out an existing `out`."""
    if os.path.lexists(out):
        if not overwrite:
            raise _exists_error(out)  # it appeared while we were writing
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _clean_up_after_killed_builds(out: Path) -> None:
    """Remove ``.<name>.tmp-<pid>`` siblings of ``out`` whose build process no longer exists, and
    restore (or, when ``out`` exists again, remove) ``.<name>.old-<pid>`` ones."""
    for kind in ("old", "tmp"):  # old first: a restored artifact must not be cleaned as a leftover
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = path.name.rsplit("-", 1)[1]
            if not pid.isdigit() or not _process_is_gone(int(pid)):
                continue
            if kind == "old" and not os.path.lexists(out):
                os.rename(path, out)
            else:
                _remove(path)


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
