"""rope_into_attention: the rotation of the query (RoPE) goes into the decode-attention op that reads it, whose split
kernel rotates q as it loads it (tpcompile/kernels/decode_attention.py): a decode step has no kernel of its own for
q's rotation.

    before: q = x * C + rotate_half(x) * S                     rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
            y = tpcompile.decode_attention(q, k, v, mask, s)
    after:  y = tpcompile.decode_attention(x, k, v, mask, s, C, S)

RoPE reaches the graph in two forms, both matched (operands of mul and add in either order):

    full-width tables (transformers): add(mul(x, C), mul(cat([neg(slice(x, -1, D/2)), slice(x, -1, 0, D/2)]), S))
    half-width tables: [to(] cat([x1 * c - x2 * s, x2 * c + x1 * s], -1) [, dtype)], x1, x2 = chunk([to(]x[)], 2, -1)
                       -> C = cat([c, c], -1), S = cat([s, s], -1)

where x is (B, Hq, 1, D) in q's dtype, D even, and the tables are (B or 1, 1, 1, D or D/2). The op rotates in
float32 and rounds to q's dtype once (as Inductor computes such pointwise chains); a graph that rounds between the
products (transformers' bfloat16 RoPE run eagerly) differs from it by that rounding. Keyed on the graph's
operations only. Runs after decode_attention, before share_attention_mask (which makes each table once per step
for every layer); opt-in (`backend.fuse_rope=true`) until measured on a GPU.
"""
import operator

import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.nodes import TO, tidied, tensor_val as _val

aten = torch.ops.aten


def rope_into_attention(gm: GraphModule) -> list[str]:
    """Returns "node: rotation of x (form)" for each decode_attention node whose query is now rotated in the op."""
    if not hasattr(torch.ops.tpcompile, "decode_attention"):  # the op's module never imported: no node calls it
        return []
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.tpcompile.decode_attention.default \
                or len(node.args) != 5:
            continue
        found = rotation(node.args[0])
        if found is None:
            continue
        x, cos, sin, half = found
        with gm.graph.inserting_before(node):
            cos, sin = (widened(gm, t, half) for t in (cos, sin))
        node.args = (x, *node.args[1:], cos, sin)
        changed.append(f"{node.name}: rotation of {x.name} ({'half' if half else 'full'}-width tables)")
    if changed:
        tidied(gm)
    return changed


def rotation(q: Node) -> tuple[Node, Node, Node, bool] | None:
    """(x, cos, sin, half-width) when q is RoPE of x in either form, else None."""
    want = _val(q)
    if want is None or want.dim() != 4 or want.shape[2] != 1 or want.shape[3] % 2:
        return None
    found = _full_width(q)
    if found is None:
        end = q.args[0] if q.target in TO and isinstance(q.args[0], Node) else q
        found = _half_width(end)
    if found is None:
        return None
    x, cos, sin, half = found
    d = want.shape[3] // 2 if half else want.shape[3]
    ok = (_val(x) is not None and _val(x).shape == want.shape and _val(x).dtype == want.dtype
          and all(_table(t, want.shape[0], d) for t in (cos, sin)))
    return found if ok else None


def _full_width(q: Node):
    """add(mul(x, C), mul(cat([neg(x[..., D/2:]), x[..., :D/2]], -1), S))"""
    if q.target != aten.add.Tensor or q.kwargs:
        return None
    for straight, turned in (q.args, q.args[::-1]):
        x_c, r_s = _factors(straight), _factors(turned)
        if x_c is None or r_s is None:
            continue
        for r, sin in (r_s, r_s[::-1]):
            x = _rotate_half_of(r)
            for xx, cos in (x_c, x_c[::-1]):
                if x is not None and xx is x:
                    return x, cos, sin, False
    return None


def _rotate_half_of(node) -> Node | None:
    """x when node is cat([neg(slice(x, -1, D/2, end)), slice(x, -1, 0, D/2)], -1)."""
    if not isinstance(node, Node) or node.target != aten.cat.default or len(node.args[0]) != 2 \
            or not _last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return None
    neg, low = node.args[0]
    if not isinstance(neg, Node) or neg.target != aten.neg.default:
        return None
    high = neg.args[0]
    if not all(isinstance(n, Node) and n.target == aten.slice.Tensor for n in (high, low)) \
            or high.args[0] is not low.args[0]:
        return None
    x = high.args[0]
    d = _val(x).shape[-1] if _val(x) is not None else 0
    (_, dim_h, start_h, end_h, step_h), (_, dim_l, start_l, end_l, step_l) = (
        (tuple(n.args) + (0, None, None, 1)[len(n.args) - 1:]) for n in (high, low))
    ok = _last_dim(x, dim_h) and _last_dim(x, dim_l) and step_h == step_l == 1 and start_h == end_l == d // 2 \
        and start_l == 0 and end_h is not None and end_h >= d
    return x if ok else None


def _half_width(cat: Node):
    """cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), x1, x2 = chunk([to(]x[)], 2, -1)"""
    if cat.target != aten.cat.default or len(cat.args[0]) != 2 or not _last_dim(cat, cat.args[1] if len(cat.args)
                                                                                  > 1 else 0):
        return None
    low, high = cat.args[0]
    if not (isinstance(low, Node) and low.target == aten.sub.Tensor and isinstance(high, Node)
            and high.target == aten.add.Tensor) or low.kwargs or high.kwargs:
        return None
    first, second = (_factors(a) for a in low.args)
    if first is None or second is None:
        return None
    for x1, cos in (first, first[::-1]):
        for x2, sin in (second, second[::-1]):
            x = _chunk_source(x1, x2)
            if x is not None and {frozenset(_factors(a) or ()) for a in high.args} == {frozenset((x2, cos)),
                                                                                       frozenset((x1, sin))}:
                return x, cos, sin, True
    return None


def _chunk_source(x1, x2) -> Node | None:
    """x when x1, x2 are the halves of chunk(x or to(x, float32), 2, -1)."""
    if not all(isinstance(n, Node) and n.target is operator.getitem for n in (x1, x2)) \
            or (x1.args[1], x2.args[1]) != (0, 1) or x1.args[0] is not x2.args[0]:
        return None
    chunk = x1.args[0]
    if chunk.target != aten.chunk.default or chunk.args[1] != 2 or not _last_dim(chunk.args[0], chunk.args[2]
                                                                                 if len(chunk.args) > 2 else 0):
        return None
    x = chunk.args[0]
    return x.args[0] if x.target in TO and isinstance(x.args[0], Node) else x


def _factors(node) -> tuple | None:
    return tuple(node.args) if isinstance(node, Node) and node.target == aten.mul.Tensor and not node.kwargs \
        and len(node.args) == 2 else None


def _last_dim(node: Node, dim) -> bool:
    val = _val(node)
    return val is not None and isinstance(dim, int) and dim in (-1, val.dim() - 1)


def _table(node, rows: int, width: int) -> bool:
    """A (rows or 1, 1, 1, width) floating tensor."""
    val = _val(node)
    return val is not None and val.dtype.is_floating_point and val.dim() == 4 and val.shape[0] in (1, rows) \
        and tuple(val.shape[1:]) == (1, 1, width)


def widened(gm: GraphModule, table: Node, half: bool) -> Node:
    """The table at full width: cat([table, table], -1) of a half-width one, inserted where the graph inserts."""
    if not half:
        return table
    val = _val(table)
    full = gm.graph.call_function(aten.cat.default, ([table, table], -1))
    full.meta = {**table.meta, "val": val.new_empty((*val.shape[:-1], 2 * val.shape[-1]))}
    return full
