"""Instruments: what the PassManager runs around every pass (dumps, timing, verification).

An instrument sees the input module once (``start``), then each pass before and after it runs.
Passes know nothing about instruments: dumping and checking never live inside a pass.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TextIO

from ..errors import LLMOptError
from ..ir.graph import Module
from ..ir.printer import print_module
from ..ir.verify import VerifyError, verify_module
from .base import Pass


class Instrument:
    """Hooks around a pipeline run; each does nothing unless overridden."""

    def start(self, module: Module) -> None:
        """Called once with the pipeline's input."""

    def before_pass(self, index: int, pass_: Pass, module: Module) -> None:
        """Called before the ``index``-th pass run (1-based; disabled passes are not counted)."""

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        """Called with the pass's result and its stats."""


class DumpIR(Instrument):
    """Write the IR text before the first pass (``000_input.ir``) and after each pass
    (``001_<pass>.ir``, ...) into ``directory``, with ``index.txt`` listing the files and the
    stats of the pass that produced each. Dumps of an earlier run in the directory are removed.
    """

    _DUMP = re.compile(r"^\d{3}_.+\.ir$")

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files: list[str] = []

    def start(self, module: Module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.iterdir():
            if self._DUMP.match(old.name):
                old.unlink()
        self.files = []
        self._write(0, "input", module, {})

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        self._write(index, pass_.name, module, stats)

    def _write(self, index: int, label: str, module: Module, stats: dict[str, int]) -> None:
        file = f"{index:03d}_{label}.ir"
        (self.directory / file).write_text(print_module(module))
        self.files.append(" ".join([file] + [f"{k}={v}" for k, v in stats.items()]))
        (self.directory / "index.txt").write_text("\n".join(self.files) + "\n")


class Timing(Instrument):
    """Wall-clock seconds of each pass run, in order: ``records`` is [(pass name, seconds)]."""

    def __init__(self):
        self.records: list[tuple[str, float]] = []
        self._started = 0.0

    def start(self, module: Module) -> None:
        self.records = []

    def before_pass(self, index: int, pass_: Pass, module: Module) -> None:
        self._started = time.perf_counter()

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        self.records.append((pass_.name, time.perf_counter() - self._started))

    def table(self) -> str:
        """The records as an aligned text table with a total line."""
        width = max([len(name) for name, _ in self.records] + [len("total")])
        lines = [f"{name:<{width}}  {seconds:9.4f} s" for name, seconds in self.records]
        lines.append(f"{'total':<{width}}  {sum(s for _, s in self.records):9.4f} s")
        return "\n".join(lines)


class PassVerifyError(VerifyError):
    """A pass left invalid IR, or changed its input in place."""


def _snapshot(module: Module) -> dict:
    return {name: (f, list(f.params), list(f.nodes), list(f.outputs)) for name, f in module.functions.items()}


class Verify(Instrument):
    """Verify the input and the result of every pass (``ir.verify``); also check that no pass
    edited its input module in place. Errors name the pass that broke the IR.
    """

    def __init__(self):
        self._before: dict = {}
        self._input: Module | None = None

    def start(self, module: Module) -> None:
        try:
            verify_module(module)
        except VerifyError as err:
            raise PassVerifyError(f"the pipeline's input is invalid, before any pass ran:\n{err}") from None

    def before_pass(self, index: int, pass_: Pass, module: Module) -> None:
        self._input, self._before = module, _snapshot(module)

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        where = f"pass #{index} {pass_.name!r} ({type(pass_).__name__})"
        if _snapshot(self._input) != self._before:
            raise PassVerifyError(f"{where} modified its input module in place; passes must build new functions")
        try:
            verify_module(module)
        except VerifyError as err:
            raise PassVerifyError(f"{where} produced invalid IR:\n{err}") from None


class InterpreterCheck(Instrument):
    """Run the reference interpreter on the pipeline's input and again after every pass, on the
    same example inputs, and stop at the first pass whose outputs drift beyond ``tolerance``
    (max abs difference), naming it. Entry ``logits`` when the module has it, else its first."""

    def __init__(self, tolerance: float = 1e-4, entry: str | None = None):
        self.tolerance, self.entry = tolerance, entry
        self._inputs: dict = {}
        self._expected: dict = {}

    def start(self, module: Module) -> None:
        from ..ir.interp import run_module
        from .bisect import example_inputs
        self.entry = self.entry or ("logits" if "logits" in module.functions else next(iter(module.functions)))
        self._inputs = example_inputs(module, self.entry)
        self._expected = run_module(module, self.entry, self._inputs)

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        from ..ir.interp import run_module
        from .bisect import max_abs_diff
        drift = max_abs_diff(self._expected, run_module(module, self.entry, self._inputs))
        if not drift <= self.tolerance:
            raise PassVerifyError(f"pass #{index} {pass_.name!r} ({type(pass_).__name__}) changed the outputs of "
                                  f"@{self.entry}: max abs difference {drift:.3g} > {self.tolerance:g} "
                                  "(reference interpreter, example inputs)")


class PassLog(Instrument):
    """Print each pass's name, wall-clock time and stats as it finishes (``LLMOPT_DEBUG=1``), and with
    ``print_ir`` the IR it produced (``LLMOPT_DEBUG=2``), to ``stream`` (default: stderr)."""

    def __init__(self, print_ir: bool = False, stream: TextIO | None = None):
        self.print_ir = print_ir
        self.stream = stream
        self._started = 0.0

    def _write(self, text: str) -> None:
        (self.stream or sys.stderr).write(text)

    def start(self, module: Module) -> None:
        if self.print_ir:
            self._write(f"[llmopt] IR before the pipeline:\n{print_module(module)}")

    def before_pass(self, index: int, pass_: Pass, module: Module) -> None:
        self._started = time.perf_counter()

    def after_pass(self, index: int, pass_: Pass, module: Module, stats: dict[str, int]) -> None:
        seconds = time.perf_counter() - self._started
        counts = "".join(f" {k}={v}" for k, v in stats.items())
        self._write(f"[llmopt] pass #{index} {pass_.name}: {seconds:.4f} s{counts}\n")
        if self.print_ir:
            self._write(f"[llmopt] IR after pass #{index} {pass_.name}:\n{print_module(module)}")


DEBUG_ENV = "LLMOPT_DEBUG"


def debug_instruments(level: str | int | None = None, stream: TextIO | None = None) -> list[Instrument]:
    """The instruments for a debug level (default: ``$LLMOPT_DEBUG``; unset or 0: none).

    1: each pass's name, time and stats; 2: also the IR after each pass; 3: also ``Verify``.
    Output goes to ``stream`` (default: stderr).
    """
    level = os.environ.get(DEBUG_ENV, "0") if level is None else level
    if str(level).strip() not in ("", "0", "1", "2", "3"):
        raise LLMOptError(f"{DEBUG_ENV}={level!r} is not a debug level.",
                          "Use 1 (pass timings), 2 (also the IR after each pass) or 3 (also verify each pass).")
    level = int(str(level).strip() or 0)
    instruments: list[Instrument] = [PassLog(print_ir=level >= 2, stream=stream)] if level >= 1 else []
    return instruments + ([Verify()] if level >= 3 else [])
