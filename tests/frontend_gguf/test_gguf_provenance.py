"""Provenance of imported weights: a GGUF import names the GGUF tensor each weight came from."""


def test_gguf_weights_cite_their_gguf_tensor(smollm2_from_gguf):
    nodes = {n.attr["name"]: n.source for n in smollm2_from_gguf.functions["prefill"].nodes if n.op == "weight"}
    assert nodes["model.embed_tokens.weight"] == "token_embd.weight"
    assert nodes["model.layers.0.self_attn.q_proj.weight"] == "blk.0.attn_q.weight"
    assert nodes["model.layers.29.mlp.down_proj.weight"] == "blk.29.ffn_down.weight"
    assert nodes["model.norm.weight"] == "output_norm.weight"


def test_hf_weights_need_no_source(smollm2_from_folder):
    """The HF name is the checkpoint's own name, so the dump stays quiet."""
    weights = [n for n in smollm2_from_folder.functions["prefill"].nodes if n.op == "weight"]
    assert weights and all(n.source == "" for n in weights)
