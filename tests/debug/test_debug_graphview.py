"""The HTML graph draws one box per IR node (whole function and a block's subset), and the CLI writes it."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from llmopt.cli import cli
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.graphview import render_html, write_graph


def drawn_nodes(html: str) -> list[str]:
    return re.findall(r'<g class="node" data-name="([^"]+)">', html)


def test_whole_function_has_one_box_per_node(tiny_llama, tmp_path):
    func = load_hf_folder(tiny_llama).functions["prefill"]
    assert write_graph(func, tmp_path / "g.html") == len(func.nodes)
    html = (tmp_path / "g.html").read_text()
    assert drawn_nodes(html) == [n.name for n in func.nodes]
    assert 'class="stub"' not in html  # everything a node reads is drawn
    assert html.count('class="param"') == len(func.params)
    assert html.count('class="edge"') == sum(len(n.inputs) for n in func.nodes)


def test_block_subset(tiny_llama):
    func = load_hf_folder(tiny_llama).functions["prefill"]
    def from_block(node, block):
        origin = node.attr["name"] if node.op == "weight" else node.source
        return origin.split(".")[:len(block.split("."))] == block.split(".")
    block = [n.name for n in func.nodes if from_block(n, "model.layers.0")]
    html = render_html(func, "model.layers.0")
    assert drawn_nodes(html) == block and 0 < len(block) < len(func.nodes)
    assert html.count('class="stub"') == 1  # the residual stream entering the block
    mlp = [n.name for n in func.nodes if from_block(n, "model.layers.0.mlp")]
    assert drawn_nodes(render_html(func, "model.layers.0.mlp")) == mlp
    assert {func.node_map()[n].op for n in mlp} >= {"weight", "linear"}


def test_cli_graph(tiny_llama, tmp_path):
    out = tmp_path / "block.html"
    result = CliRunner().invoke(cli, ["ir", str(tiny_llama), "--graph", str(out), "--graph-filter", "model.layers.1"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert f"wrote {out} ({len(drawn_nodes(html))} nodes of @prefill)" in result.output
    assert "by=fuse-linears" in html  # the default pipeline ran first
    result = CliRunner().invoke(cli, ["ir", str(tiny_llama), "--graph", str(out), "--graph-filter", "nope"])
    assert result.exit_code != 0 and "selects no node" in str(result.exception)
