"""The passes on tiny graphs in one process: what they rewrite, and that the rank graph computes the right
local values (checked against slices of the unsharded model's activations)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphs.llama import Llama
from tpcompile.build import GROUP_NAME, preflight
from tpcompile.capture import capture
from tpcompile.passes import ShardingError
from tpcompile.passes.rules.views import view_groups
from tpcompile.placement import Shard
from tpcompile.plan import PlanError, load_rules

MEGATRON = load_rules("megatron")
IDS = torch.zeros(2, 16, dtype=torch.long, device="meta")


def llama(**kw):
    cfg = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    with torch.device("meta"):
        return Llama(**{**cfg, **kw})


def test_view_groups_pair_split_and_merged_dims():
    assert view_groups((2, 16, 64), (2, 16, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert view_groups((2, 16, 4, 16), (2, 16, 64)) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert view_groups((2, 1, 4), (2, 4)) == [([0], [0]), ([1, 2], [1])]


def test_llama_tp2_rewrites_every_head_view_and_inserts_one_all_reduce_per_rowwise_layer():
    pre = preflight(capture(llama(), (IDS,)), MEGATRON, tp=2, itemsize=4)
    changes = pre.partition.changes
    rewrites = {name: new for name, _, old, new in changes["rewrite_shapes"]}
    # per layer: q view 4 -> 2 heads, k and v views 2 -> 1 kv heads, the attention output reshape 64 -> 32
    assert rewrites["view"] == [2, 16, 2, 16] and rewrites["view_1"] == [2, 16, 1, 16]
    assert rewrites["reshape"] == [2, 16, 32]
    assert len(changes["rewrite_shapes"]) == 8
    # wo and w_down in 2 layers, then the vocabulary-cut head's logits
    assert [kind for kind, *_ in changes["insert_collectives"]] == ["all_reduce"] * 4 + ["all_gather"]
    assert changes["replicate_kv_heads"] == [] and changes["propagate_placements"]["fallbacks"] == []
    assert pre.partition.plan.placements["layers.0.attn.wk.weight"] == Shard(0, 2)


def test_tp4_with_two_kv_heads_replicates_kv_heads_by_whole_heads():
    pre = preflight(capture(llama(), (IDS,)), MEGATRON, tp=4, itemsize=4)
    placements = pre.partition.plan.placements
    assert placements["layers.0.attn.wq.weight"] == Shard(0, 4)
    assert placements["layers.0.attn.wk.weight"] == Shard(0, 2)  # 2 whole kv heads, each on 2 ranks
    assert placements["layers.1.attn.wv.weight"] == Shard(0, 2)
    assert len(pre.partition.changes["replicate_kv_heads"]) == 4


def test_kv_heads_that_neither_divide_nor_are_divided_by_tp_are_refused():
    with pytest.raises(PlanError, match="tp=6"):  # 12 q heads split fine, 4 kv heads do not
        preflight(capture(llama(dim=96, n_heads=12, n_kv_heads=4, ffn_dim=192), (IDS,)), MEGATRON, tp=6, itemsize=4)


def test_heads_not_divisible_by_tp_name_the_sizes():
    with pytest.raises((ShardingError, PlanError), match="not divisible by tp=4"):
        preflight(capture(llama(dim=72, n_heads=6, n_kv_heads=6, ffn_dim=128), (IDS,)), MEGATRON, tp=4, itemsize=4)


def test_plan_errors_name_the_rule_and_the_parameter():
    gm = capture(llama(), (IDS,))
    with pytest.raises(PlanError, match=r"'nothing\.\*' -> colwise matches no parameter"):
        preflight(gm, load_rules({"nothing.*": "colwise"}), tp=2, itemsize=4)
    with pytest.raises(PlanError, match="layers.0.attn.wq.weight is matched by two rules"):
        preflight(gm, load_rules({"layers.*.attn.wq.weight": "colwise", "layers.0.*": "rowwise"}), tp=2, itemsize=4)
    with pytest.raises(PlanError, match=r"dim 0 of size 128 is not divisible by tp=3"):
        preflight(gm, load_rules({"layers.*.mlp.w_up.weight": "colwise"}), tp=3, itemsize=4)
    with pytest.raises(PlanError, match="unknown style 'diagonal'"):
        load_rules({"x": "diagonal"})
    with pytest.raises(PlanError, match="no such plan"):
        load_rules("no_such_plan")


class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_rowwise_bias_moves_after_the_reduction():
    pre = preflight(capture(Biased(), (torch.randn(3, 8),)),
                    load_rules({"fc1.*": "colwise", "fc2.weight": "rowwise"}), tp=2, itemsize=4)
    ch = pre.partition.changes
    assert len(ch["split_rowwise_bias"]) == 1
    (kind, producer, consumer), = ch["insert_collectives"]
    assert kind == "all_reduce"
    # the bias add consumes the reduced value, so b is added once
    add = next(n for n in pre.partition.gm.graph.nodes if n.name == consumer)
    assert add.target == torch.ops.aten.add.Tensor and "wait_tensor" in add.args[0].name


def test_unknown_op_on_a_sharded_value_falls_back_to_a_gather():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16, bias=False)

        def forward(self, x):
            return torch.cumsum(self.fc(x), dim=-1)

    pre = preflight(capture(Cumsum(), (torch.randn(3, 8),)), load_rules({"fc.weight": "colwise"}), tp=2, itemsize=4)
    assert pre.partition.changes["propagate_placements"]["fallbacks"] == ["cumsum"]
    assert [k for k, *_ in pre.partition.changes["insert_collectives"]] == ["all_gather"]
