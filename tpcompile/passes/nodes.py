"""Helpers on fx nodes that several passes share."""
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default
TO = (aten.to.dtype, aten._to_copy.default)


def computed_once(gm: GraphModule, node: Node) -> Node:
    """A node after `node` that Inductor realizes as one contiguous buffer (prims.inductor_force_stride_order:
    Inductor's own "this layout", a copy made once that every reader of the new node shares; in eager, one small
    copy). `node`'s readers are left as they are."""
    import torch._inductor.inductor_prims  # noqa: F401  registers prims.inductor_force_stride_order
    val = tensor_val(node)
    stride = list(torch.empty(val.shape, device="meta").stride())
    with gm.graph.inserting_after(node):
        once = gm.graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (node, stride))
    once.meta = {**node.meta, "val": val.new_empty_strided(val.shape, stride)}
    return once


def tensor_val(node) -> torch.Tensor | None:
    """The tensor a node's meta holds (its fake value), or None."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


@dataclass
class Norm:
    end: Node                                        # the node whose value is the normed activations
    chain: list[Node] = field(default_factory=list)  # nodes the op replaces, end included, consumers first
    weight: Node | None = None
    eps: float | None = None
    upcast: bool = False
    head: Node | None = None                         # transformers' to(s, float32), kept if used elsewhere


def rms_norm_of(node: Node, s: Node) -> Norm | None:
    """The RMSNorm over the last dim of s that `node`, a user of s, starts: aten.rms_norm, or transformers' RMSNorm
    written out (h = to(s, float32); mul(w, to(mul(h, rsqrt(add(mean(pow(h, 2), [-1], True), eps))), s.dtype)),
    either `to` missing where it changes nothing; upcast=True); None if it starts none."""
    if not node.args or node.args[0] is not s or node.kwargs.keys() - {"dtype"}:
        return None
    if node.target == aten.rms_norm.default:
        shape, weight, eps = (list(node.args[1:]) + [None, None])[:3]
        if list(shape) != [tensor_val(s).shape[-1]] or not _fits(weight, s):
            return None
        return Norm(node, [node], weight, eps)
    head = node if node.target in TO and _dtype_of(node) == torch.float32 else None
    h = node if head is not None else s
    if head is None and (node.target != aten.pow.Tensor_Scalar or tensor_val(s).dtype != torch.float32):
        return None
    pow_ = next((u for u in h.users if u.target == aten.pow.Tensor_Scalar and u.args == (h, 2)), None)
    mean = _only_user(pow_, aten.mean.dim)
    if mean is None or list(mean.args[1]) not in ([-1], [tensor_val(h).dim() - 1]) or mean.args[2:] != (True,):
        return None
    plus = _only_user(mean, aten.add.Tensor)
    rsqrt = _only_user(plus, aten.rsqrt.default)
    mul = _only_user(rsqrt, aten.mul.Tensor)
    if plus is None or not isinstance(plus.args[1], float) or mul is None or set(mul.args) != {h, rsqrt}:
        return None
    cast = _only_user(mul, TO)
    if cast is not None and _dtype_of(cast) != tensor_val(s).dtype:
        return None
    scaled = cast if cast is not None else mul
    if cast is None and tensor_val(s).dtype != torch.float32:
        return None
    end = _only_user(scaled, aten.mul.Tensor)
    if end is None or len(end.args) != 2:
        return None
    weight = end.args[1] if end.args[0] is scaled else end.args[0]
    if not _fits(weight, s) or weight is None:
        return None
    chain = [end] + ([cast] if cast is not None else []) + [mul, rsqrt, plus, mean, pow_]
    return Norm(end, chain, weight, plus.args[1], upcast=True, head=head)


def _fits(weight, s: Node) -> bool:
    """weight is None or a (D,) tensor for rows of D elements."""
    return weight is None or (isinstance(weight, Node) and tensor_val(weight) is not None
                              and tuple(tensor_val(weight).shape) == (tensor_val(s).shape[-1],))


def _only_user(node: Node | None, targets) -> Node | None:
    targets = targets if isinstance(targets, tuple) else (targets,)
    users = users_of(node) if node is not None else []
    return users[0] if len(users) == 1 and users[0].target in targets else None


def eliminate_dead_code(gm: GraphModule) -> None:
    """The graph's dead code gone, with export's metadata checks of values nothing else reads (torch.fx keeps those
    as side effects, and with them what they check)."""
    while True:
        gm.graph.eliminate_dead_code()
        idle = [n for n in gm.graph.nodes if n.target == ASSERT and isinstance(n.args[0], Node)
                and n.args[0].op == "call_function" and not users_of(n.args[0])]
        if not idle:
            return
        for node in idle:
            gm.graph.erase_node(node)


def tidied(gm: GraphModule) -> None:
    """After a rewrite: dead code gone (`eliminate_dead_code`), the graph checked and the module's code made again."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()


def users_of(node: Node) -> list[Node]:
    return [u for u in node.users if u.target != ASSERT]  # export's metadata checks are no uses


def _dtype_of(node: Node):
    val = tensor_val(node)
    return val.dtype if val is not None else None

