"""Rules for ops that move, regroup or cut dims: the cut dim is mapped to where it lands in the output,
and shape arguments on it become local sizes. view/reshape: S(d) -> S(first non-1 dim of d's group);
transpose, permute, t, unsqueeze, squeeze, select: S(d) -> S(d moved); expand, repeat_interleave: S(d)
-> S(d) with local sizes (GQA may widen the cut to tp pieces). split/slice along a fused dim at its
parts' bounds keep each part cut; cat, split, slice or select along the cut dim gather first.
"""
from dataclasses import replace

import torch
from torch.fx import Node

from tpcompile.passes.rules.walk import NeedFewerWays, ShardingError, Walk, fallback, rule, shape_of
from tpcompile.placement import P, R, Partial, Shard

aten = torch.ops.aten


def view_groups(in_shape, out_shape):
    """Pair up the dims of a view: [(in dims, out dims)] with equal products, in order."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(in_shape):
            pi *= in_shape[i]; gi.append(i); i += 1
        if j < len(out_shape):
            pj *= out_shape[j]; gj.append(j); j += 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]; gi.append(i); i += 1
            else:
                pj *= out_shape[j]; gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default)  # [B,T,H*D] S(2) -> [B,T,H,D] S(2), H -> H/tp
def _rule_view(w: Walk, node: Node):
    """view/reshape: find the group of input dims the cut dim belongs to and cut the first non-1 output dim
    of that group instead. Only valid when the cut dim is the outermost non-1 dim of its group."""
    x = node.args[0]
    px = w.pl(x)
    if isinstance(px, Partial):
        return P  # reshaping a partial sum keeps it a partial sum
    if not isinstance(px, Shard):
        return R
    in_shape, out_shape = shape_of(x), shape_of(node)
    for gi, gj in view_groups(in_shape, out_shape):
        if px.dim not in gi:
            continue
        outer_in = [d for d in gi if in_shape[d] != 1]
        outer_out = [d for d in gj if out_shape[d] != 1]
        if not outer_in or outer_in[0] != px.dim or not outer_out:
            break
        j = outer_out[0]
        size = out_shape[j]
        if px.parts and size != in_shape[px.dim]:
            break  # a fused dim is regrouped before its parts are split off: no local equivalent
        if size % px.ways:
            if px.ways % size == 0:
                raise NeedFewerWays(node, px.ways, size, w.origin(x), w.part_of.get(x))
            raise ShardingError(
                f"{node.format_node()}: dim {j} of size {size} (heads or features) is not divisible by "
                f"tp={w.tp}; choose a tp that divides {size}, or replicate the layers that produce it")
        shape_arg = list(node.args[1])
        if shape_arg[j] != -1:
            if not isinstance(shape_arg[j], int):
                raise ShardingError(f"{node.format_node()}: the cut dim {j} has a symbolic size; cannot shard it")
            shape_arg[j] = size // px.ways
            w.rewrite(node, 1, shape_arg)
        return replace(px, dim=j)
    w.require(node, x, R)
    w.out.fallbacks.append(node)
    return R


def _map_dim(px, fn):
    return replace(px, dim=fn(px.dim)) if isinstance(px, Shard) else px


@rule(aten.transpose.int)                        # S(a) -> S(b)
def _rule_transpose(w: Walk, node: Node):
    x, a, b = node.args
    nd = len(shape_of(x))
    a, b = a % nd, b % nd
    return _map_dim(w.pl(x), lambda d: b if d == a else a if d == b else d)


@rule(aten.permute.default)
def _rule_permute(w: Walk, node: Node):
    x, dims = node.args
    nd = len(shape_of(x))
    order = [d % nd for d in dims]
    return _map_dim(w.pl(x), lambda d: order.index(d))


@rule(aten.t.default)
def _rule_t(w: Walk, node: Node):
    return _map_dim(w.pl(node.args[0]), lambda d: 1 - d)


@rule(aten.unsqueeze.default)
def _rule_unsqueeze(w: Walk, node: Node):
    x, dim = node.args
    dim = dim % (len(shape_of(x)) + 1)
    return _map_dim(w.pl(x), lambda d: d + 1 if d >= dim else d)


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _rule_squeeze(w: Walk, node: Node):
    x = node.args[0]
    in_shape = shape_of(x)
    dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(in_shape) if s == 1]
    dims = {d % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims) if in_shape[d % len(in_shape)] == 1}
    return _map_dim(w.pl(x), lambda d: d - sum(1 for s in dims if s < d))


@rule(aten.expand.default)                       # sizes[d] -> sizes[d] / ways
def _rule_expand(w: Walk, node: Node):
    """expand keeps the cut dim; its size argument must be the local size.
    GQA as expand + reshape, (B, kv, 1, T, D) -> (B, kv, n_rep, T, D) -> (B, kv * n_rep, T, D), with kv heads
    cut into ways < tp pieces: the copies are identical, so each rank expands to n_rep * ways / tp and the
    merged head dim is cut into tp pieces: kv/ways * n_rep*ways/tp = heads/tp, rank r's q heads' kv head."""
    x, sizes = node.args[0], list(node.args[1])
    px = w.pl(x)
    if not isinstance(px, Shard):
        return px
    d = px.dim + len(sizes) - len(shape_of(x))
    in_shape, out_shape = (1,) * (len(sizes) - len(shape_of(x))) + shape_of(x), shape_of(node)
    if px.ways < w.tp and d + 1 < len(sizes) and in_shape[d + 1] == 1 and out_shape[d + 1] * px.ways % w.tp == 0 \
            and node.users and all(u.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
                                   and len(shape_of(u)) < len(out_shape) for u in node.users):
        sizes[d] = out_shape[d] // px.ways
        sizes[d + 1] = out_shape[d + 1] * px.ways // w.tp
        w.rewrite(node, 1, sizes)
        return Shard(d, w.tp)  # read by the merging reshape only: (kv * n_rep) / tp per rank
    if sizes[d] != -1:
        sizes[d] = shape_of(node)[d] // px.ways
        w.rewrite(node, 1, sizes)
    return Shard(d, px.ways)


@rule(aten.repeat_interleave.self_int)          # n -> n * ways / tp
def _rule_repeat_interleave(w: Walk, node: Node):
    """repeat_interleave(x, n, dim) on the cut dim (GQA's kv expansion): each rank repeats its own heads
    so that the output is cut into tp pieces: n_local = n * ways / tp."""
    x, repeats = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    px = w.pl(x)
    if not isinstance(px, Shard) or dim is None or dim % len(shape_of(x)) != px.dim:
        return px if dim is not None else w.require(node, x, R)
    if not isinstance(repeats, int) or (repeats * px.ways) % w.tp:
        raise ShardingError(f"{node.format_node()}: cannot repeat {px.ways} pieces {repeats} times into tp={w.tp}")
    w.rewrite(node, 1, repeats * px.ways // w.tp)
    return Shard(px.dim, w.tp)


@rule(aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default)
def _rule_split(w: Walk, node: Node):
    """chunk/split along an uncut dim: every part keeps the cut. Along a dim cut by parts (fused weights)
    into exactly those parts: each part stays cut, split sizes become local (chunk(n) needs no rewrite):
        split(qkv S/2[32,32,32], 32) -> split(qkv, 16) -> q, k, v S/2.  Along any other cut dim: gather."""
    x = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    px = w.pl(x)
    n = len(node.meta["val"])
    sizes = tuple(v.shape[dim] for v in node.meta["val"])
    if isinstance(px, Shard) and px.dim == dim % len(shape_of(x)) and px.parts == sizes and px.ways == w.tp \
            and set(px.ways_of_parts()) == {w.tp}:
        if node.target == aten.split.Tensor:
            if len(set(sizes)) != 1:
                fallback(w, node)
                return [R] * n
            w.rewrite(node, 1, sizes[0] // px.ways)
        elif node.target == aten.split_with_sizes.default:
            w.rewrite(node, 1, [s // px.ways for s in sizes])
        return [Shard(px.dim, px.ways)] * n
    if isinstance(px, Shard) and px.dim == dim % len(shape_of(x)):
        w.require(node, x, R)
        w.out.fallbacks.append(node)
        px = R
    return [px] * n


@rule(aten.slice.Tensor)
def _rule_slice(w: Walk, node: Node):
    """slice along a dim cut by parts, at exactly one part's bounds: bounds become local.
        slice(qkv S/2[32,16,16], 2, 32, 48) -> slice(qkv, 2, 16, 24) -> k S/2"""
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    px = w.pl(x)
    if isinstance(px, Shard) and px.parts and px.dim == dim % len(shape_of(x)) and px.ways == w.tp:
        total = shape_of(x)[px.dim]
        start, end = (list(node.args[2:4]) + [None, None])[:2]
        step = node.args[4] if len(node.args) > 4 else 1
        start = 0 if start is None else start + total if start < 0 else start
        end = total if end is None else min(end + total if end < 0 else end, total)
        bounds = [sum(px.parts[:i]) for i in range(len(px.parts) + 1)]
        ways = px.ways_of_parts()
        local = [sum(p // k for p, k in zip(px.parts[:i], ways)) for i in range(len(px.parts) + 1)]
        if step == 1 and (start, end) in zip(bounds, bounds[1:]) and len(node.args) >= 4:
            part = bounds.index(start)
            for i, v in zip((2, 3), (local[part], local[part + 1])):
                if node.args[i] != v and not (i == 3 and node.args[i] >= total and part == len(px.parts) - 1):
                    w.rewrite(node, i, v)
            w.part_of[node] = part
            return Shard(px.dim, ways[part])
    if isinstance(px, Shard) and px.dim == dim % len(shape_of(x)):
        w.out.fallbacks.append(node)
        return w.require(node, x, R)
    return px


@rule(aten.cat.default)
def _rule_cat(w: Walk, node: Node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    pls = {w.pl(t) for t in tensors}
    if len(pls) == 1:
        (pl,) = pls
        if not isinstance(pl, Shard) or pl.dim != dim % len(shape_of(node)):
            return pl
    for t in tensors:
        w.require(node, t, R)
    return R


@rule(aten.select.int)
def _rule_select(w: Walk, node: Node):
    x, dim = node.args[0], node.args[1] % len(shape_of(node.args[0]))
    px = w.pl(x)
    if isinstance(px, Shard) and px.dim == dim:
        w.out.fallbacks.append(node)
        return w.require(node, x, R)
    return _map_dim(px, lambda d: d - 1 if d > dim else d)
