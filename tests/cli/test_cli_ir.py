"""`llmopt ir`: the printed IR parses back to the optimized module; --dump-dir writes every pass."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llmopt.cli import cli
from llmopt.compiler import BuildOptions, load, optimize
from llmopt.ir.parser import parse_module
from llmopt.ir.printer import print_module

from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    save_tiny("qwen2", folder)
    return folder


def test_ir_prints_the_optimized_module(tiny_folder):
    result = CliRunner().invoke(cli, ["ir", str(tiny_folder), "--pipeline", "default"])
    assert result.exit_code == 0, result.output
    expected = optimize(load(tiny_folder), BuildOptions())
    assert result.output == print_module(expected)
    assert parse_module(result.output, expected.weights) == expected


def test_ir_dump_dir_has_one_file_per_pass(tiny_folder, tmp_path):
    result = CliRunner().invoke(cli, ["ir", str(tiny_folder), "--dump-dir", str(tmp_path), "--verify",
                                      "-o", str(tmp_path / "final.ir")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.ir"))
    assert names == ["000_input.ir", "001_fuse-linears.ir", "002_fold-constants.ir", "003_cse.ir", "004_dce.ir",
                     "final.ir"]
    assert (tmp_path / "004_dce.ir").read_text() == (tmp_path / "final.ir").read_text()
    assert (tmp_path / "000_input.ir").read_text() == print_module(load(tiny_folder))


def test_disabled_pass_is_skipped(tiny_folder, tmp_path):
    result = CliRunner().invoke(cli, ["ir", str(tiny_folder), "--disable-pass", "fuse-linears",
                                      "--dump-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "fuse-linears" not in result.output
    assert not list(tmp_path.glob("*fuse-linears*"))
