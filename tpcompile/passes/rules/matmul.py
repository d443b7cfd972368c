"""Rules for contractions: which operand is cut on which dim decides the output's placement.
linear/addmm colwise (weight cut on its out dim) -> output cut on its last dim; rowwise (weight cut on
its in dim, input cut on its last dim) -> partial sums. matmul: a cut batch, row or column dim stays cut,
a contraction dim cut on both sides -> partial. embedding: table cut on C -> output cut on its last dim,
cut on the vocabulary -> partial. Attention (sdpa): q, k, v cut on the head dim -> output cut alike.
"""
from dataclasses import replace

import torch
from torch.fx import Node

from tpcompile.passes.rules.walk import ShardingError, Walk, broadcast_along, fallback, rule, shape_of, sharded
from tpcompile.placement import P, R, Partial, Shard

aten = torch.ops.aten


@rule(aten.linear.default)                      # colwise -> S(-1); rowwise -> P(sum)
def _rule_linear(w: Walk, node: Node):
    """y = x @ W.T + b with W (out, in). colwise: W S(0) -> y S(-1). rowwise: W S(1), x S(-1) -> y partial."""
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    px, pw, pb = w.pl(x), w.pl(weight), w.pl(bias)
    ndim = len(shape_of(node))
    if isinstance(pw, Shard) and pw.dim == 0:
        if sharded(px):
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
    if isinstance(px, Shard) and px.dim < len(shape_of(x)) - 1 and not sharded(pb):
        return px  # rows are independent: a cut batch/sequence dim passes through
    w.require(node, x, R)
    if bias is not None:
        w.require(node, bias, R)
    return R


@rule(aten.addmm.default)                       # Conv1D: W (in, out) S(1) -> S(-1)
def _rule_addmm(w: Walk, node: Node):
    """addmm(b, x, W) = x @ W + b with W (in, out) (GPT-2's Conv1D). colwise: W S(1), b S(0) -> y S(1).
    rowwise: W S(0), x S(1) -> partial (split_rowwise_bias turned it into mm + add first)."""
    bias, x, weight = node.args[:3]
    px, pw, pb = w.pl(x), w.pl(weight), w.pl(bias)
    if isinstance(pw, Shard) and pw.dim == 1:
        if sharded(px):
            w.require(node, x, R)
        if pb != replace(pw, dim=0):
            raise ShardingError(f"{node.format_node()}: colwise weight {weight.target} needs its bias cut the same "
                                f"way, got {pb}; give the bias the weight's style")
        return replace(pw, dim=1)
    if isinstance(pw, Shard) or sharded(pb):
        raise ShardingError(f"{node.format_node()}: rowwise addmm still has its bias; run split_rowwise_bias first")
    if isinstance(px, Shard) and px.dim == 0:
        return px  # rows are independent
    w.require(node, x, R)
    return R


@rule(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _rule_matmul(w: Walk, node: Node):
    """x (..., m, k) @ y (..., k, n): batch dims cut alike stay cut; x cut on m or y cut on n stays cut;
    both cut on k give a partial sum (each rank multiplies its slice of the contraction)."""
    x, y = node.args[0], node.args[1]
    px, py = w.pl(x), w.pl(y)
    sx, sy, nd = shape_of(x), shape_of(y), len(shape_of(node))
    if len(sx) < 2 or len(sy) < 2 or not (sharded(px) or sharded(py)):
        if sharded(px) or sharded(py):
            return fallback(w, node)
        return R
    if isinstance(px, Partial) or isinstance(py, Partial):
        return fallback(w, node)
    ox = None if not isinstance(px, Shard) else px.dim + nd - len(sx)   # x's cut dim in output coordinates
    oy = None if not isinstance(py, Shard) else py.dim + nd - len(sy)
    if ox is not None and oy is not None and px.dim == len(sx) - 1 and py.dim == len(sy) - 2 and px.ways == py.ways == w.tp:
        return P                                                        # contraction dim cut on both sides
    if ox is not None and oy is not None and ox == oy and ox < nd - 2 and px.ways == py.ways:
        return Shard(ox, px.ways)                                       # same batch dim (heads)
    if ox is not None and py == R and (ox == nd - 2 or (ox < nd - 2 and broadcast_along(y, nd, ox))):
        return Shard(ox, px.ways)
    if oy is not None and px == R and (py.dim == len(sy) - 1 or (oy < nd - 2 and broadcast_along(x, nd, oy))):
        return Shard(nd - 1 if py.dim == len(sy) - 1 else oy, py.ways)
    return fallback(w, node)


@rule(aten.embedding.default)                   # W S(1) -> S(-1)
def _rule_embedding(w: Walk, node: Node):
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
    if sharded(pw):
        w.require(node, weight, R)
    return w.pl(ids) if isinstance(w.pl(ids), Shard) else w.require(node, ids, R)


@rule(aten.scaled_dot_product_attention.default)  # per head
def _rule_sdpa(w: Walk, node: Node):
    """Attention is independent per head: q, k, v cut on the head dim (-3) give an output cut the same way.
    k/v may be cut into fewer pieces than q (kv heads replicated) when GQA groups stay whole."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pq, pk, pv = w.pl(q), w.pl(k), w.pl(v)
    head = len(shape_of(q)) - 3
    if not any(sharded(p) for p in (pq, pk, pv)):
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
