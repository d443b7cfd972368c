"""fuse_cache_write: a decode step's writes of k and v into their caches, read by one decode_attention op, become one
op that writes both, rotating k (RoPE) on the way (tpcompile/kernels/write_kv.py): one kernel where Inductor made
one for k's rotation and write and one for v's write.

    before: kc = index_put_(k_cache, [rows, None, positions], transpose(k', 1, 2))      k' = k, or k rotated
            vc = index_put_(v_cache, [rows, None, positions], transpose(v, 1, 2))
            y = tpcompile.decode_attention(q, kc, vc, mask, s, ...)
    after:  tpcompile.write_kv(k_cache, v_cache, k, v, positions[, C, S])                   mutates both caches
            y = tpcompile.decode_attention(q, k_cache, v_cache, mask, s, ...)

where rows is arange(B)[:, None], positions (B, 1), k and v (B, Hkv, 1, D), the written values in the cache's
dtype (a `to` that changes nothing, and a view that drops leading dims of size 1, as a batch of one row gets, are
looked through) and the rotation, where there is one, either form that
rope_into_attention matches (C, S full-width tables). The op is declared as mutating both caches, so export and
Inductor order the attention's reads after it. Runs after decode_attention (and rope_into_attention), before
share_attention_mask, which makes the tables once per step for both ops of every layer; opt-in with
rope_into_attention (`backend.fuse_rope=true`) until measured on a GPU.
"""
import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.nodes import TO, tidied, tensor_val as _val, users_of
from tpcompile.passes.rope_into_attention import rotation, widened

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def fuse_cache_write(gm: GraphModule) -> list[str]:
    """Returns "k_cache, v_cache: one write[, k rotated]" for each pair of writes replaced."""
    if not hasattr(torch.ops.tpcompile, "decode_attention"):  # the op's module never imported: no node calls it
        return []
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.tpcompile.decode_attention.default:
            continue
        writes = [_write(a) for a in node.args[1:3]]
        if None in writes or writes[0][1:3] != writes[1][1:3] or writes[0][0] is writes[1][0]:
            continue
        if any(users_of(w) != [node] for w in node.args[1:3]):
            continue
        import tpcompile.kernels.write_kv  # noqa: F401  registers the op (imports torch's compiler)
        (k_cache, rows, positions, k), (v_cache, _, _, v) = writes
        found = rotation(k)
        tables = []
        with gm.graph.inserting_before(node):
            if found is not None:
                k, cos, sin, half = found
                tables = [widened(gm, t, half) for t in (cos, sin)]
            gm.graph.call_function(torch.ops.tpcompile.write_kv.default, (k_cache, v_cache, k, v, positions, *tables))
        old = node.args[1:3]
        node.args = (node.args[0], k_cache, v_cache, *node.args[3:])
        for write in old:
            gm.graph.erase_node(write)
        changed.append(f"{k_cache.name}, {v_cache.name}: one write{', k rotated' if tables else ''}")
    if changed:
        tidied(gm)
    return changed


def _write(node) -> tuple[Node, Node, Node, Node] | None:
    """(cache, rows, positions, x) when node is index_put_(cache, [rows, None, positions], transpose(x, 1, 2)) of one
    new slot per row (x (B, H, 1, D) in the cache's dtype, the cache (B, H, S, D)), else None."""
    if not isinstance(node, Node) or node.target != aten.index_put_.default or node.kwargs \
            or (len(node.args) > 3 and node.args[3]):
        return None
    cache, index, values = node.args[:3]
    cache_val = _val(cache)
    if cache_val is None or cache_val.dim() != 4 or len(index) != 3 or index[1] is not None:
        return None
    rows, positions = index[0], index[2]
    b, h, _, d = cache_val.shape
    if not _row_numbers(rows, b) or _val(positions) is None or tuple(_val(positions).shape) != (b, 1) \
            or _val(positions).dtype not in (torch.int64, torch.int32):
        return None
    while isinstance(values, Node) and _looked_through(values, cache_val.dtype):
        values = values.args[0]
    if not isinstance(values, Node) or values.target != aten.transpose.int or sorted(values.args[1:]) != [1, 2]:
        return None
    x = values.args[0]
    ok = _val(x) is not None and tuple(_val(x).shape) == (b, h, 1, d) and _val(x).dtype == cache_val.dtype
    return (cache, rows, positions, x) if ok else None


def _looked_through(node: Node, dtype: torch.dtype) -> bool:
    """node changes nothing that is written: a `to` its input already has the dtype of, or a view that only drops
    leading dims of size 1 (as indexing does to the values of one row: (1, 1, H, D) -> (H, D))."""
    source = _val(node.args[0]) if node.args else None
    if source is None:
        return False
    if node.target in TO:
        return source.dtype == dtype
    if node.target in VIEWS:
        shape = list(source.shape)
        while shape and shape[0] == 1 and shape != list(_val(node).shape):
            shape.pop(0)
        return shape == list(_val(node).shape)
    return False


def _row_numbers(node, b: int) -> bool:
    """node is unsqueeze(arange(b), 1)."""
    if not isinstance(node, Node) or node.target != aten.unsqueeze.default or node.args[1] not in (1, -1):
        return False
    start = node.args[0]
    return isinstance(start, Node) and start.target == aten.arange.default and list(start.args) == [b]
