"""torch.export frontend: a torch module and its input specs -> a flat list of op nodes.

The graph is torch.export's training IR, without decompositions: high-level ops
(`linear`, `conv2d`, `layer_norm`) stay whole, which is what fusion wants, and in-place
updates of buffers (a KV cache write) stay in place, which is what device state wants.
`graph_rewrites` then makes in-place math on intermediates functional and folds batch norms
into the convolutions before them.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind

from ..sim_device.program import TensorShard, TensorSpec, dtype_name, encode_arg
from .graph_rewrites import share_tied_tensors, canonical_ops, fold_batch_norms, functionalize_inplace
from .op_support import IGNORED_OPS, Category, Work, categorize, count_work

InputInfo = list[tuple[str, tuple[int, ...], str]]


@dataclass
class Node:
    target: str                 # "aten.linear.default"
    args: list                  # JSON-encoded, tensors as {"ref": name}
    kwargs: dict
    inputs: list[str]           # value names read (in argument order, without repeats)
    outputs: list[str]          # value names written ("" for unused outputs)
    category: Category
    work: Work
    mutates: list[str]          # values (or views of them) written in place
    fake_args: tuple            # the traced fake tensors, for ops priced from their arguments


@dataclass
class Graph:
    inputs: list[TensorSpec]          # user inputs
    outputs: list[str]                # value names returned, in order
    weights: list[TensorSpec]         # parameters and constants (full shapes)
    buffers: list[TensorSpec]         # module buffers: device state (full shapes)
    values: dict[str, TensorSpec]     # every tensor value, original dtypes, as one device sees it
    nodes: list[Node]
    tensors: dict[str, torch.Tensor] | None   # weights and buffers by name; None on meta
    # Weights / buffers split across tensor-parallel ranks (set by the tensor-parallel pass).
    tensor_shards: dict[str, TensorShard] = field(default_factory=dict)


def _spec(name: str, value) -> TensorSpec:
    return TensorSpec(name, tuple(int(s) for s in value.shape), dtype_name(value.dtype))


def _returns_view(op: torch._ops.OpOverload) -> bool:
    returns = op._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _written_args(fx_node) -> list:
    schema = fx_node.target._schema
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = fx_node.args[i] if i < len(fx_node.args) else fx_node.kwargs.get(arg.name)
            if value is not None:
                written.append(value)
    return written


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """torch's fake-tensor dispatch logs the full traceback of an op that fails on the given shapes
    (e.g. a matmul of 63 by 64 features) before raising it; the error is raised again below with
    the module's name, so that log only buries the one line a user needs."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_graph(module: torch.nn.Module, example_inputs: tuple, input_names: list[str] | None = None) -> Graph:
    """Trace `module`; user inputs are named `input_names` if given, else after forward's arguments."""
    # Traced in eval mode; each submodule's own mode is restored after (a wrapper created in train
    # mode must not switch the model it wraps back to training).
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with _quiet_fake_tensor_log():
            program = torch.export.export(module, example_inputs, strict=False)
    except Exception as e:  # torch.export raises many types; the user needs to know which module failed
        raise ValueError(
            f"torch.export could not trace {type(module).__name__} with the given inputs: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        for m, training in was_training.items():
            m.training = training

    signature = program.graph_signature
    state = program.state_dict
    names: dict[torch.fx.Node, str] = {}
    values: dict[str, TensorSpec] = {}
    inputs, weights, buffers = [], [], []
    tensors: dict[str, torch.Tensor] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    held: dict[torch.fx.Node, torch.Tensor] = {}  # parameters, buffers and constants by placeholder
    for fx_node, in_spec in zip(placeholders, signature.input_specs):
        if in_spec.kind != InputKind.USER_INPUT:
            # Non-persistent buffers and lifted constants are in `constants`, the rest in the state dict.
            value_tensor = program.constants.get(in_spec.target, state.get(in_spec.target))
            if in_spec.kind == InputKind.CUSTOM_OBJ or not isinstance(value_tensor, torch.Tensor):
                raise ValueError(
                    f"{type(module).__name__} holds a non-tensor constant {in_spec.target!r}; only tensors can be compiled"
                )
            held[fx_node] = value_tensor.detach()
    read_before = {n for n in placeholders if n.users}
    share_tied_tensors(module, {spec.target: n for n, spec in zip(placeholders, signature.input_specs)
                                if spec.kind != InputKind.USER_INPUT})
    canonical_ops(program.graph)
    functionalize_inplace(program.graph)
    fold_batch_norms(program.graph, held)
    for fx_node, in_spec in zip(placeholders, signature.input_specs):
        value = fx_node.meta["val"]
        if in_spec.kind == InputKind.USER_INPUT:
            name = input_names[len(inputs)] if input_names else fx_node.name
            inputs.append(_spec(name, value))
        else:
            if fx_node in read_before and not fx_node.users:
                continue  # folded away (a batch norm's statistics)
            name = in_spec.target
            tensors[name] = held[fx_node]
            (buffers if in_spec.kind == InputKind.BUFFER else weights).append(_spec(name, value))
        names[fx_node] = name
        values[name] = _spec(name, value)

    user_inputs = {s.name for s in inputs}
    if input_names is not None and len(input_names) != len(inputs):
        raise ValueError(f"input_info declares {len(input_names)} inputs, {type(module).__name__}.forward takes {len(inputs)}")
    clashes = user_inputs & {n.name for n in program.graph.nodes if n.op == "call_function"}
    if clashes:
        raise ValueError(f"input names {sorted(clashes)} clash with names of values in the traced graph; rename them")
    alias_root: dict[str, str] = {}  # view value -> the value whose memory it shares
    nodes: list[Node] = []
    getitems: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for fx_node in program.graph.nodes:
        if fx_node.op == "call_function" and fx_node.target is operator.getitem:
            getitems.setdefault(fx_node.args[0], []).append(fx_node)

    def ref_name(v):
        return names.get(v) if isinstance(v, torch.fx.Node) else None

    for fx_node in program.graph.nodes:
        if fx_node.op != "call_function" or fx_node.target is operator.getitem:
            continue
        target = str(fx_node.target)
        if target in IGNORED_OPS:
            continue
        if not isinstance(fx_node.target, torch._ops.OpOverload):
            raise ValueError(f"cannot compile a call to {target}: only aten and rbln operators are supported")
        val = fx_node.meta.get("val")
        if isinstance(val, (list, tuple)):
            outputs = [""] * len(val)
            for item in getitems.get(fx_node, []):
                index = item.args[1]
                names[item] = outputs[index] = item.name
                values[item.name] = _spec(item.name, val[index])
        elif isinstance(val, torch.Tensor):
            names[fx_node] = fx_node.name
            outputs = [fx_node.name]
            values[fx_node.name] = _spec(fx_node.name, val)
        else:
            outputs = [""]  # an op returning nothing (in-place kernel)
        args_list = list(fx_node.args)
        inputs_read = []
        for leaf in _flat_nodes(fx_node):
            if names[leaf] not in inputs_read:
                inputs_read.append(names[leaf])
        mutates = []
        for w in _written_args(fx_node):
            root = alias_root.get(names[w], names[w])
            if root in user_inputs:
                raise ValueError(f"{type(module).__name__} writes its input {root!r} in place ({target}); "
                                 "compiled programs cannot mutate inputs, clone it first")
            mutates.append(root)
        if outputs[0] and _returns_view(fx_node.target) and inputs_read:
            alias_root[outputs[0]] = alias_root.get(inputs_read[0], inputs_read[0])
        category = categorize(target)
        fake_args = torch.fx.node.map_arg(tuple(args_list), lambda n: n.meta.get("val"))
        nodes.append(Node(
            target=target,
            args=[encode_arg(a, ref_name) for a in args_list],
            kwargs={k: encode_arg(v, ref_name) for k, v in fx_node.kwargs.items()},
            inputs=inputs_read,
            outputs=outputs,
            category=category,
            work=count_work(target, category, fake_args, val),
            mutates=mutates,
            fake_args=fake_args,
        ))

    output_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = []
    for out in torch.utils._pytree.tree_leaves(output_node.args[0]):
        if not isinstance(out, torch.fx.Node):
            raise ValueError(f"{type(module).__name__} returns a non-tensor value ({out!r}); return tensors only")
        outputs.append(names[out])
    on_meta = any(t.is_meta for t in tensors.values())
    return Graph(inputs, outputs, weights, buffers, values, nodes, None if on_meta else tensors)


def _flat_nodes(fx_node) -> list:
    found = []
    torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: found.append(n))
    return found
