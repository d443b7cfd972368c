"""The partition passes, in order. Each returns what it changed; `partition` collects that for the report."""
from dataclasses import dataclass, field

from torch.fx import GraphModule

from tpcompile.passes.decode_attention import decode_attention, share_attention_mask, wanted as attention_wanted
from tpcompile.passes.fuse_allreduce_norm import fuse_allreduce_norm, wanted as allreduce_wanted
from tpcompile.passes.fuse_cache_write import fuse_cache_write
from tpcompile.passes.insert_collectives import insert_collectives
from tpcompile.passes.mask_vocab_lookup import mask_vocab_lookup
from tpcompile.passes.propagate import (NeedFewerWays, NeedPlacement, Propagation, ShardingError,
                                        propagate_placements)
from tpcompile.passes.rewrite_shapes import rewrite_shapes
from tpcompile.passes.rope_into_attention import rope_into_attention
from tpcompile.passes.split_rowwise_bias import split_rowwise_bias
from tpcompile.plan import ShardPlan, with_fewer_ways

__all__ = ["partition", "Partition", "ShardingError", "OPTIONAL", "DEFAULT_PASSES", "optional_passes"]

# passes a build may leave out (backend.skip_passes), to measure each one's effect or to step around one
OPTIONAL = {
    "fold_repeat_kv": "attention reads each kv head for its group of query heads, no per-layer copy (captured graph)",
    "fuse_linears": "linears that read the same input become one matmul per rank (after the partition)",
    "decode_attention": "one-query attention reads only the cache blocks its mask sees (GPU engines)",
    "share_attention_mask": "the mask every layer's decode_attention reads is made once per step, not per layer",
    "one_row_linear": "a linear of one row reads its weight in one tuned kernel, a gated MLP's activation inside "
                      "(GPU engines, after fuse_linears)",
    "fuse_norm_residual": "the RMSNorm before a one-row product and the residual add after it go into its kernel "
                          "(GPU, opt-in: backend.fuse_norm_residual)",
    "rope_into_attention": "the query's RoPE is computed in decode_attention's kernel, not a kernel of its own "
                           "(GPU, opt-in: backend.fuse_rope)",
    "fuse_cache_write": "a decode step's k and v cache writes as one kernel, k's RoPE inside (GPU, opt-in: "
                        "backend.fuse_rope)",
    "fuse_allreduce_norm": "all-reduce + residual add + RMSNorm as one op (GPU, opt-in: backend.fuse_allreduce)",
}
DEFAULT_PASSES = frozenset({"fold_repeat_kv", "fuse_linears"})  # on any backend and device
GPU_PASSES = frozenset({"decode_attention", "share_attention_mask", "one_row_linear"})  # on where attention_wanted
OPT_IN = frozenset({"fuse_norm_residual", "rope_into_attention", "fuse_cache_write", "fuse_allreduce_norm"})


def optional_passes(backend: str, device: str, skip=(), opt_in=()) -> frozenset[str]:
    """The optional passes a build for `backend` on `device` runs: those that help there, with those of `opt_in` (of
    OPT_IN) that can run there, less `skip`."""
    on = set(DEFAULT_PASSES)
    if attention_wanted(backend, device):
        on |= GPU_PASSES | (OPT_IN - {"fuse_allreduce_norm"}) & set(opt_in)
    if "fuse_allreduce_norm" in opt_in and allreduce_wanted(backend, device):
        on.add("fuse_allreduce_norm")
    return frozenset(on - set(skip))


@dataclass
class Partition:
    gm: GraphModule                      # the rank-agnostic local graph (shapes are local, collectives inside)
    plan: ShardPlan                      # final placements (kv-replicated parameters have fewer ways)
    propagation: Propagation
    changes: dict = field(default_factory=dict)  # pass name -> what it changed


def settle(gm: GraphModule, plan: ShardPlan) -> tuple[Propagation, list, list]:
    """Propagate until the plan is consistent: state buffers take the placement written into them,
    parameters whose heads are fewer than tp are cut into fewer ways (plan.placements is updated).
    Returns (propagation, kv replications, state placements)."""
    replicated_kv, state = [], []
    state_fqns = {f for f, s in plan.styles.items() if s == "state"}
    for _ in range(2 * len(plan.placements) + 1):
        try:
            return propagate_placements(gm, plan.placements, plan.tp, state_fqns), replicated_kv, state
        except NeedPlacement as e:
            plan.placements[e.fqn] = e.placement
            state.append((e.fqn, str(e.placement)))
        except NeedFewerWays as e:
            fqns = e.origins
            if not fqns:
                raise ShardingError(f"{e.node.format_node()}: size {e.size} cannot be cut into {e.ways} pieces") from None
            with_fewer_ways(plan, fqns, e.size, e.part)
            replicated_kv.append((e.node.name, sorted(fqns), e.size))
    raise ShardingError("placements did not settle")


def partition(gm: GraphModule, plan: ShardPlan, group_name: str, passes: frozenset = frozenset()) -> Partition:
    """Rewrite `gm` in place into the graph every rank runs. passes: the OPTIONAL ones to run here
    (fuse_allreduce_norm, decode_attention, rope_into_attention, fuse_cache_write, share_attention_mask;
    `optional_passes` picks them for a backend and device)."""
    rowwise = {f for f, s in plan.styles.items() if s == "rowwise"}
    changes = {"split_rowwise_bias": plan.applied.get("split_rowwise_bias", []) + split_rowwise_bias(gm, rowwise)}
    prop, replicated_kv, state = settle(gm, plan)
    changes["replicate_kv_heads"] = replicated_kv
    changes["place_state"] = state
    changes["propagate_placements"] = {
        "sharded_values": sum(1 for p in prop.placements.values() if str(p) != "R"),
        "fallbacks": [n.name for n in prop.fallbacks]}
    changes["rewrite_shapes"] = rewrite_shapes(gm, prop.rewrites)
    changes["insert_collectives"] = insert_collectives(gm, prop.redistributes, plan.tp, group_name)
    changes["mask_vocab_lookup"] = mask_vocab_lookup(gm, plan)
    if "fuse_allreduce_norm" in passes:
        changes["fuse_allreduce_norm"] = fuse_allreduce_norm(gm)
    if "decode_attention" in passes:
        changes["decode_attention"] = decode_attention(gm)
    if "rope_into_attention" in passes:
        changes["rope_into_attention"] = rope_into_attention(gm)
    if "fuse_cache_write" in passes:
        changes["fuse_cache_write"] = fuse_cache_write(gm)
    if "share_attention_mask" in passes:
        changes["share_attention_mask"] = share_attention_mask(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Partition(gm, plan, prop, changes)

