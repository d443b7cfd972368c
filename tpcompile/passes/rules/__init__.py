"""Per-op placement rules for propagate_placements: (walk, node) -> the output's placement.

A rule reads its inputs' placements with w.pl, checks its guards first, and may call w.require (a
redistribute before the op) and w.rewrite (a shape argument made local). matmul.py: linear, addmm,
matmul, embedding, attention. views.py: ops that move, regroup or cut dims. elementwise.py: pointwise
ops, norms, softmax, in-place writes. Here: the errors a rule raises and the two rules the walker calls
itself (getitem, and the fallback for an op with no rule).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from tpcompile.placement import R, Placement, Replicate

if TYPE_CHECKING:
    from tpcompile.passes.propagate import _Walk


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


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _sharded(pl) -> bool:
    if isinstance(pl, list):
        return any(_sharded(p) for p in pl)
    return not isinstance(pl, Replicate)


def _broadcast_along(arg, out_ndim: int, dim: int) -> bool:
    shape = shape_of(arg)
    k = dim - (out_ndim - len(shape))
    return k < 0 or shape[k] == 1


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
