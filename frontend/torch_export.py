"""Frontend: a ``torch.nn.Module`` traced with ``torch.export`` becomes an llmopt IR module.

``from_module(module, example_inputs)`` exports the module, folds what does not depend on the
inputs (torch_export_fold.py) and translates every other aten op through the one table
``ATEN_TO_IR`` (torch_export_ops.py). The result holds one function, ``forward``:

- params: the forward() tensor arguments, named like them; int tensors become i32 (llmopt uses
  int32 ids and positions throughout), float tensors f32; bool tensors are refused;
- outputs: the module's tensors, named ``out`` (one tensor), ``out.0``, ``out.1``.. (tuple or
  list) or by their keys (dict, Hugging Face ``ModelOutput``);
- weights: parameters and buffers under their state_dict names, lifted tensor constants as
  ``const.<name>``, folded values as ``folded.<fx node>``; float data is served as f32 copies;
- sizes made dynamic by ``dynamic_shapes`` become symbolic dims, named after their
  ``torch.export.Dim`` (``Dim("seq")`` -> ``seq``) or torch's symbol (``s27``) when unnamed.

The IR computes in f32 whatever float dtype the module uses. Every node's ``source`` is the
qualified name of the submodule that produced it (``model.layers.1.mlp``); an aten op without a
translation raises ModelInputError naming the op and that submodule.
"""

from __future__ import annotations

import re

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from ..errors import ModelInputError
from ..ir.graph import Builder, Module
from ..ir.types import TensorType, add_dims
from ..ir.verify import verify_module
from ..ir.weights import WeightStore
from .torch_export_fold import fold_constants
from .torch_export_ops import ATEN_TO_IR, supported_op_names


def ir_dtype(dtype: torch.dtype) -> str:
    """The IR dtype a torch dtype computes in: floats in f32, integers in i32."""
    if dtype.is_floating_point:
        return "f32"
    return "bool" if dtype == torch.bool else "i32"


def numpy_copy(tensor: torch.Tensor):
    """A numpy copy of ``tensor`` in its IR dtype (what the WeightStore serves)."""
    target = {"f32": torch.float32, "i32": torch.int32, "bool": torch.bool}[ir_dtype(tensor.dtype)]
    return tensor.detach().to("cpu", target).numpy().copy()


def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the innermost submodule that produced ``node`` ("" for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _module_words(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the top-level module"
    path, kind = list(stack.values())[-1]
    kind = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1])
    return f"module '{path}' ({kind})" if path else f"the top-level module ({kind})"


class TraceContext:
    """What a translator sees: the fx node being translated and helpers that emit its IR."""

    def __init__(self, builder: Builder, weights: WeightStore, weight_sources: dict, folded: dict,
                 symbols: dict[str, str], model: str):
        self.b = builder
        self.weights = weights
        self.weight_sources = weight_sources  # placeholder name -> (weight name, tensor)
        self.folded = folded  # fx node name -> value computed at trace time
        self.symbols = symbols  # torch symbol name -> IR symbol name
        self.model = model
        self.values: dict[str, str] = {}  # fx node name -> IR value name
        self.folded_weights: dict[str, torch.Tensor] = {}  # weight name -> folded tensor
        self.weight_values: dict[str, str] = {}  # weight name -> its IR weight node
        self.node: torch.fx.Node | None = None

    # -- reading operands --------------------------------------------------------------------

    def value(self, arg: torch.fx.Node) -> str:
        """The IR value of an fx node, emitting its weight or folded constant on first use."""
        if arg.name not in self.values:
            if arg.name in self.weight_sources:
                name, tensor = self.weight_sources[arg.name]
                self.values[arg.name] = self._weight(name, tensor)
            elif isinstance(self.folded.get(arg.name), torch.Tensor):
                tensor = self.folded[arg.name]
                self.values[arg.name] = (self.scalar(tensor.item(), ir_dtype(tensor.dtype)) if tensor.dim() == 0
                                         else self._weight(self._folded_name(arg.name, tensor), tensor))
            else:
                self.fail(f"reads %{arg.name}, which is not a tensor llmopt can compute",
                          "Return and pass only tensors between the traced operations.")
        return self.values[arg.name]

    def operand(self, arg, dtype: str) -> str:
        """An fx node or Python number as an IR value of ``dtype`` (cast or made a constant)."""
        if isinstance(arg, (bool, int, float)):
            return self.scalar(arg, dtype)
        value = self.value(arg)
        return value if self.b.types[value].dtype == dtype else self.add("cast", value, dtype=dtype)

    def concrete(self, arg) -> torch.Tensor | None:
        """The trace-time tensor of ``arg`` when it was folded, else None."""
        return self.folded.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def type_of(self, node: torch.fx.Node) -> TensorType:
        """The IR type of an fx node's tensor value, read off torch's fake tensor."""
        val = node.meta["val"]
        return TensorType(ir_dtype(val.dtype), tuple(self.dim(d) for d in val.shape))

    @property
    def out_type(self) -> TensorType:
        return self.type_of(self.node)

    def dim(self, size) -> int | str:
        """A torch size (int or SymInt) as an IR dim: sums of symbols with positive counts."""
        if isinstance(size, int):
            return size
        expr = size.node.expr
        dim: int | str = 0
        for term in sympy.Add.make_args(expr):
            count, rest = term.as_coeff_Mul()
            if rest == 1 and count.is_integer:
                dim = add_dims(dim, int(count))
            elif isinstance(rest, sympy.Symbol) and count.is_integer and count > 0:
                name = self.symbols.get(rest.name, rest.name)
                for _ in range(int(count)):
                    dim = add_dims(dim, name)
            else:
                self.fail(f"has the symbolic size {expr}, which is not a sum of symbols",
                          "Mark fewer sizes dynamic, or make the dynamic size enter only by addition.")
        return dim

    # -- emitting ------------------------------------------------------------------------------

    def add(self, op: str, *inputs: str, **attrs) -> str:
        return self.b.add(op, *inputs, **attrs)

    def scalar(self, number, dtype: str) -> str:
        value = bool(number) if dtype == "bool" else int(number) if dtype.startswith("i") else float(number)
        return self.add("constant", value=value, dtype=dtype)

    def _folded_name(self, node_name: str, tensor: torch.Tensor) -> str:
        """``folded.<node>``, or the name of an equal folded tensor already made a weight (one
        rotary table serves every layer)."""
        for name, seen in self.folded_weights.items():
            if seen.dtype == tensor.dtype and seen.shape == tensor.shape and torch.equal(seen, tensor):
                return name
        self.folded_weights[f"folded.{node_name}"] = tensor
        return f"folded.{node_name}"

    def _weight(self, name: str, tensor: torch.Tensor) -> str:
        if name not in self.weights:
            ir_type = TensorType(ir_dtype(tensor.dtype), tuple(tensor.shape))
            self.weights.add(name, ir_type, lambda: numpy_copy(tensor), origin=f"{self.model}: {name}")
            self.weight_values[name] = self.b.weight(name, ir_type)
        return self.weight_values[name]

    def fail(self, what: str, hint: str):
        node = self.node
        if node is None:
            where = "its output"
        elif node.op == "placeholder":
            where = f"input %{node.name}"
        else:
            where = f"fx node %{node.name} ({node.target}) in {_module_words(node)}"
        raise ModelInputError(f"torch module {self.model}: {where} {what}", hint)


def _dim_names(dynamic_shapes, inputs: list[torch.fx.Node]) -> dict[str, str]:
    """torch symbol name -> the name the user gave its ``torch.export.Dim``."""
    if dynamic_shapes is None:
        return {}
    specs = (dynamic_shapes if isinstance(dynamic_shapes, dict)
             else dict(zip([n.name for n in inputs], dynamic_shapes)))
    names = {}
    for node in inputs:
        spec = specs.get(node.name)
        axes = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        for axis, dim in axes:
            size, name = node.meta["val"].shape[axis], getattr(dim, "__name__", None)
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) and name:
                names[size.node.expr.name] = name
    return names


def _output_names(spec: pytree.TreeSpec) -> list[str]:
    """``out`` / ``out.0``.. / dict keys for each leaf of the module's output structure."""
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not path or isinstance(path[0], pytree.SequenceKey):
            parts.insert(0, "out")
        names.append(re.sub(r"[^\w.\-]", "_", ".".join(parts)))
    return names


def _export(module: torch.nn.Module, example_inputs: tuple, dynamic_shapes, model: str):
    try:
        program = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as err:  # torch raises many types here; its first lines say what failed
        first = " ".join(str(err).strip().splitlines()[:3]) or type(err).__name__
        raise ModelInputError(f"torch module {model}: torch.export could not trace it: {first}",
                              "Make forward() traceable by torch.export (no data-dependent Python control "
                              "flow, tensors in and out); see the torch.export documentation.") from err
    # An empty decomposition table keeps high-level ops (linear, sdpa) but inlines grad-mode
    # wrappers and turns in-place ops functional.
    return program.run_decompositions({})


def _weight_sources(program) -> tuple[dict, dict]:
    """(placeholder -> (weight name, tensor), placeholder -> tensor of what may be folded)."""
    weights, foldable = {}, {}
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = program.state_dict.get(spec.target, program.constants.get(spec.target))
            weights[spec.arg.name] = (spec.target, tensor)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            weights[spec.arg.name] = (f"const.{spec.target}", program.constants[spec.target])
        if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            foldable[spec.arg.name] = weights[spec.arg.name][1]
    return weights, foldable


def _computes_sizes(node: torch.fx.Node) -> bool:
    """True for nodes that only compute sizes (``sym_size``, SymInt arithmetic): they have no IR value."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat))


def _translate(ctx: TraceContext, node: torch.fx.Node) -> None:
    ctx.node = node
    translator = ATEN_TO_IR.get(node.target)
    if translator is None:
        ctx.fail("uses an aten op llmopt cannot translate",
                 f"Rewrite that module without {node.target} (or compute it outside the traced forward), "
                 f"or add a translator to ATEN_TO_IR in llmopt/frontend/torch_export_ops.py. "
                 f"Translated aten ops: {', '.join(supported_op_names())}.")
    schema = node.target._schema.arguments
    args = {a.name: a.default_value for a in schema if a.has_default_value()}
    args.update({a.name: value for a, value in zip(schema, node.args)})
    args.update(node.kwargs)
    with ctx.b.at(source=module_path(node)):
        result = translator(ctx, args)
    if result is not None:
        expected, got = ctx.out_type, ctx.b.types[result]
        if got != expected:
            raise AssertionError(f"torch_export: %{node.name} = {node.target} became {got}, torch says {expected}")
        ctx.values[node.name] = result


def from_module(module: torch.nn.Module, example_inputs: tuple, *, dynamic_shapes=None,
                name: str = "forward") -> Module:
    """Trace ``module`` on ``example_inputs`` with torch.export; return its IR (one function ``name``)."""
    model = type(module).__name__
    program = _export(module, example_inputs, dynamic_shapes, model)
    graph = program.graph_module.graph
    weight_sources, foldable = _weight_sources(program)
    user_inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    ctx = TraceContext(Builder(name), WeightStore(), weight_sources, fold_constants(graph, foldable),
                       _dim_names(dynamic_shapes, user_inputs), model)
    for node in user_inputs:
        ctx.node = node
        val = node.meta["val"]
        if not isinstance(val, torch.Tensor) or val.dtype == torch.bool:
            ctx.fail(f"is {getattr(val, 'dtype', type(val).__name__)}; llmopt takes int and float tensors",
                     "Pass masks as float tensors or build them inside forward().")
        ctx.values[node.name] = ctx.b.param(node.name, ctx.type_of(node))
    for node in graph.nodes:
        if node.op == "call_function" and node.name not in ctx.folded and not _computes_sizes(node):
            _translate(ctx, node)
        elif node.op == "output":
            ctx.node = None
            for out_name, arg in zip(_output_names(program.call_spec.out_spec), node.args[0]):
                ctx.b.output(out_name, ctx.value(arg))
    ir = Module({name: ctx.b.finish()}, ctx.weights,
                {"source": {"kind": "torch-export", "module": f"{type(module).__module__}.{model}"}})
    verify_module(ir)
    return ir

