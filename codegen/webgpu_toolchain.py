"""Link WebGPU libraries: the model's wasm32 objects and TVM's web runtime into one ``.wasm``.

TVM compiles a WebGPU module into WGSL kernels plus host code for ``wasm32`` (wasm object files,
LLVM 22). A browser runs them with tvmjs, TVM's JS runtime (npm ``@mlc-ai/web-runtime``), which
needs the host code linked with TVM's C++ web runtime in one ``.wasm``. The apache-tvm wheel
ships that runtime's sources (``tvm/web/emcc``, ``tvm/src/runtime``, tvm_ffi's ``src``) but not
the few headers they include from TVM's ``support`` folder; ``web/runtime/shims`` has llmopt's own
versions of the declarations used (a byte stream with TVM's serialized layout, no-op NVTX ranges,
an IEEE half widening), and the RPC parts, which need more of them, are left out
(``web/runtime/rpc_stub.cc``). So a build:

1. checks, before any model work, that emscripten (``emcc``, Debian's ``emscripten``), Node.js
   (which emcc runs), TVM's web runtime sources and tvmjs (``npm ci`` in ``web/``) are there
   (``check_toolchain``: an ``LLMOptError`` naming what to install otherwise);
2. compiles the runtime with emcc once into a cache folder (``runtime_objects``; a few minutes),
   keyed by the TVM, tvm_ffi and emscripten versions and llmopt's shim sources;
3. links the model's objects with it (``link_wasm``; Debian's emscripten is LLVM 14, which cannot
   read TVM's LLVM 22 bitcode, but its wasm-ld links TVM's wasm object files).

Without asyncify (tvmjs runs without it: llmopt's page waits for the GPU in JS) and without
wasm-opt passes at link time, a link takes seconds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import LLMOptError

WEB_DIR = Path(__file__).resolve().parent.parent / "web"  # llmopt's web/ folder
SHIMS = WEB_DIR / "runtime" / "shims"
RPC_STUB = WEB_DIR / "runtime" / "rpc_stub.cc"
TVMJS_BUNDLE = WEB_DIR / "node_modules" / "@mlc-ai" / "web-runtime" / "lib" / "index.js"
PAGE_FILES = ("index.html", "llmopt_webgpu.js", "llmopt_tokenizer.js")  # web/page/ files copied into every artifact

# TVM's runtime pack without RPC (its RPC sources need support headers the wheel lacks)
_RPC_SOURCES = ("rpc_channel.cc", "rpc_endpoint.cc", "rpc_event_impl.cc", "rpc_module.cc")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-Wno-ignored-attributes")
LINK_FLAGS = ("-O1", "--no-entry", "-sWASM_BIGINT=1", "-sSTANDALONE_WASM=1", "-sALLOW_MEMORY_GROWTH=1",
              "-sERROR_ON_UNDEFINED_SYMBOLS=0")  # tvmjs provides the TVMFFIWasm* imports

INSTALL_HINT = ("Install emscripten and Node.js (Debian/Ubuntu: `apt-get install emscripten nodejs npm`), then "
                f"tvmjs with `npm ci --prefix {WEB_DIR}` (llmopt's .ci/setup_web.sh does all of it), or build "
                "for another target, e.g. --target cpu.")


def _site_packages(module: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LLMOptError(f"target webgpu: Python package {module} is not installed.",
                          "pip install apache-tvm==0.27.0.post1 (it brings apache-tvm-ffi).")
    return Path(list(spec.submodule_search_locations)[0])


def tvm_web_sources() -> tuple[Path, Path]:
    """(the tvm package folder, the tvm_ffi package folder), whose sources the runtime is built from."""
    return _site_packages("tvm"), _site_packages("tvm_ffi")


def check_toolchain() -> Path:
    """The ``emcc`` to use; an LLMOptError naming what to install when emcc, Node.js, TVM's web
    runtime sources or tvmjs are missing, or emcc does not run."""
    missing = []
    emcc = shutil.which("emcc")
    if emcc is None:
        missing.append("emcc (emscripten)")
    if shutil.which("node") is None:
        missing.append("node (Node.js, which emscripten runs)")
    tvm_dir, ffi_dir = tvm_web_sources()
    if not (tvm_dir / "web" / "emcc" / "wasm_runtime.cc").is_file() or not (ffi_dir / "src" / "ffi").is_dir():
        missing.append(f"TVM's web runtime sources ({tvm_dir / 'web' / 'emcc'}; reinstall apache-tvm==0.27.0.post1)")
    if not TVMJS_BUNDLE.is_file():
        missing.append(f"tvmjs (npm @mlc-ai/web-runtime in {WEB_DIR / 'node_modules'})")
    if missing:
        raise LLMOptError(f"target webgpu: {', '.join(missing)} not found; a WebGPU build links the model with "
                          "TVM's web runtime into a .wasm.", INSTALL_HINT)
    emcc_version(Path(emcc))
    return Path(emcc)


@functools.lru_cache(maxsize=None)
def emcc_version(emcc: Path) -> str:
    """The first line of ``emcc --version`` (an LLMOptError if emcc does not run)."""
    try:
        out = subprocess.run([str(emcc), "--version"], capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise LLMOptError(f"target webgpu: emcc at {emcc} does not run ({err}).", INSTALL_HINT) from None
    return out.stdout.splitlines()[0] if out.stdout else "emcc"


def _cache_root() -> Path:
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt") / "webgpu-runtime"


def _runtime_key(emcc: Path) -> str:
    """What the runtime objects depend on: versions, llmopt's shims and stub, the flags."""
    import tvm
    import tvm_ffi
    digest = hashlib.sha256()
    for part in (emcc_version(emcc), tvm.__version__, tvm_ffi.__version__, " ".join(COMPILE_FLAGS), *_RPC_SOURCES):
        digest.update(part.encode() + b"\0")
    for path in sorted([*SHIMS.rglob("*.h"), RPC_STUB]):
        digest.update(path.relative_to(WEB_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _source_tree(root: Path) -> None:
    """Lay out TVM's web runtime sources as its Makefile expects them, with llmopt's shims."""
    tvm_dir, ffi_dir = tvm_web_sources()
    shutil.copytree(tvm_dir / "src" / "runtime", root / "src" / "runtime")
    shutil.copytree(SHIMS / "src" / "support", root / "src" / "support")
    shutil.copytree(ffi_dir / "src", root / "3rdparty" / "tvm-ffi" / "src")
    shutil.copytree(SHIMS / "3rdparty" / "compiler-rt", root / "3rdparty" / "compiler-rt")
    shutil.copytree(tvm_dir / "web" / "emcc", root / "web" / "emcc")
    pack = (root / "web" / "emcc" / "wasm_runtime.cc").read_text()
    kept = [line for line in pack.splitlines() if not any(f"rpc/{name}" in line for name in _RPC_SOURCES)]
    (root / "web" / "emcc" / "llmopt_wasm_runtime.cc").write_text("\n".join(kept) + "\n")
    shutil.copy(RPC_STUB, root / "web" / "emcc" / "rpc_stub.cc")


def _include_flags(root: Path) -> list[str]:
    tvm_dir, ffi_dir = tvm_web_sources()
    return [f"-I{root}", f"-I{SHIMS / 'include'}", f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}",
            f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}"]


def runtime_objects(emcc: Path, report=lambda line: None) -> list[Path]:
    """TVM's web runtime compiled by ``emcc`` (wasm objects), built once into the cache."""
    folder = _cache_root() / _runtime_key(emcc)
    names = ("llmopt_wasm_runtime.o", "tvmjs_support.o", "webgpu_runtime.o", "rpc_stub.o")
    if all((folder / n).is_file() for n in names):
        return [folder / n for n in names]
    report(f"compiling TVM's web runtime with emscripten into {folder} (once; a few minutes)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmopt-webgpu-runtime-", dir=folder.parent) as tmp:
        root = Path(tmp) / "tvm"
        _source_tree(root)
        out = Path(tmp) / "objects"
        out.mkdir()

        def compile_one(name: str) -> None:
            source = root / "web" / "emcc" / name.replace(".o", ".cc")
            result = subprocess.run([str(emcc), *_include_flags(root), *COMPILE_FLAGS, "-c", "-o", str(out / name),
                                     str(source)], capture_output=True, text=True, cwd=root / "web")
            if result.returncode != 0:
                raise LLMOptError(f"target webgpu: emcc failed on TVM's web runtime ({source.name}):\n"
                                  f"{result.stderr[-4000:]}",
                                  "The emscripten here may be too old for TVM 0.27's sources; Debian 12's "
                                  "emscripten 3.1.6 works.")

        with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
            list(pool.map(compile_one, names))  # the largest first: it sets the wall time
        try:
            os.replace(out, folder)  # atomic: a concurrent build sees no folder or a complete one
        except OSError:
            if not all((folder / n).is_file() for n in names):
                raise
    return [folder / n for n in names]


def link_wasm(emcc: Path, objects: list[str], output: Path, report=lambda line: None) -> None:
    """Link the model's wasm objects with the web runtime into ``output`` (a standalone .wasm)."""
    runtime = runtime_objects(emcc, report)
    with tempfile.TemporaryDirectory(prefix="llmopt-emcc-") as tmp:
        result = subprocess.run([str(emcc), *LINK_FLAGS, "-o", str(output), *map(str, runtime), *objects],
                                capture_output=True, text=True, cwd=tmp)
    if result.returncode != 0 or not output.is_file():
        raise RuntimeError(f"emcc could not link the WebGPU library:\n{result.stdout}{result.stderr}")


def write_page(folder: Path) -> None:
    """The page and loader that run the artifact in a browser, with tvmjs and its license."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PAGE_FILES:
        shutil.copyfile(WEB_DIR / "page" / name, folder / name)
    shutil.copyfile(TVMJS_BUNDLE, folder / "tvmjs.bundle.js")
    package = TVMJS_BUNDLE.parent.parent
    for name in ("LICENSE", "NOTICE"):
        if (package / name).is_file():
            shutil.copyfile(package / name, folder / f"tvmjs.{name}")


if __name__ == "__main__":  # `python -m llmopt.codegen.webgpu_toolchain`: build the runtime into the cache now
    _emcc = check_toolchain()
    for _path in runtime_objects(_emcc, report=print):
        print(_path)
