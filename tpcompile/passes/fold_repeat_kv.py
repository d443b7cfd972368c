"""fold_repeat_kv: grouped-query attention written as a copy of every kv head n_rep times, then attention,
becomes attention that reads each kv head for its group of query heads (SDPA's enable_gqa).

    before: k_rep = reshape(expand(unsqueeze(k, 2), [B, KV, n_rep, S, D]), [B, KV * n_rep, S, D])   # and v
            y = scaled_dot_product_attention(q, k_rep, v_rep, mask)
    after:  y = scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)

Query head h reads kv head h // n_rep either way, so the result is the same; the copy is gone. In a decode step the
copy is of the whole static cache, every layer, every step: n_rep times the cache's bytes written and read again.
(transformers' attention makes it whenever a mask is given.) Full slices (x[:, :, None, :, :]) and a clone between
the expand and the reshape are looked through. Runs on the captured graph, before the plan.
"""
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MERGES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
SEE_THROUGH = (aten.clone.default, aten.contiguous.default, aten.alias.default)


def fold_repeat_kv(gm: GraphModule) -> list[str]:
    """Returns the names of the attention nodes whose k and v copies were folded."""
    changed = []
    for node in list(gm.graph.nodes):
        if node.target != SDPA or node.kwargs.get("enable_gqa") or len(node.args) < 3:
            continue
        k, v = _repeated(node.args[1]), _repeated(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] < 2:
            continue
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changed.append(node.name)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _repeated(merged) -> tuple[Node, int] | None:
    """(x, n_rep) when `merged` is x (B, KV, S, D) with each head repeated n_rep times in place: (B, KV*n_rep, S, D)."""
    if not isinstance(merged, Node) or merged.target not in MERGES:
        return None
    expanded = _through(merged.args[0], SEE_THROUGH)
    if expanded.target != aten.expand.default:
        return None
    inner = expanded.args[0]
    shape_in, shape_out = _shape(inner), _shape(expanded)
    if shape_in is None or shape_out is None or len(shape_out) != 5 or shape_in[2] != 1 or _shape(merged) is None:
        return None
    b, kv, n_rep, s, d = shape_out
    if tuple(_shape(merged)) != (b, kv * n_rep, s, d) or tuple(shape_in) != (b, kv, 1, s, d):
        return None
    x = inner
    while isinstance(x, Node) and (_full_slice(x) or (x.target == aten.unsqueeze.default and x.args[1] == 2)):
        x = x.args[0]
    if not isinstance(x, Node) or _shape(x) != (b, kv, s, d):
        return None
    return x, n_rep


def _through(node, ops) -> Node:
    while isinstance(node, Node) and node.target in ops:
        node = node.args[0]
    return node


def _full_slice(node: Node) -> bool:
    if node.target != aten.slice.Tensor:
        return False
    rest = list(node.args[1:4])
    dim, start, end = (rest + [0, None, None][len(rest):])[:3]
    size = _shape(node.args[0])[dim]
    return (start in (0, None)) and (end is None or end >= size) and (len(node.args) < 5 or node.args[4] == 1)


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
