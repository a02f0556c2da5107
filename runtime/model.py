"""Load a compiled artifact and run its `prefill` / `decode` entry points.

Calling convention of the library (see `llmopt.runtime.manifest`):
`prefill(ids i32[1, n], pos i32[n], *weights) -> (logits f32[1, n, vocab], k_0, v_0, ...)` where each
k_i / v_i is [1, n, kv_heads, head_dim], and
`decode(ids i32[1, 1], pos i32[1], k_0, v_0, ..., *weights) -> (logits f32[1, 1, vocab], k_0, ...)`
where each k_i / v_i is a buffer of [1, capacity, kv_heads, head_dim] holding `pos` rows: decode
writes row `pos` in place and returns the same buffers. The runtime copies prefill's cache into
zeroed buffers with room to spare and doubles them when full, so a step costs one row, not a copy
of the cache. An int8 cache has per layer the tensors the manifest's `kv_cache.tensors` names
(codes k_i, f32 scales k_i.scale [1, rows, kv_heads], v_i, v_i.scale), in that order; the runtime
treats every cache tensor alike. Weights are bound once at load, in the manifest's order.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._tvm import import_tvm
from .cuda_device import cuda_device
from .metal_device import metal_device
from .errors import ArtifactError
from .artifact_weights import read_weights
from .manifest import Manifest, read_manifest, resolve, verify
from .rocm_device import rocm_device
from .tokenizer import Tokenizer

_ENTRY_POINTS = ("prefill", "decode", "logits")
GPU_DEVICES = {"cuda": cuda_device, "rocm": rocm_device, "metal": metal_device}
"""device kind -> (tvm, manifest target, artifact dir) -> the TVM device, or ArtifactError saying why not."""
# LLVM CPU features that are instruction sets (the others are tuning hints, safe to lack).
_ISA_PREFIXES = (
    "sse", "ssse3", "avx", "amx", "fma", "f16c", "bmi", "neon", "sve", "dotprod", "i8mm"
)
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
"""Other names of an architecture (Windows', macOS's) -> LLVM's."""


MIN_CAPACITY = 256
"""Rows a cache buffer has at least (a prompt's cache gets room for this many more tokens)."""


@dataclass(frozen=True)
class KVCache:
    """The KV cache: device buffers (k_0, v_0, k_1, v_1, ..., or as the manifest's `kv_cache.tensors`
    say) of `capacity` rows, the first `length` of them filled.

    `CompiledModel.decode` writes the next row into these buffers and returns a cache one row
    longer: pass each cache to decode once (an older one's rows after its length are overwritten).
    """

    tensors: tuple[Any, ...]
    length: int

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return int(self.tensors[0].shape[1]) if self.tensors else 0


class CompiledModel:
    """A loaded artifact: the Relax VM, its bound weights, the tokenizer and the manifest."""

    def __init__(
        self, manifest: Manifest, vm: Any, weights: list[Any], tokenizer: Tokenizer, tvm: Any,
        path: Path,
    ) -> None:
        self.path = path  # the artifact directory
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._tvm = tvm
        self._dev = tvm.device(manifest.target.get("device") or "cpu", 0)  # as _check_target chose it
        self._prefill = vm["prefill"]
        self._decode = vm["decode"]
        self._logits = vm["logits"]
        self._weights = weights
        self._cache_tensors = len(manifest.kv_cache.names())
        # decode's inputs besides the cache: host arrays and device tensors reused every step
        self._step_ids = np.zeros((1, 1), dtype=np.int32)
        self._step_pos = np.zeros((1,), dtype=np.int32)
        self._step_ids_tensor = tvm.runtime.tensor(self._step_ids, self._dev)
        self._step_pos_tensor = tvm.runtime.tensor(self._step_pos, self._dev)

    @property
    def config(self) -> dict[str, Any]:
        """The model configuration recorded at build time."""
        return self.manifest.model

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size from the model config, if it records one."""
        return self.config.get("vocab_size")

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """Run the prompt `ids` (1-D ints) from position 0: the next token's logits [vocab] and the cache."""
        ids = self._check_ids(ids)
        n = ids.shape[0]
        pos = np.arange(n, dtype=np.int32)
        out = self._prefill(self._tensor(ids.reshape(1, n)), self._tensor(pos), *self._weights)
        rows = self._cache(out, n)
        return out[0].numpy()[0, -1], self._buffers(rows.tensors, n, n + MIN_CAPACITY)

    def decode(self, token_id: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run one token after `cache`: logits [vocab] and the cache one row longer.

        The library writes the new row into the cache buffers in place, so the returned cache holds
        the same buffers (the library's returned ones are not looked up: a step's Python work is
        kept to the ids, the position and the logits).
        """
        if not isinstance(cache, KVCache) or len(cache.tensors) != self._cache_tensors:
            names = self.manifest.kv_cache.names()
            got = f"{len(cache.tensors)} tensors" if isinstance(cache, KVCache) else type(cache).__name__
            raise ValueError(
                f"cache has {got}, this model needs {len(names)} ({', '.join(names[:4])}"
                f"{', ...' if len(names) > 4 else ''}): pass a cache returned by this model"
            )
        self._step_ids[0, 0] = self._check_token(token_id)
        if cache.length >= cache.capacity:  # full: double the buffers
            cache = self._buffers(cache.tensors, cache.length, 2 * max(cache.capacity, MIN_CAPACITY // 2))
        self._step_pos[0] = cache.length
        self._step_ids_tensor.copyfrom(self._step_ids)
        self._step_pos_tensor.copyfrom(self._step_pos)
        out = self._decode(self._step_ids_tensor, self._step_pos_tensor, *cache.tensors, *self._weights)
        return out[0].numpy()[0, 0], KVCache(cache.tensors, cache.length + 1)

    def _check_token(self, token_id: Any) -> int:
        """`token_id` as an int in the vocabulary, or ValueError (the one-token case of _check_ids)."""
        if isinstance(token_id, (int, np.integer)) and not isinstance(token_id, bool):
            vocab = self.vocab_size
            if 0 <= token_id and (vocab is None or token_id < vocab):
                return int(token_id)
        return int(self._check_ids([token_id])[0])

    def _buffers(self, tensors: tuple[Any, ...], length: int, capacity: int) -> KVCache:
        """A cache of zeroed `capacity`-row buffers holding the first `length` rows of `tensors`."""
        buffers = []
        for tensor in tensors:
            shape = (1, capacity, *tensor.shape[2:])
            buffer = self._tvm.runtime.tensor(np.zeros(shape, dtype=str(tensor.dtype)), self._dev)
            rows = tensor._create_view((1, length, *tensor.shape[2:])) if tensor.shape[1] != length else tensor
            rows.copyto(buffer._create_view((1, length, *tensor.shape[2:])))
            buffers.append(buffer)
        return KVCache(tuple(buffers), length)

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [n, vocab] for every position of `ids`, from an empty cache (for perplexity)."""
        ids = self._check_ids(ids)
        out = self._logits(self._tensor(ids[None, :]), self._tensor(np.arange(len(ids), dtype=np.int32)),
                           *self._weights)
        return out[0].numpy()[0]

    def _tensor(self, array: np.ndarray) -> Any:
        return self._tvm.runtime.tensor(array, self._dev)

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"expected a non-empty 1-D array of token ids, got {ids.dtype}{list(ids.shape)}"
            )
        vocab = self.vocab_size
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int32)

    def _cache(self, out: Any, length: int) -> KVCache:
        info = self.manifest.kv_cache
        if len(out) != 1 + len(info.names()):
            raise ArtifactError(
                f"the library returned {len(out)} outputs, the manifest's {info.layers} layers of "
                f"{len(info.tensors)} cache tensors need {1 + len(info.names())}",
                hint="the artifact is inconsistent; rebuild it",
            )
        return KVCache(tuple(out[i] for i in range(1, len(out))), length)


def load(
    artifact_dir: str | Path, device: str | None = None, *, verify_hashes: bool = True
) -> CompiledModel:
    """Load the artifact at `artifact_dir` for `device` (None: the artifact's own: "cpu", "cuda", "rocm",
    "metal").

    Verifies the manifest and, unless `verify_hashes` is False, the sha256 of every file; checks
    that this machine can run the target; binds the weights once. Raises ArtifactError otherwise.
    """
    artifact_dir = Path(artifact_dir)
    manifest = verify(artifact_dir) if verify_hashes else read_manifest(artifact_dir)
    tvm = import_tvm()
    dev = _check_target(tvm, manifest, device, artifact_dir)
    missing = [e for e in _ENTRY_POINTS if e not in {p.get("name") for p in manifest.entry_points}]
    if missing:
        raise ArtifactError(
            f"{artifact_dir} has no entry point(s) {', '.join(missing)}",
            hint="rebuild the artifact with `llmopt build`",
            path=artifact_dir,
        )
    lib_path = resolve(artifact_dir, manifest.library)
    try:
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    except (RuntimeError, AttributeError) as err:
        raise ArtifactError(
            f"cannot load the library {lib_path}: {err}",
            hint="the TVM runtime here may differ from the one that built it; rebuild the artifact",
            path=lib_path,
        ) from err
    tok = manifest.tokenizer
    tokenizer = Tokenizer(
        resolve(artifact_dir, tok.file),
        bos_token_id=tok.bos_token_id,
        eos_token_ids=tok.eos_token_ids,
        add_bos=tok.add_bos,
        chat_template=tok.chat_template,
    )
    return CompiledModel(manifest, vm, _load_weights(tvm, artifact_dir, manifest, dev), tokenizer, tvm,
                         Path(artifact_dir))


def _check_target(tvm: Any, manifest: Manifest, device: str | None, artifact_dir: Path) -> Any:
    """The TVM device to run the artifact on; ArtifactError unless this machine can run its target
    on `device` (None: the target's device)."""
    target = manifest.target
    tvm_target = target.get("tvm") or {}
    if device not in (None, target.get("device")):
        raise ArtifactError(
            f"{artifact_dir} was built for target {target.get('name')!r}, which runs on "
            f"{'the CPU' if target.get('device') == 'cpu' else target.get('device')} only, not on device {device!r}",
            hint=f"omit the device, or rebuild it with `llmopt build ... --target {device}`",
            path=artifact_dir,
        )
    gpu_device = GPU_DEVICES.get(target.get("device"))
    if gpu_device is not None and tvm_target.get("kind") == target.get("device"):
        dev = gpu_device(tvm, target, artifact_dir)  # first: off its device, the host code may be foreign too
        _check_host_cpu(tvm, tvm_target.get("host") or {}, artifact_dir)  # the host code's architecture
        return dev
    if target.get("device") == "webgpu":
        raise ArtifactError(
            f"{artifact_dir} was built for target 'webgpu': it runs in a web browser, not in this runtime",
            hint=f"serve the folder (python -m http.server -d {artifact_dir} 8000) and open "
            "http://localhost:8000/web/index.html?ids=1,2,3 in a browser with WebGPU (see web/README.md), "
            "or rebuild it with `llmopt build ... --target cpu`",
            path=artifact_dir,
        )
    if target.get("device") != "cpu" or tvm_target.get("kind") != "llvm":
        raise ArtifactError(
            f"{artifact_dir} was built for target {target.get('name')!r} "
            f"(device {target.get('device')!r}); this runtime runs artifacts for the CPU and "
            f"{', '.join(GPU_DEVICES)} only",
            hint="rebuild it with `llmopt build ... --target cpu`",
            path=artifact_dir,
        )
    _check_host_cpu(tvm, tvm_target, artifact_dir)
    return tvm.cpu()


def machine_arch() -> str:
    """This machine's architecture as LLVM triples name it (``x86_64``, ``aarch64``), from the OS."""
    return _arch_name(platform.machine())


def _arch_name(name: str) -> str:
    name = name.lower()
    return _ARCH_ALIASES.get(name, name)


def _triple_os(triple: str) -> str | None:
    """The OS an LLVM triple names (``linux``, ``macos``), None if another or none."""
    if "linux" in triple:
        return "linux"
    return "macos" if any(word in triple for word in ("apple", "darwin", "macos")) else None


def _check_machine(tvm_target: dict[str, Any], artifact_dir: Path) -> None:
    """Raise ArtifactError if the target's ``mtriple`` names another architecture or OS than this
    machine's (e.g. an aarch64 Linux library here on x86-64). Needs no LLVM."""
    triple = str(tvm_target.get("mtriple") or "")
    if not triple:
        return
    arch, here = _arch_name(triple.split("-")[0]), machine_arch()
    os_name, here_os = _triple_os(triple), _triple_os(sys.platform.replace("darwin", "macos"))
    if arch == here and (os_name is None or here_os is None or os_name == here_os):
        return
    names = {"linux": "Linux", "macos": "macOS"}
    what, machine = f"{arch} {names.get(os_name, '')}".strip(), f"{here} {names.get(here_os, sys.platform)}"
    raise ArtifactError(
        f"{artifact_dir} was built for {tvm_target.get('mcpu') or arch} ({triple}) and needs architecture "
        f"{arch}{' on ' + names[os_name] if os_name else ''}; this machine is {machine}",
        hint=f"copy the folder to an {what} machine and load it there (with the TVM runtime and llmopt "
        "installed), or rebuild it for this machine: `llmopt build MODEL --target cpu -o OUT` without --arch",
        path=artifact_dir,
    )


def _check_host_cpu(tvm: Any, tvm_target: dict[str, Any], artifact_dir: Path) -> None:
    """Raise ArtifactError if the target's architecture or instruction sets are not this CPU's.

    The architecture and OS come from the target's ``mtriple`` against this machine's
    (:func:`_check_machine`); a target without one was built for its build machine's kind, so its
    CPU must be one LLVM knows for this machine's. The instruction sets are asked of TVM's LLVM;
    skipped where it cannot tell (a TVM runtime without LLVM, or a host CPU LLVM does not know).
    Features are LLVM's for the CPU names, not CPUID's.
    """
    _check_machine(tvm_target, artifact_dir)
    try:
        from tvm.target import codegen

        host_cpu = codegen.llvm_get_system_cpu()
        host_triple = str(codegen.llvm_get_system_triple())
        host_arch = _arch_name(host_triple.split("-")[0])
        arch = _arch_name(tvm_target.get("mtriple", host_arch).split("-")[0])
        missing = []
        mcpu = tvm_target.get("mcpu")
        foreign_cpu = bool(mcpu) and "mtriple" not in tvm_target and not codegen.llvm_is_valid_cpu(
            mcpu, host_triple)
        if arch == host_arch and mcpu and mcpu != host_cpu and host_cpu != "generic" and not foreign_cpu:
            host = tvm.target.Target({**tvm_target, "mcpu": host_cpu})
            have = set(codegen.llvm_get_cpu_features(host))
            need = set(codegen.llvm_get_cpu_features(tvm.target.Target(tvm_target)))
            missing = sorted(f for f in need - have if f.startswith(_ISA_PREFIXES))
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return
    if foreign_cpu:
        raise ArtifactError(
            f"{artifact_dir} was built for CPU {mcpu}, which is not a CPU of this machine's kind "
            f"({host_cpu}, {host_arch})",
            hint="load it on a machine of the kind that built it, or rebuild it for this machine: "
            "`llmopt build MODEL --target cpu -o OUT` without --arch",
            path=artifact_dir,
        )
    if arch != host_arch or missing:
        what = f"architecture {arch}" if arch != host_arch else f"CPU features {', '.join(missing)}"
        raise ArtifactError(
            f"{artifact_dir} was built for {mcpu or arch} and needs {what}, which this machine "
            f"({host_cpu}, {host_arch}) lacks",
            hint=f"rebuild it on this machine, or for this CPU (mcpu {host_cpu}) or an older one",
            path=artifact_dir,
        )


def _load_weights(tvm: Any, artifact_dir: Path, manifest: Manifest, dev: Any) -> list[Any]:
    """Read every weight (decoding an encoded one) into a device tensor; return them in manifest order."""
    tensors: list[Any] = [None] * len(manifest.weights)
    for i, array in read_weights(artifact_dir, manifest):
        tensors[i] = tvm.runtime.tensor(array, dev)
    return tensors
