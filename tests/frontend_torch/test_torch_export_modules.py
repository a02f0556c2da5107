"""torch.export frontend on small hand-written modules: interpreter output equals torch's."""

import numpy as np
import pytest
import torch
from torch.export import Dim

from llmopt.frontend.torch_export import from_module
from llmopt.ir import parse_module, print_module, run_module


def _roundtrips(module):
    assert parse_module(print_module(module), module.weights) == module


def _assert_matches(ir, inputs: dict, expected: dict, atol=1e-5):
    got = run_module(ir, "forward", {name: t.numpy() for name, t in inputs.items()})
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want.detach().numpy(), atol=atol, rtol=0, err_msg=name)


class Block(torch.nn.Module):
    """A pre-norm MLP block with a buffer and a scores/softmax branch; returns a dict."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(self.ln(x)), approximate="tanh")
        h = self.down(torch.sigmoid(h) * h - h.mean(-1, keepdim=True))
        y = (x + h) * self.scale
        scores = torch.softmax(y @ y.transpose(-1, -2) / 4.0, dim=-1)
        return {"y": torch.tanh(torch.sqrt(torch.exp(y))), "scores": scores.sum(1)}


class Mixer(torch.nn.Module):
    """Embedding, int->float casts, matmul variants, layout ops, sdpa without a mask; returns a tuple."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 12) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(12) * 0.1)
        self.offset = torch.tensor([0.5, -0.25])  # a lifted tensor constant

    def forward(self, ids, x):
        e = self.emb(ids)  # [2, 6, 8]
        h = torch.addmm(self.b, e.reshape(-1, 8), self.w).view(2, 6, 12)
        h = torch.relu(h) - torch.nn.functional.silu(-h) + ids.to(torch.float32).unsqueeze(-1) / 10
        q = h.view(2, 6, 3, 4).permute(0, 2, 1, 3)  # [2, 3, 6, 4]
        kv = torch.bmm(x, x.transpose(1, 2)).unsqueeze(1).expand(2, 3, 4, 4)  # [2, 3, 4, 4]
        att = torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
        pooled = torch.amax(att, dim=2) + torch.mm(x[:1].squeeze(0), x[1].t()).sum()  # [2, 3, 4]
        tail = torch.cat([att.select(2, -1)[:, :, 1:3] * self.offset, pooled[:, :, :2]], dim=-1)  # [2, 3, 4]
        return pooled, torch.maximum(tail, torch.rsqrt(h.pow(2).sum(-1, keepdim=True))[:, :3])


def test_block_matches_torch_and_names_weights_by_state_dict():
    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(2, 5, 16)
    ir = from_module(block, (x,))
    _assert_matches(ir, {"x": x}, block(x))
    assert [p.name for p in ir.functions["forward"].params] == ["x"]
    assert sorted(ir.weights.names()) == sorted(block.state_dict())
    np.testing.assert_array_equal(ir.weights.get("up.weight"), block.up.weight.detach().numpy())
    sources = {n.source for n in ir.functions["forward"].nodes}
    assert {"ln", "up", "down"} <= sources
    _roundtrips(ir)


def test_mixer_matches_torch_with_int_ids_and_tuple_outputs():
    torch.manual_seed(1)
    mixer = Mixer().eval()
    ids, x = torch.randint(0, 20, (2, 6)), torch.randn(2, 4, 4)
    ir = from_module(mixer, (ids, x))
    forward = ir.functions["forward"]
    assert [(p.name, str(p.type)) for p in forward.params] == [("ids", "i32[2, 6]"), ("x", "f32[2, 4, 4]")]
    pooled, tail = mixer(ids, x)
    _assert_matches(ir, {"ids": ids, "x": x}, {"out.0": pooled, "out.1": tail})
    assert "const.offset" in ir.weights
    assert [n.attr["causal"] for n in forward.nodes if n.op == "attention"] == [False]
    _roundtrips(ir)


class CausalSeq(torch.nn.Module):
    """Ids and positions of a dynamic length through embedding, causal sdpa, concat and slice."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids, pos):
        h = self.emb(ids) + pos.float().unsqueeze(-1)
        q = self.proj(h).view(1, h.shape[1], 2, 4).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return torch.cat([out.transpose(1, 2).reshape(1, -1, 8), h[:, :1]], dim=1)


def test_dynamic_sequence_becomes_a_symbolic_dim():
    torch.manual_seed(2)
    module, seq = CausalSeq().eval(), Dim("seq", min=2, max=32)
    ir = from_module(module, (torch.randint(0, 10, (1, 5)), torch.arange(5)),
                     dynamic_shapes={"ids": {1: seq}, "pos": {0: seq}})
    forward = ir.functions["forward"]
    assert [str(p.type) for p in forward.params] == ["i32[1, seq]", "i32[seq]"]
    assert str(forward.types()[forward.outputs[0][1]]) == "f32[1, seq + 1, 8]"
    for length in (3, 9):
        ids, pos = torch.randint(0, 10, (1, length)), torch.arange(length)
        _assert_matches(ir, {"ids": ids, "pos": pos}, {"out": module(ids, pos)})
    _roundtrips(ir)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_compute_in_f32(dtype):
    torch.manual_seed(3)
    block, x = Block().to(dtype).eval(), torch.randn(2, 5, 16, dtype=dtype)
    ir = from_module(block, (x,))
    assert {ir.weights.type(name).dtype for name in ir.weights.names()} == {"f32"}
    reference = Block().eval()
    reference.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    _assert_matches(ir, {"x": x.float()}, reference(x.float()))
