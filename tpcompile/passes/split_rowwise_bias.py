"""split_rowwise_bias: a rowwise linear yields partial sums, so its bias must be added once, after the
reduction, not on every rank.

    before: y = linear(x, W_rowwise, b)
    after:  y = add(linear(x, W_rowwise), b)      # propagation then puts the all-reduce before the add
    before: y = addmm(b, x, W_rowwise)            # W (in, out): GPT-2's Conv1D
    after:  y = add(mm(x, W_rowwise), b)
"""
import torch
from torch.fx import GraphModule

aten = torch.ops.aten


def split_rowwise_bias(gm: GraphModule, rowwise: set[str]) -> list[str]:
    """rowwise: fqns of rowwise weights. Returns the names of the linear nodes that were split."""
    changed = []
    for node in list(gm.graph.nodes):
        if node.target == aten.addmm.default and not node.kwargs and len(node.args) == 3:
            bias, x, weight = node.args
            if weight.op != "get_attr" or weight.target not in rowwise:
                continue
            node.target, node.args = aten.mm.default, (x, weight)
        elif node.target == aten.linear.default and len(node.args) >= 3 and node.args[2] is not None:
            weight, bias = node.args[1], node.args[2]
            if weight.op != "get_attr" or weight.target not in rowwise:
                continue
            node.args = node.args[:2]
        else:
            continue
        with gm.graph.inserting_after(node):
            add = gm.graph.call_function(aten.add.Tensor, (node, bias))
        node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        add.meta["val"] = node.meta.get("val")
        changed.append(node.name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
