"""A build streams the model block by block: its peak memory does not grow with the model.

Two random fp16 Llamas that differ only in their number of layers (4 and 16; hidden 768, so one
decoder block is 27 MiB in f32) are generated to disk and built to int4 (``w4g128``, RTN) each in a
fresh process (``bench/bench_memory_bound.py``'s helpers), whose peak RSS (VmHWM) is read at the
end of the build. Bounds:

- the 16-layer build peaks less than ONE f32 block above the 4-layer one. Holding the 12 extra
  layers in any form (f32, fp16, or even their int4 codes, 48 MiB) would exceed that; the test
  checks that last claim on the artifacts' sizes;
- the 16-layer build peaks below the 16-layer model's f32 size plus TVM's own baseline, measured
  as the child's peak at the end of the compile step (imports, TVM compilation: no weight is read
  before the write step).

And the artifact written that way holds the reference weights: codes and scales of
``Scheme.quantize`` of the fp16 checkpoint's f32 values, the float LM head, in the target's
stored layout. The artifact writer's shards, written tensor by tensor, read back equal with
``safetensors``' own reader too, whatever closes a shard (its size, or its reserved header space).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llmopt.codegen import artifact_writer
from llmopt.ir.quant_schemes import get_scheme
from llmopt.runtime.manifest import read_manifest
from llmopt.runtime.safetensors_reader import read_tensors
from llmopt.targets import get_target

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_memory_bound.py"
LAYERS = (4, 16)
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
             vocab_size=1024)
MIB = 1 << 20


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory_bound", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """layers -> {config, model, artifact, peak_rss_mib, compile_peak_mib}."""
    bench, root = _bench(), tmp_path_factory.mktemp("memory")
    found = {}
    for layers in LAYERS:
        config = bench.llama_config("tiny", num_hidden_layers=layers, **SHAPE)
        model, artifact = root / f"llama{layers}", root / f"llama{layers}-w4g128"
        bench.write_random_llama(model, config, seed=layers)
        built = bench.build_in_child(model, artifact, "w4g128", timeout=300)
        found[layers] = {"config": config, "model": model, "artifact": artifact,
                         "block_f32": 4 * bench.block_parameters(config),
                         "model_f32": 4 * bench.model_parameters(config),
                         "peak_rss_mib": built["peak_rss_mib"],
                         "compile_peak_mib": built["peak_rss_mib_after"]["compile"]}
    return found


def _weight_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in (artifact / "weights").iterdir())


def test_peak_rss_does_not_grow_with_the_layers(builds):
    small, large = builds[LAYERS[0]], builds[LAYERS[-1]]
    block_mib = large["block_f32"] / MIB
    extra_int4_mib = (_weight_bytes(large["artifact"]) - _weight_bytes(small["artifact"])) / MIB
    assert extra_int4_mib > block_mib, "the bound must be tight enough to catch holding the extra layers as int4"
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    assert growth < block_mib, (f"{LAYERS[-1]} layers peak at {large['peak_rss_mib']} MiB, {LAYERS[0]} at "
                                f"{small['peak_rss_mib']} MiB: +{growth:.1f} MiB for {LAYERS[-1] - LAYERS[0]} more "
                                f"layers, one f32 block is {block_mib:.1f} MiB")


def test_peak_rss_is_below_the_f32_model_plus_tvm(builds):
    large = builds[LAYERS[-1]]
    bound = large["model_f32"] / MIB + large["compile_peak_mib"]
    assert large["peak_rss_mib"] < bound, (large["peak_rss_mib"], bound)


def test_streamed_artifact_holds_the_reference_weights(builds):
    """The last layer's fused gate/up codes and scales, and the float LM head, as stored."""
    large = builds[LAYERS[-1]]
    mlp = f"model.layers.{LAYERS[-1] - 1}.mlp."
    source = {}
    for path in large["model"].glob("*.safetensors"):
        source.update({k: v.astype(np.float32) for k, v in load_file(str(path)).items()
                       if k in ("lm_head.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight")})
    scheme = get_scheme("w4g128")
    quantized = scheme.quantize(np.concatenate([source[mlp + "gate_proj.weight"], source[mlp + "up_proj.weight"]]))
    fused = mlp + "gate_proj+up_proj.weight.w4g128."
    expected = {fused + "packed": scheme.pack(quantized.codes), fused + "scales": quantized.scales,
                "lm_head.weight": source["lm_head.weight"]}

    manifest = read_manifest(large["artifact"])
    layout, packed = get_target("cpu").linear_weight_layout(), set(manifest.target["weight_layout"]["packed"])
    files = {w.name: w.file for w in manifest.weights}
    for name, want in expected.items():
        want = layout.pack(want) if name in packed else want
        [(_, got)] = read_tensors(large["artifact"] / files[name], [name])
        assert got.dtype == want.dtype and np.array_equal(got, want), name


def test_shards_written_tensor_by_tensor_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_writer._Shard, "STREAM_AFTER", 1000)  # stream past 1000 bytes
    monkeypatch.setattr(artifact_writer._Shard, "HEADER_RESERVE", 512)  # a header room filled by ~6 entries
    rng = np.random.default_rng(0)
    weights = {"small": np.arange(3, dtype=np.float16), "first_big": rng.standard_normal((20, 30)).astype(np.float32)}
    weights.update({f"block.{i}.packed": rng.integers(0, 2**32, (7, 5), dtype=np.uint32) for i in range(12)})
    weights.update({"table": rng.standard_normal((300, 4)).astype(np.float32), "flag": np.array([True, False])})
    infos = artifact_writer._write_shards(tmp_path, iter(weights.items()), max_shard_bytes=4000)
    assert [i.name for i in infos] == list(weights)
    files = list(dict.fromkeys(i.file for i in infos))
    assert len(files) > 2
    for file in files:
        loaded = load_file(str(tmp_path / file))
        assert set(loaded) == {i.name for i in infos if i.file == file}
        for name, array in loaded.items():
            assert array.dtype == weights[name].dtype and np.array_equal(array, weights[name]), name
        for info in infos:
            if info.file == file:
                assert info.dtype == str(weights[info.name].dtype) and info.shape == weights[info.name].shape
