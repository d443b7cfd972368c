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
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.rules import (NeedFewerWays, NeedPlacement, ShardingError, _rule_fallback, _rule_getitem,
                                    _sharded, shape_of)
from tpcompile.passes.rules.elementwise import (POINTWISE, _rule_index_copy, _rule_no_output, _rule_norm,
                                                _rule_pointwise, _rule_softmax)
from tpcompile.passes.rules.matmul import _rule_addmm, _rule_embedding, _rule_linear, _rule_matmul, _rule_sdpa
from tpcompile.passes.rules.views import (_rule_cat, _rule_expand, _rule_permute, _rule_repeat_interleave,
                                          _rule_select, _rule_slice, _rule_split, _rule_squeeze, _rule_t,
                                          _rule_transpose, _rule_unsqueeze, _rule_view)
from tpcompile.placement import R, Placement, Shard

__all__ = ["propagate_placements", "Propagation", "RULES", "ShardingError", "NeedPlacement", "NeedFewerWays",
           "shape_of"]

aten = torch.ops.aten


@dataclass
class Propagation:
    placements: dict = field(default_factory=dict)
    rewrites: list = field(default_factory=list)
    redistributes: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    origins: dict = field(default_factory=dict)  # node -> parameter fqns its sharding comes from


class _Walk:
    """State of one propagation; the rules (passes/rules/) read and write it."""

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
