"""rewrite_shapes: every shape argument that encodes a cut dimension becomes its local size.

    before: view(linear, [2, 16, 4, 16])     # 4 heads
    after:  view(linear, [2, 16, 2, 16])     # tp=2: 2 heads per rank

The rewrites themselves were decided by propagate_placements (which maps the cut dim through each op);
this pass only applies them, so the report can list exactly what changed.
"""
from torch.fx import GraphModule


def rewrite_shapes(gm: GraphModule, rewrites: list) -> list[tuple[str, str, object, object]]:
    """rewrites: (node, arg index, old, new). Returns (node name, op, old, new) for each change."""
    changed = []
    for node, index, old, new in rewrites:
        args = list(node.args)
        args[index] = new
        node.args = tuple(args)
        changed.append((node.name, str(node.target), old, new))
    if changed:
        gm.recompile()
    return changed
