"""Helpers on fx nodes that several passes share."""
import torch
from torch.fx import GraphModule, Node


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
