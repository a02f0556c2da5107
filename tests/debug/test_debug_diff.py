"""ir diff: the exact diff fuse-linears makes on a known graph; identical modules; the CLI."""

from __future__ import annotations

import textwrap

from click.testing import CliRunner

from llmopt.cli import cli
from llmopt.ir import parse_module, print_module
from llmopt.ir.diff import diff_modules
from llmopt.ir.printer import HEADER
from llmopt.passes import FuseLinears, build_pipeline

BEFORE = HEADER + "\n" + textwrap.dedent("""
    func @f(%x: f32[1, seq, 4]) {
      %n = weight @l.norm.weight : f32[4]
      %h = rms_norm(%x, %n) {eps=1e-05} : f32[1, seq, 4]  # from=l.norm
      %wq = weight @l.attn.q.weight : f32[4, 4]
      %q = linear(%h, %wq) : f32[1, seq, 4]  # from=l.attn.q
      %wk = weight @l.attn.k.weight : f32[2, 4]
      %k = linear(%h, %wk) : f32[1, seq, 2]  # from=l.attn.k
      %s = slice(%q) {axis=-1, end=2, start=0} : f32[1, seq, 2]  # from=l.attn
      %y = add(%s, %k) : f32[1, seq, 2]  # from=l.attn
      return y=%y
    }
    """)

EXPECTED_FUSE = """\
@f: 4 same, 2 rewritten, 2 removed, 4 added
  - %q = linear(%h, %wq) : f32[1, seq, 4]  # from=l.attn.q
  + %4 = concat(%2, %3) {axis=0} : f32[6, 4]  # from=l.attn by=fuse-linears
  + %5 = linear(%1, %4) : f32[1, seq, 6]  # from=l.attn by=fuse-linears
  + %6 = slice(%5) {axis=-1, end=4, start=0} : f32[1, seq, 4]  # from=l.attn.q by=fuse-linears
  + %7 = slice(%5) {axis=-1, end=6, start=4} : f32[1, seq, 2]  # from=l.attn.k by=fuse-linears
  - %k = linear(%h, %wk) : f32[1, seq, 2]  # from=l.attn.k
  ~ %s = slice(%q) {axis=-1, end=2, start=0} : f32[1, seq, 2]  # from=l.attn
  > %8 = slice(%6) {axis=-1, end=2, start=0} : f32[1, seq, 2]  # from=l.attn
      input 0: %q (linear) -> %6 (slice)
  ~ %y = add(%s, %k) : f32[1, seq, 2]  # from=l.attn
  > %9 = add(%8, %7) : f32[1, seq, 2]  # from=l.attn
      input 1: %k (linear) -> %7 (slice)
"""

EXPECTED_FOLD = """\
@f: 6 same, 1 rewritten, 3 removed, 1 added
  + %2 = weight @l.attn.q+k.weight : f32[6, 4]  # from=l.attn by=fold-constants
  - %2 = weight @l.attn.q.weight : f32[4, 4]
  - %3 = weight @l.attn.k.weight : f32[2, 4]
  - %4 = concat(%2, %3) {axis=0} : f32[6, 4]  # from=l.attn by=fuse-linears
  ~ %5 = linear(%1, %4) : f32[1, seq, 6]  # from=l.attn by=fuse-linears
  > %3 = linear(%1, %2) : f32[1, seq, 6]  # from=l.attn by=fuse-linears
      input 1: %4 (concat) -> %2 (weight)
weights:
  - @l.attn.q.weight : f32[4, 4]
  - @l.attn.k.weight : f32[2, 4]
  + @l.attn.q+k.weight : f32[6, 4]
"""


def test_fuse_linears_diff_is_exact():
    before = parse_module(BEFORE)
    after = FuseLinears().run(before)
    assert diff_modules(before, after).render() == EXPECTED_FUSE


def test_fold_and_dce_diff_lists_weights():
    fused = FuseLinears().run(parse_module(BEFORE))
    folded = fused
    for pass_ in build_pipeline("fold-constants,dce"):
        folded = pass_.run(folded)
    assert diff_modules(fused, folded).render() == EXPECTED_FOLD


def test_renumbered_module_is_unchanged():
    before = parse_module(BEFORE)
    renumbered = build_pipeline("cse")[0].run(before)  # rebuilds with names 0, 1, 2, ...
    assert print_module(renumbered) != print_module(before)
    diff = diff_modules(before, renumbered)
    assert diff.empty
    assert diff.render() == "@f: 8 same, 0 rewritten, 0 removed, 0 added\nno changes\n"


def test_cli_ir_diff(tmp_path):
    before = parse_module(BEFORE)
    (tmp_path / "a.ir").write_text(BEFORE)
    (tmp_path / "b.ir").write_text(print_module(FuseLinears().run(before)))
    result = CliRunner().invoke(cli, ["ir", "diff", str(tmp_path / "a.ir"), str(tmp_path / "b.ir")])
    assert result.exit_code == 0, result.output
    assert result.output == EXPECTED_FUSE


def test_cli_ir_diff_rejects_non_ir(tmp_path):
    (tmp_path / "a.ir").write_text("hello\n")
    result = CliRunner().invoke(cli, ["ir", "diff", str(tmp_path / "a.ir"), str(tmp_path / "a.ir")])
    assert result.exit_code != 0
    assert "is not llmopt IR text" in str(result.exception)


def test_dtype_shape_param_output_and_weight_changes():
    a = parse_module(HEADER + textwrap.dedent("""
        func @f(%x: f32[2, 4], %m: f32[4]) {
          %w = weight @w : f32[4, 4]
          %y = linear(%x, %w) : f32[2, 4]  # from=l
          %z = add(%y, %m) : f32[2, 4]  # from=l
          return y=%y, z=%z
        }
        """))
    b = parse_module(HEADER + textwrap.dedent("""
        func @f(%x: f32[2, 4]) {
          %0 = weight @w : f16[4, 8]
          %1 = linear(%x, %0) : f16[2, 8]  # from=l
          return y=%1
        }
        """))
    assert diff_modules(a, b).render() == textwrap.dedent("""\
        @f: 0 same, 2 rewritten, 1 removed, 0 added
          params - %m: f32[4]
          return - z=%z
          ~ %w = weight @w : f32[4, 4]
          > %0 = weight @w : f16[4, 8]
              dtype f32 -> f16
              shape [4, 4] -> [4, 8]
          ~ %y = linear(%x, %w) : f32[2, 4]  # from=l
          > %1 = linear(%x, %0) : f16[2, 8]  # from=l
              dtype f32 -> f16
              shape [2, 4] -> [2, 8]
          - %z = add(%y, %m) : f32[2, 4]  # from=l
        weights:
          ~ @w : f32[4, 4] -> f16[4, 8]
        """)
