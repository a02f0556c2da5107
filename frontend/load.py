"""``load_model``: any model input llmopt reads -> IR module, dispatched by what the input is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelInputError
from ..ir.graph import Module
from .gguf_file import load_gguf
from .hf_folder import load_hf_folder
from .zoo import DEFAULT_MODEL, resolve_model


@dataclass(frozen=True)
class InputKind:
    """One kind of model input: how to say it, how to recognise it, how to load it."""

    description: str
    matches: Callable[[str], bool]
    load: Callable[[str], Module]


INPUT_KINDS = (  # tried in order
    InputKind(f"the name {DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct)",
              lambda spec: spec == DEFAULT_MODEL, lambda spec: load_hf_folder(resolve_model(spec))),
    InputKind("a Hugging Face model folder (config.json + *.safetensors)", lambda spec: Path(spec).is_dir(),
              load_hf_folder),
    InputKind("a llama.cpp .gguf file", lambda spec: Path(spec).suffix.lower() == ".gguf", load_gguf),
)


def load_model(path_or_name: str | Path) -> Module:
    """The IR module of a model folder, a GGUF file, or the default model's name."""
    spec = str(path_or_name)
    for kind in INPUT_KINDS:
        if kind.matches(spec):
            return kind.load(spec)
    accepted = "; ".join(kind.description for kind in INPUT_KINDS)
    problem = "not a model llmopt can read" if Path(spec).exists() else "no such file or folder"
    raise ModelInputError(f"{spec}: {problem}.",
                          f"Pass {accepted}. A torch.nn.Module goes through the Python API: "
                          "llmopt.frontend.torch_export.from_module.")
