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
from torch.fx import GraphModule

from tpcompile.passes.rules import (RULES, NeedFewerWays, NeedPlacement, Propagation, ShardingError, Walk, fallback,
                                    shape_of, sharded)
from tpcompile.placement import R, Placement, Shard

__all__ = ["propagate_placements", "Propagation", "RULES", "ShardingError", "NeedPlacement", "NeedFewerWays",
           "shape_of"]


def propagate_placements(gm: GraphModule, param_placements: dict[str, Placement], tp: int,
                         state: set[str] = frozenset()) -> Propagation:
    """state: fqns of buffers the graph writes in place and no rule placed; their placement follows the
    values written into them (NeedPlacement asks the caller to set it and walk again).
    The per-op rules are in passes/rules/ (RULES: op -> rule); an op with none gathers its inputs."""
    w = Walk(gm, param_placements, tp, state)
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
            result = RULES.get(node.target, fallback)(w, node)
            w.out.placements[node] = result
            if sharded(result):
                w.out.origins[node] = w.origin(*node.all_input_nodes)
        else:  # call_module (export's input guards): sees only replicated inputs
            w.out.placements[node] = fallback(w, node)
    return w.out
