"""insert_collectives: make each value the placement its consumer needs, with functional collectives
(`_c10d_functional.*` + `wait_tensor`), which Inductor and AOTInductor understand.

    Partial -> Replicate : all_reduce(sum)            (rowwise output meets the residual stream)
    Shard(d) -> Replicate: all_gather on dim 0, then move the rank dim next to d and merge
"""
import torch
from torch.fx import GraphModule, Node

from tpcompile.placement import Partial, Replicate, Shard

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


def insert_collectives(gm: GraphModule, redistributes: list, tp: int, group_name: str) -> list[tuple[str, str, str]]:
    """redistributes: (consumer, producer, src, dst). Returns (collective, producer, consumer) per insertion.
    A producer feeding several consumers that need the same placement gets one collective."""
    made: dict[tuple[Node, str], Node] = {}
    changed = []
    for consumer, producer, src, dst in redistributes:
        if not isinstance(dst, Replicate):
            raise NotImplementedError(f"redistribute {src} -> {dst} for {consumer.format_node()}")
        key = (producer, str(src))
        if key not in made:
            with gm.graph.inserting_after(producer):
                if isinstance(src, Partial):
                    made[key] = _all_reduce(gm, producer, group_name)
                    kind = "all_reduce"
                elif isinstance(src, Shard):
                    made[key] = _all_gather(gm, producer, src.dim, tp, group_name)
                    kind = "all_gather"
                else:
                    raise NotImplementedError(str(src))
            changed.append((kind, producer.name, consumer.name))
        else:
            changed.append(("reuse", producer.name, consumer.name))
        consumer.replace_input_with(producer, made[key])
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _all_reduce(gm: GraphModule, x: Node, group_name: str) -> Node:
    g = gm.graph
    reduced = g.call_function(c10d.all_reduce.default, (x, "sum", group_name))
    with g.inserting_after(reduced):
        return g.call_function(c10d.wait_tensor.default, (reduced,))


def _all_gather(gm: GraphModule, x: Node, dim: int, tp: int, group_name: str) -> Node:
    """Gather along `dim`: stack the pieces on a new leading dim, move it in front of `dim`, merge."""
    g = gm.graph
    full = list(x.meta["val"].shape)  # export recorded global shapes
    nodes = []

    def add(op, *args):
        with g.inserting_after(nodes[-1] if nodes else x):
            nodes.append(g.call_function(op, args))
        return nodes[-1]

    stacked = add(aten.unsqueeze.default, x, 0)
    contiguous = add(aten.clone.default, stacked)
    gathered = add(c10d.all_gather_into_tensor.default, contiguous, tp, group_name)
    waited = add(c10d.wait_tensor.default, gathered)          # (tp, *local)
    order = list(range(1, dim + 1)) + [0] + list(range(dim + 1, len(full) + 1))
    moved = add(aten.permute.default, waited, order)           # (..., tp, local_d, ...)
    padded = list(full)
    padded[dim] = -(-full[dim] // tp) * tp                     # a padded vocabulary: tp * ceil(V / tp)
    merged = add(aten.reshape.default, moved, padded)          # (..., global_d, ...)
    return merged if padded == full else add(aten.slice.Tensor, merged, dim, 0, full[dim])
