"""propagate_placements: walk the ATen graph once, in order, and decide for every tensor where it lives.

Input: the parameter placements from the plan. Output (a Propagation, the graph is not changed):
- placements:     node -> Placement (a list for ops that return several tensors)
- rewrites:       (node, arg index, old, new): shape arguments that must shrink to local sizes
- redistributes:  (consumer, producer, src, dst): where a value must change placement before use,
                  e.g. Partial -> Replicate is an all-reduce (insert_collectives makes it)
- fallbacks:      nodes with no rule that saw a sharded input: their inputs are gathered first,
                  which is always correct and shown in the report (it may be slow)

Shape arguments are found by mapping the sharded dimension through each op (view groups, transpose,
expand, ...) using the FakeTensor shapes that torch.export recorded; literal numbers are never matched.
"""
from dataclasses import dataclass, field, replace
from math import prod

import torch
from torch.fx import GraphModule, Node

from tpcompile.placement import P, R, Partial, Placement, Replicate, Shard

aten = torch.ops.aten


class ShardingError(ValueError):
    """A plan the graph cannot honour; the message names the node, the sizes and tp."""


class NeedPlacement(Exception):
    """A state buffer (e.g. a KV cache) is written with a sharded value: it must be cut the same way."""

    def __init__(self, fqn: str, placement: Placement):
        self.fqn, self.placement = fqn, placement


class NeedFewerWays(Exception):
    """A head dimension has fewer heads than ways: the parameters it comes from must be cut by head."""

    def __init__(self, node: Node, ways: int, size: int, origins: set[str], part: int | None = None):
        self.node, self.ways, self.size, self.origins = node, ways, size, origins
        self.part = part  # which part of a fused parameter (Shard.parts) the heads come from


@dataclass
class Propagation:
    placements: dict = field(default_factory=dict)
    rewrites: list = field(default_factory=list)
    redistributes: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    origins: dict = field(default_factory=dict)  # node -> parameter fqns its sharding comes from


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class _Walk:
    """State of one propagation; the rules below read and write it."""

    def __init__(self, gm: GraphModule, param_placements: dict[str, Placement], tp: int, state: set[str]):
        self.gm, self.tp, self.state = gm, tp, state
        self.param_placements = param_placements
        self.out = Propagation()
        self.part_of = {}  # node -> index of the fused part it was sliced from

    def pl(self, arg) -> Placement:
        return self.out.placements.get(arg, R) if isinstance(arg, Node) else R

    def require(self, node: Node, arg, dst: Placement) -> Placement:
        """Make `arg` have placement dst before `node` uses it."""
        src = self.pl(arg)
        if isinstance(arg, Node) and src != dst:
            if isinstance(src, Shard) and src.ways != self.tp:
                raise ShardingError(
                    f"{node.format_node()}: needs {arg.name} {dst} but it is cut into {src.ways} pieces "
                    f"replicated over tp={self.tp} ranks; only attention may consume such a tensor")
            self.out.redistributes.append((node, arg, src, dst))
        return dst

    def rewrite(self, node: Node, index: int, new) -> None:
        old = node.args[index]
        if old != new:
            self.out.rewrites.append((node, index, old, new))

    def origin(self, *args) -> set:
        return set().union(*(self.out.origins.get(a, set()) for a in args if isinstance(a, Node)))


def propagate_placements(gm: GraphModule, param_placements: dict[str, Placement], tp: int,
                         state: set[str] = frozenset()) -> Propagation:
    """state: fqns of buffers the graph writes in place and no rule placed; their placement follows the
    values written into them (NeedPlacement asks the caller to set it and walk again)."""
    w = _Walk(gm, param_placements, tp, state)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            pl = param_placements.get(node.target, R)
            w.out.placements[node] = pl
            if isinstance(pl, Shard):
                w.out.origins[node] = {node.target}
        elif node.op == "placeholder":
            w.out.placements[node] = R
        elif node.op == "output":
            for arg in node.all_input_nodes:
                w.require(node, arg, R)
        elif node.op == "call_function":
            rule = RULES.get(node.target)
            if rule is None:
                rule = _rule_getitem if node.target.__name__ == "getitem" else _rule_fallback
            result = rule(w, node)
            w.out.placements[node] = result
            if _sharded(result):
                w.out.origins[node] = w.origin(*node.all_input_nodes)
        else:  # call_module (export's input guards): sees only replicated inputs
            w.out.placements[node] = _rule_fallback(w, node)
    return w.out


def _sharded(pl) -> bool:
    if isinstance(pl, list):
        return any(_sharded(p) for p in pl)
    return not isinstance(pl, Replicate)


# ----------------------------------------------------------------------------------------------
# Rules: (walk, node) -> output placement. Guards first; they may call w.require / w.rewrite.

def _rule_fallback(w: _Walk, node: Node):
    """No rule: gather every sharded or partial input, compute replicated. Correct, maybe slow."""
    inputs = node.all_input_nodes
    if any(_sharded(w.pl(a)) for a in inputs):
        w.out.fallbacks.append(node)
        for a in inputs:
            w.require(node, a, R)
    return R


def _rule_getitem(w: _Walk, node: Node):
    src, index = node.args
    pls = w.pl(src)
    return pls[index] if isinstance(pls, list) else pls


def _aligned(out_ndim: int, arg, pl: Placement):
    """Output dim of a broadcast operand's shard dim."""
    return pl.dim + out_ndim - len(shape_of(arg))


def _rule_pointwise(w: _Walk, node: Node):
    """Elementwise with broadcasting. S op R is S when R is broadcast (size 1) along the cut dim.
    Partial sums survive ops that are linear in them: P+P, P-P, -P, P*R, P/R."""
    out_shape = shape_of(node)
    tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
    pls = {a: w.pl(a) for a in tensors}
    if any(isinstance(p, Partial) for p in pls.values()):
        linear_ok = (node.target in (aten.add.Tensor, aten.sub.Tensor) and all(isinstance(p, Partial) for p in pls.values())) \
            or (node.target in (aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.mul.Scalar, aten.div.Scalar)
                and sum(isinstance(p, Partial) for p in pls.values()) == 1
                and (node.target != aten.div.Tensor or isinstance(pls[node.args[0]], Partial)))
        if linear_ok:
            return P
        for a in tensors:
            if isinstance(pls[a], Partial):
                w.require(node, a, R)
                pls[a] = R
    shards = {a: p for a, p in pls.items() if isinstance(p, Shard)}
    if not shards:
        return R
    dims = {replace(p, dim=_aligned(len(out_shape), a, p)) for a, p in shards.items()}
    if len(dims) == 1:
        (pl,) = dims
        # replicated operands must be broadcast along the cut dim, or each rank would need its own slice
        if all(_broadcast_along(a, len(out_shape), pl.dim) for a in tensors if a not in shards):
            return pl
    for a in shards:
        w.require(node, a, R)
    return R


def _broadcast_along(arg, out_ndim: int, dim: int) -> bool:
    shape = shape_of(arg)
    k = dim - (out_ndim - len(shape))
    return k < 0 or shape[k] == 1


def _rule_linear(w: _Walk, node: Node):
    """y = x @ W.T + b with W (out, in). colwise: W S(0) -> y S(-1). rowwise: W S(1), x S(-1) -> y partial."""
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    px, pw, pb = w.pl(x), w.pl(weight), w.pl(bias)
    ndim = len(shape_of(node))
    if isinstance(pw, Shard) and pw.dim == 0:
        if _sharded(px):
            w.require(node, x, R)
        if bias is not None and pb != pw:
            raise ShardingError(f"{node.format_node()}: colwise weight {weight.target} needs its bias cut the same "
                                f"way ({pw}), got {pb}; give the bias the weight's style")
        return replace(pw, dim=ndim - 1)
    if isinstance(pw, Shard) and pw.dim == 1:
        if bias is not None:
            raise ShardingError(f"{node.format_node()}: rowwise linear still has its bias; run split_rowwise_bias first")
        if not (isinstance(px, Shard) and px.dim == len(shape_of(x)) - 1 and px.ways == pw.ways == w.tp
                and px.parts == pw.parts):
            raise ShardingError(
                f"{node.format_node()}: rowwise weight {weight.target} needs its input cut on the last dim into "
                f"tp={w.tp} pieces, but the input is {px}; make the layer that produces it colwise")
        return P
    if isinstance(px, Shard) and px.dim < len(shape_of(x)) - 1 and not _sharded(pb):
        return px  # rows are independent: a cut batch/sequence dim passes through
    w.require(node, x, R)
    if bias is not None:
        w.require(node, bias, R)
    return R


def _rule_addmm(w: _Walk, node: Node):
    """addmm(b, x, W) = x @ W + b with W (in, out) (GPT-2's Conv1D). colwise: W S(1), b S(0) -> y S(1).
    rowwise: W S(0), x S(1) -> partial (split_rowwise_bias turned it into mm + add first)."""
    bias, x, weight = node.args[:3]
    px, pw, pb = w.pl(x), w.pl(weight), w.pl(bias)
    if isinstance(pw, Shard) and pw.dim == 1:
        if _sharded(px):
            w.require(node, x, R)
        if pb != replace(pw, dim=0):
            raise ShardingError(f"{node.format_node()}: colwise weight {weight.target} needs its bias cut the same "
                                f"way, got {pb}; give the bias the weight's style")
        return replace(pw, dim=1)
    if isinstance(pw, Shard) or _sharded(pb):
        raise ShardingError(f"{node.format_node()}: rowwise addmm still has its bias; run split_rowwise_bias first")
    if isinstance(px, Shard) and px.dim == 0:
        return px  # rows are independent
    w.require(node, x, R)
    return R


def _rule_matmul(w: _Walk, node: Node):
    """x (..., m, k) @ y (..., k, n): batch dims cut alike stay cut; x cut on m or y cut on n stays cut;
    both cut on k give a partial sum (each rank multiplies its slice of the contraction)."""
    x, y = node.args[0], node.args[1]
    px, py = w.pl(x), w.pl(y)
    sx, sy, nd = shape_of(x), shape_of(y), len(shape_of(node))
    if len(sx) < 2 or len(sy) < 2 or not (_sharded(px) or _sharded(py)):
        if _sharded(px) or _sharded(py):
            return _rule_fallback(w, node)
        return R
    if isinstance(px, Partial) or isinstance(py, Partial):
        return _rule_fallback(w, node)
    ox = None if not isinstance(px, Shard) else px.dim + nd - len(sx)   # x's cut dim in output coordinates
    oy = None if not isinstance(py, Shard) else py.dim + nd - len(sy)
    if ox is not None and oy is not None and px.dim == len(sx) - 1 and py.dim == len(sy) - 2 and px.ways == py.ways == w.tp:
        return P                                                        # contraction dim cut on both sides
    if ox is not None and oy is not None and ox == oy and ox < nd - 2 and px.ways == py.ways:
        return Shard(ox, px.ways)                                       # same batch dim (heads)
    if ox is not None and py == R and (ox == nd - 2 or (ox < nd - 2 and _broadcast_along(y, nd, ox))):
        return Shard(ox, px.ways)
    if oy is not None and px == R and (py.dim == len(sy) - 1 or (oy < nd - 2 and _broadcast_along(x, nd, oy))):
        return Shard(nd - 1 if py.dim == len(sy) - 1 else oy, py.ways)
    return _rule_fallback(w, node)


def _rule_embedding(w: _Walk, node: Node):
    """embedding(W (V, C), ids): W S(1) -> out S(-1); W R -> out follows ids.
    W S(0) (vocabulary cut): each rank looks up the ids in its rows and zeros the rest (mask_vocab_lookup
    rewrites the lookup) -> the sum over ranks is the embedding: partial."""
    weight, ids = node.args[0], node.args[1]
    pw = w.pl(weight)
    if isinstance(pw, Shard) and pw.dim == 0 and pw.ways == w.tp and not pw.parts:
        w.require(node, ids, R)
        return P
    if isinstance(pw, Shard) and pw.dim == 1:
        w.require(node, ids, R)
        return Shard(len(shape_of(node)) - 1, pw.ways)
    if _sharded(pw):
        w.require(node, weight, R)
    return w.pl(ids) if isinstance(w.pl(ids), Shard) else w.require(node, ids, R)


def _view_groups(in_shape, out_shape):
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


def _rule_view(w: _Walk, node: Node):
    """view/reshape: find the group of input dims the cut dim belongs to and cut the first non-1 output dim
    of that group instead. Only valid when the cut dim is the outermost non-1 dim of its group."""
    x = node.args[0]
    px = w.pl(x)
    if isinstance(px, Partial):
        return P  # reshaping a partial sum keeps it a partial sum
    if not isinstance(px, Shard):
        return R
    in_shape, out_shape = shape_of(x), shape_of(node)
    for gi, gj in _view_groups(in_shape, out_shape):
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


def _rule_transpose(w: _Walk, node: Node):
    x, a, b = node.args
    nd = len(shape_of(x))
    a, b = a % nd, b % nd
    return _map_dim(w.pl(x), lambda d: b if d == a else a if d == b else d)


def _rule_permute(w: _Walk, node: Node):
    x, dims = node.args
    nd = len(shape_of(x))
    order = [d % nd for d in dims]
    return _map_dim(w.pl(x), lambda d: order.index(d))


def _rule_t(w: _Walk, node: Node):
    return _map_dim(w.pl(node.args[0]), lambda d: 1 - d)


def _rule_unsqueeze(w: _Walk, node: Node):
    x, dim = node.args
    dim = dim % (len(shape_of(x)) + 1)
    return _map_dim(w.pl(x), lambda d: d + 1 if d >= dim else d)


def _rule_squeeze(w: _Walk, node: Node):
    x = node.args[0]
    in_shape = shape_of(x)
    dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(in_shape) if s == 1]
    dims = {d % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims) if in_shape[d % len(in_shape)] == 1}
    return _map_dim(w.pl(x), lambda d: d - sum(1 for s in dims if s < d))


def _rule_expand(w: _Walk, node: Node):
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


def _rule_repeat_interleave(w: _Walk, node: Node):
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


def _rule_sdpa(w: _Walk, node: Node):
    """Attention is independent per head: q, k, v cut on the head dim (-3) give an output cut the same way.
    k/v may be cut into fewer pieces than q (kv heads replicated) when GQA groups stay whole."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pq, pk, pv = w.pl(q), w.pl(k), w.pl(v)
    head = len(shape_of(q)) - 3
    if not any(_sharded(p) for p in (pq, pk, pv)):
        return R
    if isinstance(pq, Shard) and pq.dim == head and pq.ways == w.tp and pk == pv \
            and isinstance(pk, Shard) and pk.dim == head:
        enable_gqa = node.kwargs.get("enable_gqa", False)
        if pk.ways != w.tp and not enable_gqa:
            raise ShardingError(f"{node.format_node()}: k/v cut into {pk.ways} pieces for tp={w.tp} needs GQA")
        if isinstance(w.pl(mask), Shard) and w.pl(mask) != pq:
            w.require(node, mask, R)
        return pq
    if isinstance(pq, Shard) and pq.dim == head and pq.ways < w.tp:
        raise ShardingError(
            f"{node.format_node()}: {shape_of(q)[head]} attention heads cannot be split over tp={w.tp}; "
            f"use a tp that divides the number of heads")
    for a in (q, k, v):
        w.require(node, a, R)
    w.out.fallbacks.append(node)
    return R


def _rule_norm(w: _Walk, node: Node):
    """rms_norm / layer_norm normalise over the trailing dims in normalized_shape: those must be whole."""
    x, normalized = node.args[0], node.args[1]
    px = w.pl(x)
    nd = len(shape_of(x))
    for a in node.all_input_nodes[1:]:
        w.require(node, a, R)
    if isinstance(px, Shard) and px.dim < nd - len(normalized):
        return px
    return w.require(node, x, R)


def _rule_softmax(w: _Walk, node: Node):
    x, dim = node.args[0], node.args[1]
    px = w.pl(x)
    if isinstance(px, Shard) and px.dim != dim % len(shape_of(x)):
        return px
    return w.require(node, x, R)


def _rule_split(w: _Walk, node: Node):
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
                _rule_fallback(w, node)
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


def _rule_slice(w: _Walk, node: Node):
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


def _rule_cat(w: _Walk, node: Node):
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


def _rule_select(w: _Walk, node: Node):
    x, dim = node.args[0], node.args[1] % len(shape_of(node.args[0]))
    px = w.pl(x)
    if isinstance(px, Shard) and px.dim == dim:
        w.out.fallbacks.append(node)
        return w.require(node, x, R)
    return _map_dim(px, lambda d: d - 1 if d > dim else d)


def _rule_index_copy(w: _Walk, node: Node):
    """self.index_copy_(dim, index, source): self and source are cut alike (not along `dim`).
    A state buffer that no rule placed takes the placement of what is written into it (the KV cache
    follows the k/v heads)."""
    target, dim, index, source = node.args[:4]
    pt, ps = w.pl(target), w.pl(source)
    dim %= len(shape_of(target))
    if isinstance(ps, Partial):
        ps = w.require(node, source, R)
    if pt != ps and target.op == "get_attr" and target.target in w.state and isinstance(pt, Replicate):
        raise NeedPlacement(target.target, ps)
    if isinstance(ps, Shard) and ps.dim == dim:
        raise ShardingError(f"{node.format_node()}: cannot write along the cut dim {dim}")
    if pt != ps:
        raise ShardingError(f"{node.format_node()}: writes a {ps} value into {target.name}, which is {pt}; "
                            f"give both the same style")
    return pt


def _rule_passthrough(w: _Walk, node: Node):
    return w.pl(node.args[0])


def _rule_no_output(w: _Walk, node: Node):
    return R


POINTWISE = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar,
    aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
    aten.pow.Scalar, aten.pow.Tensor_Tensor, aten.reciprocal.default, aten.rsqrt.default, aten.sqrt.default,
    aten.exp.default, aten.log.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default,
    aten.silu.default, aten.gelu.default, aten.cos.default, aten.sin.default, aten.abs.default,
    aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.clamp.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.clone.default,
    aten.contiguous.default, aten.dropout.default, aten.alias.default, aten.detach.default,
    aten.lt.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.ne.Scalar,
    aten.minimum.default, aten.maximum.default, aten.erf.default, aten.tril.default, aten.triu.default,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.eq.Tensor, aten.ne.Tensor,
    aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor, aten.clamp_min.default, aten.clamp_max.default,
]

RULES = {op: _rule_pointwise for op in POINTWISE}
RULES.update({
    aten.linear.default: _rule_linear,                      # colwise -> S(-1); rowwise -> P(sum)
    aten.addmm.default: _rule_addmm,                        # Conv1D: W (in, out) S(1) -> S(-1)
    aten.embedding.default: _rule_embedding,                # W S(1) -> S(-1)
    aten.matmul.default: _rule_matmul, aten.bmm.default: _rule_matmul, aten.mm.default: _rule_matmul,
    aten.view.default: _rule_view,                          # [B,T,H*D] S(2) -> [B,T,H,D] S(2), H -> H/tp
    aten.reshape.default: _rule_view,
    aten._unsafe_view.default: _rule_view,
    aten.transpose.int: _rule_transpose,                    # S(a) -> S(b)
    aten.permute.default: _rule_permute,
    aten.t.default: _rule_t,
    aten.unsqueeze.default: _rule_unsqueeze,
    aten.squeeze.dim: _rule_squeeze, aten.squeeze.dims: _rule_squeeze, aten.squeeze.default: _rule_squeeze,
    aten.expand.default: _rule_expand,                      # sizes[d] -> sizes[d] / ways
    aten.repeat_interleave.self_int: _rule_repeat_interleave,  # n -> n * ways / tp
    aten.scaled_dot_product_attention.default: _rule_sdpa,  # per head
    aten.rms_norm.default: _rule_norm,
    aten.layer_norm.default: _rule_norm,
    aten.softmax.int: _rule_softmax, aten._softmax.default: _rule_softmax, aten.log_softmax.int: _rule_softmax,
    aten.split.Tensor: _rule_split, aten.chunk.default: _rule_split, aten.split_with_sizes.default: _rule_split,
    aten.slice.Tensor: _rule_slice,
    aten.cat.default: _rule_cat,
    aten.select.int: _rule_select,
    aten.index_copy_.default: _rule_index_copy, aten.index_copy.default: _rule_index_copy,
    aten._assert_tensor_metadata.default: _rule_no_output,
})
