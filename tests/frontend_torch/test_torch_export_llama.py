"""torch.export frontend on a tiny random transformers LlamaForCausalLM, traced as is."""

import numpy as np
import torch
import transformers

from llmopt.frontend.torch_export import from_module
from llmopt.ir import parse_module, print_module, run_module

SEQ = 8


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_logits_match_transformers():
    model = _tiny_llama()
    ids = torch.randint(0, 100, (1, SEQ))
    ir = from_module(model, (ids,))
    forward = ir.functions["forward"]
    assert [(p.name, str(p.type)) for p in forward.params] == [("input_ids", f"i32[1, {SEQ}]")]
    assert [name for name, _ in forward.outputs] == ["logits"]
    logits = run_module(ir, "forward", {"input_ids": ids.numpy()})["logits"]
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    # The folded causal mask became causal attention; the rotary tables one shared pair of weights.
    assert [n.attr["causal"] for n in forward.nodes if n.op == "attention"] == [True, True]
    folded = {n for n in ir.weights.names() if n.startswith("folded.")}
    assert len(folded) == 2
    assert set(ir.weights.names()) - folded == set(model.state_dict())
    down = [n for n in forward.nodes if n.op == "linear" and n.source == "model.layers.1.mlp.down_proj"]
    assert len(down) == 1
    assert parse_module(print_module(ir), ir.weights) == ir
