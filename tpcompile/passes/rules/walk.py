"""What every placement rule shares: the walk state a rule reads and writes, the one rule table, the
decorator that fills it, and the errors a rule raises.

A rule is a function (walk, node) -> the output's placement, registered for the ops it handles where it is
defined:

    @rule(aten.linear.default)                 # colwise -> S(-1); rowwise -> P(sum)
    def _rule_linear(w: Walk, node: Node): ...

It reads its inputs' placements with w.pl, checks its guards first, and may call w.require (a
redistribute before the op) and w.rewrite (a shape argument made local). An op with no rule goes to
`fallback`: every sharded input is gathered first, which is always correct.
"""
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from tpcompile.placement import R, Placement, Replicate, Shard

RULES: dict[Callable, Callable] = {}
"""op (an ATen overload, or operator.getitem) -> rule. Filled by @rule in matmul.py, views.py, elementwise.py
and any other module of passes/rules/ imported by its __init__."""


def rule(*ops):
    """Register the decorated function as the placement rule of every op in `ops`."""
    def register(fn):
        for op in ops:
            if op in RULES:
                raise ValueError(f"op {op} has two placement rules, {RULES[op].__qualname__} and "
                                 f"{fn.__qualname__}; keep one")
            RULES[op] = fn
        return fn
    return register


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


class Walk:
    """State of one propagation; the rules read and write it."""

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


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def sharded(pl) -> bool:
    """Cut or partial (a list: any of an op's outputs)."""
    if isinstance(pl, list):
        return any(sharded(p) for p in pl)
    return not isinstance(pl, Replicate)


def broadcast_along(arg, out_ndim: int, dim: int) -> bool:
    """`arg` has size 1 (or no dim) at output dim `dim` under broadcasting."""
    shape = shape_of(arg)
    k = dim - (out_ndim - len(shape))
    return k < 0 or shape[k] == 1


def fallback(w: Walk, node: Node):
    """No rule: gather every sharded or partial input, compute replicated. Correct, maybe slow."""
    inputs = node.all_input_nodes
    if any(sharded(w.pl(a)) for a in inputs):
        w.out.fallbacks.append(node)
        for a in inputs:
            w.require(node, a, R)
    return R


@rule(operator.getitem)                 # one output of a multi-output op: its placement
def _rule_getitem(w: Walk, node: Node):
    src, index = node.args
    pls = w.pl(src)
    return pls[index] if isinstance(pls, list) else pls
