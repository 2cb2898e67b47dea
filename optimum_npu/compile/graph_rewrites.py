"""Rewrites of the exported graph, before the compiler reads its ops.

- `canonical_ops`: Python-operator spellings (`aten.__and__`, from `mask_a & mask_b`) become
  the aten op they stand for (`aten.bitwise_and`), which the device runs.
- `functionalize_inplace`: in-place math on intermediate values (`x += residual`, `relu_`,
  `dropout_`), which torch.export's training IR keeps, becomes its functional form; later
  readers of the value read the result. In-place writes to buffers (device state such as a
  KV cache) and to values read elsewhere through a view are left alone.
- `fold_batch_norms`: an inference batch norm right after a convolution is folded into the
  convolution's weight and bias (w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps)
  + beta), so a conv + BN + activation block is one fused kernel, as vendor compilers do.

- `share_tied_tensors`: a tensor the module holds under two names (tied input embedding and
  LM head) is exported as two placeholders; every reader is pointed at the first, so the device
  stores it once, as the checkpoint does.

The rewrites change the fx graph in place and, for folding, the tensors of the parameter
placeholders (`tensors`, a placeholder -> tensor dict; the module's own parameters are never
modified). A placeholder left without readers is dropped by the frontend.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten

# Python-operator overloads -> the aten op of the same semantics.
DUNDER_OPS = {
    "__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor",
    "__lshift__": "bitwise_left_shift", "__rshift__": "bitwise_right_shift",
}

CONVOLUTIONS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def _aten_name(node: Node) -> tuple[str, str] | None:
    """('add_', 'Tensor') for a call of aten.add_.Tensor, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.namespace != "aten":
        return None
    return node.target._schema.name.split("::")[1], node.target._overloadname


def _returns_view(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def canonical_ops(graph: Graph) -> None:
    for node in graph.nodes:
        name = _aten_name(node)
        if name and name[0] in DUNDER_OPS:
            packet = getattr(aten, DUNDER_OPS[name[0]])
            if name[1] in packet.overloads():
                node.target = getattr(packet, name[1])


def functionalize_inplace(graph: Graph) -> None:
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        name = _aten_name(node)
        if not name or not name[0].endswith("_") or name[0].startswith("_"):
            continue
        functional = getattr(aten, name[0][:-1], None)
        written = node.args[0] if node.args else None
        if functional is None or name[1] not in functional.overloads() or not isinstance(written, Node):
            continue
        # `written` may be a view: the write then reaches its bases too. Functional only if no base
        # is device state (a placeholder: a KV cache) and none is read after the write.
        chain = [written]
        while _returns_view(chain[-1]) and isinstance(chain[-1].args[0], Node):
            chain.append(chain[-1].args[0])
        if chain[-1].op == "placeholder":
            continue
        if any(order[user] > order[node] for base in chain[1:] for user in base.users):
            continue
        if any(_returns_view(user) and order[user] < order[node] for user in written.users):
            continue  # a view taken before the write would see it
        node.target = getattr(functional, name[1])
        for user in list(written.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, node)


def fold_batch_norms(graph: Graph, tensors: dict[Node, torch.Tensor]) -> int:
    """Fold each inference batch norm that follows a convolution into it; returns how many."""
    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
            continue
        conv, weight, bias, mean, var, training, _momentum, eps = bn.args[:8]
        params = (weight, bias, mean, var)
        if training or not all(isinstance(p, Node) and p in tensors for p in params):
            continue
        if not (isinstance(conv, Node) and conv.target in CONVOLUTIONS and len(conv.users) == 1):
            continue
        conv_args = list(conv.args) + [None] * (3 - len(conv.args))
        conv_weight, conv_bias = conv_args[1], conv_args[2]
        own = [conv_weight, bias] + ([conv_bias] if conv_bias is not None else [])
        if not all(isinstance(p, Node) and p in tensors and len(p.users) == 1 for p in own):
            continue  # shared parameters cannot take the folded values
        w = tensors[conv_weight]
        scale = tensors[weight].float() / torch.sqrt(tensors[var].float() + eps)
        shift = tensors[bias].float() - tensors[mean].float() * scale
        if conv_bias is not None:
            shift = shift + tensors[conv_bias].float() * scale
        tensors[conv_weight] = (w.float() * scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype)
        tensors[bias] = shift.to(tensors[bias].dtype)
        conv_args[2] = bias  # the batch norm's bias placeholder now holds the folded conv bias
        conv.args = tuple(conv_args)
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        folded += 1
    return folded


def share_tied_tensors(module: torch.nn.Module, placeholders: dict[str, Node]) -> None:
    """Point readers of a tied parameter / buffer's second placeholder at the first one's.

    `placeholders`: the state placeholders by the module attribute path they stand for.
    """
    first_name: dict[int, str] = {}
    held = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in held:
        first = first_name.setdefault(id(tensor), name)
        if first != name and first in placeholders and name in placeholders:
            placeholders[name].replace_all_uses_with(placeholders[first])
