"""mask_vocab_lookup: an embedding cut by vocabulary (W S(0)) looks up only the ids in its rank's rows and
zeros the others; the all-reduce that propagation put after it sums the ranks' rows into the embedding.

    before: e = embedding(W, ids)                               # W (V / tp, C) on each rank
    after:  local = ids - start                                 # start: a per-rank buffer, rank * ceil(V / tp)
            valid = (local >= 0) & (local < V / tp)
            e = embedding(W, local * valid) * valid[..., None]  # -> partial sum over ranks

`start` is a (tp,) tensor cut S(0): every rank runs the same graph and reads its own offset from its weights.
"""
import torch
from torch.fx import GraphModule

from tpcompile.placement import Shard

aten = torch.ops.aten


def mask_vocab_lookup(gm: GraphModule, plan) -> list[str]:
    """plan: the ShardPlan (gets the `start` buffers). Returns the names of the lookups rewritten."""
    changed, starts = [], {}
    g = gm.graph
    for node in list(g.nodes):
        if node.target != aten.embedding.default or node.args[0].op != "get_attr":
            continue
        weight, ids = node.args[0], node.args[1]
        pl = plan.placements.get(weight.target)
        if not (isinstance(pl, Shard) and pl.dim == 0 and pl.ways == plan.tp):
            continue
        rows = plan.local_shape(weight.target)[0]
        fqn = f"{weight.target}_vocab_start"
        if fqn not in starts:
            owner, _, name = fqn.rpartition(".")
            start = torch.arange(plan.tp, dtype=torch.int64) * rows
            (gm.get_submodule(owner) if owner else gm).register_buffer(name, start.clone())
            plan.shapes[fqn], plan.placements[fqn], plan.styles[fqn], plan.extra[fqn] = (plan.tp,), Shard(0, plan.tp), "vocab", start
            with g.inserting_before(node):
                starts[fqn] = g.get_attr(fqn)
        with g.inserting_before(node):
            local = g.call_function(aten.sub.Tensor, (ids, starts[fqn]))
            valid = g.call_function(aten.bitwise_and.Tensor, (g.call_function(aten.ge.Scalar, (local, 0)),
                                                               g.call_function(aten.lt.Scalar, (local, rows))))
            safe = g.call_function(aten.mul.Tensor, (local, valid))
        node.args = (weight, safe) + tuple(node.args[2:])
        with g.inserting_after(node):
            keep = g.call_function(aten.unsqueeze.default, (valid, -1))
        with g.inserting_after(keep):
            masked = g.call_function(aten.mul.Tensor, (node, keep))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        masked.meta["val"] = node.meta.get("val")
        changed.append(node.name)
    if changed:
        g.lint()
        gm.recompile()
    return changed
