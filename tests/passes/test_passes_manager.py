"""PassManager: pipelines from specs, DumpIR files, Verify naming a broken pass, disabling, timing."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmopt.errors import LLMOptError
from llmopt.ir import Module, parse_module, print_module
from llmopt.passes import (DISABLE_ENV, PASSES, CommonSubexpressionElimination, DeadCodeElimination, DumpIR,
                           FoldConstants, FuseLinears, Pass, PassManager, PassResult, PassVerifyError, Timing,
                           Verify, build_pipeline, map_functions, rebuild)
from passes_golden import ir, random_store

TEXT = ir("""
func @f(%x: f32[1, 4]) {
  %wa = weight @l.a.weight : f32[2, 4]
  %a = linear(%x, %wa) : f32[1, 2]  # from=l.a
  %wb = weight @l.b.weight : f32[2, 4]
  %b = linear(%x, %wb) : f32[1, 2]  # from=l.b
  %dead = exp(%a) : f32[1, 2]
  %y = add(%a, %b) : f32[1, 2]
  return y=%y
}
""")


def module() -> Module:
    return parse_module(TEXT, random_store(l__a__weight=(2, 4), l__b__weight=(2, 4)))


@dataclass(frozen=True)
class WrongType(Pass):
    """Test-only: rebuilds every add with a wrong result type."""

    name = "wrong-type"

    def apply(self, module):
        def replace(node, b, rename):
            if node.op == "add":
                return b.add("add", *(rename[i] for i in node.inputs), type=node.type.with_shape((7,)))
            return None
        return map_functions(module, lambda f: (rebuild(f, replace, self.name), Counter()))


@dataclass(frozen=True)
class InPlace(Pass):
    """Test-only: edits its input instead of building a new module."""

    name = "in-place"

    def apply(self, module):
        module.functions["f"].nodes.pop(-2)
        return PassResult(module)


def test_build_pipeline_parses_names_options_and_named_pipelines():
    passes = build_pipeline("dce, cse,fold-constants,fuse-linears{min_group=3}")
    assert passes == [DeadCodeElimination(), CommonSubexpressionElimination(), FoldConstants(), FuseLinears(3)]
    assert [p.name for p in build_pipeline("default")] == ["fuse-linears", "fold-constants", "cse", "dce"]
    assert build_pipeline("none") == [] and build_pipeline("") == []
    names = [p.name for p in build_pipeline(["cse", "default"])]
    assert names == ["cse", "fuse-linears", "fold-constants", "cse", "dce"]


@pytest.mark.parametrize("spec, message", [
    ("dce,fuse", "unknown pass 'fuse'.*Known passes: .*cse, dce, fold-constants, fuse-linears"),
    ("fuse-linears{groups=3}", "bad option 'groups=3'.*min_group"),
    ("fuse-linears{min_group=many}", "'many' is not a valid int"),
    ("fuse-linears{min_group=3", "not closed"),
])
def test_build_pipeline_errors_say_what_to_do(spec, message):
    with pytest.raises(LLMOptError, match=f"(?s){message}"):
        build_pipeline(spec)


def test_dump_ir_writes_one_file_per_stage_and_an_index(tmp_path):
    (tmp_path / "007_stale.ir").write_text("old")
    (tmp_path / "notes.txt").write_text("keep me")
    stages = []

    class Recorder(DumpIR):  # also remember each stage's module, to compare with the files
        def start(self, module):
            stages.append(module)
            super().start(module)

        def after_pass(self, index, pass_, module, stats):
            stages.append(module)
            super().after_pass(index, pass_, module, stats)

    result = PassManager(build_pipeline("default"), [Recorder(tmp_path)]).run(module())
    files = ["000_input.ir", "001_fuse-linears.ir", "002_fold-constants.ir", "003_cse.ir", "004_dce.ir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + ["index.txt", "notes.txt"])
    assert (tmp_path / "index.txt").read_text().splitlines() == [
        "000_input.ir",
        "001_fuse-linears.ir groups=1 linears_fused=2",
        "002_fold-constants.ir folded=1 weights_added=1",
        "003_cse.ir merged=0",
        "004_dce.ir removed=3",
    ]
    assert (tmp_path / files[0]).read_text() == TEXT
    assert stages[-1] is result
    for file, stage in zip(files, stages):
        text = (tmp_path / file).read_text()
        assert text == print_module(stage)
        assert parse_module(text, stage.weights) == stage
    assert "weight @l.a+b.weight" in (tmp_path / files[-1]).read_text()


def test_verify_names_the_pass_that_broke_the_ir():
    manager = PassManager([DeadCodeElimination(), WrongType(), CommonSubexpressionElimination()], [Verify()])
    message = r"(?s)pass #2 'wrong-type' \(WrongType\) produced invalid IR.*add \(by wrong-type\): type f32\[7\]"
    with pytest.raises(PassVerifyError, match=message):
        manager.run(module())
    assert [name for name, _ in manager.stats] == ["dce", "wrong-type"]


def test_verify_catches_a_pass_editing_its_input():
    with pytest.raises(PassVerifyError, match="(?s)pass #1 'in-place'.*modified its input"):
        PassManager([InPlace()], [Verify()]).run(module())


def test_verify_rejects_invalid_input():
    broken = module()
    broken.functions["f"].outputs = [("y", "nowhere")]
    with pytest.raises(PassVerifyError, match="input is invalid"):
        PassManager([DeadCodeElimination()], [Verify()]).run(broken)


def test_disabled_passes_are_skipped(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    manager = PassManager(build_pipeline("default"), disabled={"fuse-linears", "fold-constants"})
    result = manager.run(module())
    assert [name for name, _ in manager.stats] == ["cse", "dce"]
    assert manager.skipped == ["fuse-linears", "fold-constants"]
    assert sum(n.op == "linear" for n in result.functions["f"].nodes) == 2

    monkeypatch.setenv(DISABLE_ENV, "dce, cse")
    manager = PassManager(build_pipeline("default"))
    manager.run(module())
    assert [name for name, _ in manager.stats] == ["fuse-linears", "fold-constants"]


def test_unknown_disabled_names_list_known_passes(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    with pytest.raises(LLMOptError, match="(?s)--disable-pass names unknown pass.*: cdse.*Known passes: .*cse, dce"):
        PassManager(build_pipeline("default"), disabled=["cdse"])
    PassManager([WrongType()], disabled=["wrong-type"])  # passes in the pipeline count as known
    monkeypatch.setenv(DISABLE_ENV, "nope")
    with pytest.raises(LLMOptError, match=f"(?s){DISABLE_ENV} names unknown pass.*: nope.*Known passes"):
        PassManager(build_pipeline("default"))


def test_timing_records_each_pass_run():
    timing = Timing()
    PassManager(build_pipeline("dce,cse,dce"), [timing]).run(module())
    assert [name for name, _ in timing.records] == ["dce", "cse", "dce"]
    assert all(seconds >= 0 for _, seconds in timing.records)
    table = timing.table().splitlines()
    assert [line.split()[0] for line in table] == ["dce", "cse", "dce", "total"]


def test_pass_run_returns_the_module_of_apply():
    assert FuseLinears().run(module()) == FuseLinears().apply(module()).module


def test_every_registered_pass_has_a_file_docstring_and_a_test():
    here = Path(__file__).parent
    for name, cls in PASSES.items():
        assert cls.name == name
        assert cls.__doc__ and __import__(cls.__module__, fromlist=["_"]).__doc__.startswith(f"``{name}``")
        assert (here / f"test_passes_{name.replace('-', '_')}.py").is_file(), name
