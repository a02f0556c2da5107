"""torch.export frontend refusals: each names the op or input, the submodule, and what to do."""

import pytest
import torch

from llmopt.errors import ModelInputError
from llmopt.frontend.torch_export import from_module


class RunningTotal(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ModuleDict({"mlp": RunningTotal()})])

    def forward(self, x):
        return self.layers[1]["mlp"](self.layers[0](x))


class Sorter(torch.nn.Module):
    def forward(self, x):
        return torch.sort(x).values


class PaddedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tensor([[True, True, False], [True, True, False], [True, True, False]]))

    def forward(self, q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=self.mask)


def test_unknown_op_names_op_and_module_path():
    with pytest.raises(ModelInputError) as caught:
        from_module(Stack(), (torch.randn(2, 4),))
    message = str(caught.value)
    assert "aten.cumsum.default" in message
    assert "module 'layers.1.mlp' (RunningTotal)" in message
    assert "ATEN_TO_IR" in caught.value.hint and "linear.default" in caught.value.hint


def test_unknown_op_at_top_level():
    with pytest.raises(ModelInputError, match=r"aten\.sort\.default.*top-level module \(Sorter\)"):
        from_module(Sorter(), (torch.randn(2, 4),))


def test_bool_input_is_refused():
    with pytest.raises(ModelInputError, match=r"input %x is torch\.bool"):
        from_module(Sorter(), (torch.randn(2, 4) > 0,))


def test_padding_mask_is_refused():
    with pytest.raises(ModelInputError, match="neither causal nor all-true"):
        from_module(PaddedAttention(), (torch.randn(1, 2, 3, 4),))


def test_untraceable_module_is_a_model_input_error():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ModelInputError, match="torch.export could not trace"):
        from_module(Branchy(), (torch.randn(3),))
