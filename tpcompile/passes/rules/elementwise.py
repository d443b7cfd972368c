"""Rules for ops that work element by element or along one dim. Pointwise: S(d) op R -> S(d) when R is
broadcast along d; partial sums stay partial through ops linear in them (P+P, P*R, ...). norm, softmax and
reductions (mean, sum, amax, amin): a cut dim they do not reduce stays cut. index_copy, index_put: the
written buffer and value must be cut alike (an unplaced state buffer, the KV cache, takes the value's
placement).
"""
from dataclasses import replace

import torch
from torch.fx import Node

from tpcompile.passes.rules.walk import NeedPlacement, ShardingError, Walk, broadcast_along, rule, shape_of
from tpcompile.placement import P, R, Partial, Placement, Replicate, Shard

aten = torch.ops.aten

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


def _aligned(out_ndim: int, arg, pl: Placement):
    """Output dim of a broadcast operand's shard dim."""
    return pl.dim + out_ndim - len(shape_of(arg))


@rule(*POINTWISE)
def _rule_pointwise(w: Walk, node: Node):
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
        if all(broadcast_along(a, len(out_shape), pl.dim) for a in tensors if a not in shards):
            return pl
    for a in shards:
        w.require(node, a, R)
    return R


@rule(aten.rms_norm.default, aten.layer_norm.default)
def _rule_norm(w: Walk, node: Node):
    """rms_norm / layer_norm normalise over the trailing dims in normalized_shape: those must be whole."""
    x, normalized = node.args[0], node.args[1]
    px = w.pl(x)
    nd = len(shape_of(x))
    for a in node.all_input_nodes[1:]:
        w.require(node, a, R)
    if isinstance(px, Shard) and px.dim < nd - len(normalized):
        return px
    return w.require(node, x, R)


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
def _rule_reduce(w: Walk, node: Node):
    """mean / sum / amax / amin over `dims` (an RMSNorm written out: x * rsqrt(mean(x**2, -1) + eps)):
    a cut dim they do not reduce stays cut (renumbered when keepdim drops the reduced dims)."""
    x, dims = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    px, nd = w.pl(x), len(shape_of(x))
    reduced = {d % nd for d in ([dims] if isinstance(dims, int) else dims or range(nd))}
    if isinstance(px, Shard) and px.dim % nd not in reduced:
        dim = px.dim % nd
        return replace(px, dim=dim if keepdim else dim - sum(d < dim for d in reduced))
    return w.require(node, x, R)


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int)
def _rule_softmax(w: Walk, node: Node):
    x, dim = node.args[0], node.args[1]
    px = w.pl(x)
    if isinstance(px, Shard) and px.dim != dim % len(shape_of(x)):
        return px
    return w.require(node, x, R)


@rule(aten.index_copy_.default, aten.index_copy.default)
def _rule_index_copy(w: Walk, node: Node):
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


def _put_dims(ndim: int, indices) -> dict[int, int]:
    """self dim -> dim of self[indices] for the dims no index tensor selects. The indexed dims become the index
    shape: in place of the first when they are adjacent, else in front (numpy's advanced-indexing rule)."""
    indexed = [d for d, ix in enumerate(indices) if ix is not None]
    n_index = max((len(shape_of(ix)) for ix in indices if ix is not None), default=0)
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1)) if indexed else True
    lead = indexed[0] if adjacent and indexed else 0  # where the index shape goes
    rest = [d for d in range(ndim) if d not in indexed]
    return {d: i + (n_index if i >= lead else 0) for i, d in enumerate(rest)}


@rule(aten.index_put_.default, aten.index_put.default)
def _rule_index_put(w: Walk, node: Node):
    """self[indices] = values (self[rows, :, positions] = k: a per-row KV cache write). self and values are
    cut alike along a dim no index selects; the indices are whole. An unplaced state buffer takes the
    placement of what is written into it, mapped to its own dim (the KV cache follows the k/v heads)."""
    target, indices, values = node.args[:3]
    for ix in indices:
        if ix is not None:
            w.require(node, ix, R)
    pt, pv = w.pl(target), w.pl(values)
    if isinstance(pv, Partial):
        pv = w.require(node, values, R)
    dims = _put_dims(len(shape_of(target)), indices)
    n_index = max(len(shape_of(ix)) for ix in indices if ix is not None)
    offset = n_index + len(dims) - len(shape_of(values))  # values broadcast against self[indices]
    to_values = {d: v - offset for d, v in dims.items() if v >= offset}
    if isinstance(pv, Shard):
        dim = next((d for d, v in to_values.items() if v == pv.dim % len(shape_of(values))), None)
        if dim is None:
            raise ShardingError(f"{node.format_node()}: values are cut along dim {pv.dim}, which the indices "
                                f"select; cut them along another dim")
        want = replace(pv, dim=dim)
    else:
        want = R
    if pt != want and target.op == "get_attr" and target.target in w.state and isinstance(pt, Replicate):
        raise NeedPlacement(target.target, want)
    if pt != want:
        raise ShardingError(f"{node.format_node()}: writes a {pv} value into {target.name}, which is {pt}; "
                            f"give both the same style")
    return pt


@rule(aten._assert_tensor_metadata.default)
def _rule_no_output(w: Walk, node: Node):
    return R
