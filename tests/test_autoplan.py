"""plan="auto": plans derived from the graph for decoders from transformers and from elsewhere, checked against
the models' own forward on real gloo workers; the layouts other TP systems trip on (fused qkv cut by parts,
GQA by expand + reshape with tp > kv heads, Conv1D addmm, tied and padded vocabularies)."""
import pytest
import torch
from torch import nn

import tpcompile
from tpcompile.autoplan import derive_plan
from tpcompile.build import preflight
from tpcompile.capture import capture
from tpcompile.placement import Shard
from tpcompile.plan import load_rules

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, use_cache=False)
ARCHS = {  # name -> (config class, model class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_kv2": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),        # q/k/v biases
    "mistral_kv2": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),  # fused qkv, gate_up
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",  # Conv1D addmm, fused c_attn, tied embeddings, vocab 101
             {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 16, "vocab_size": 101}),
}


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def hf_model(arch: str) -> nn.Module:
    cfg_cls, model_cls, over = ARCHS[arch]
    base = {"use_cache": False} if arch == "gpt2" else SMALL
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**base, **over})
    return Logits(getattr(transformers, model_cls)(cfg)).eval()


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 2), ("mistral_kv2", 4), ("phi3", 2), ("phi3", 4),
                                     ("gpt2", 2)])
def test_transformers_decoder_with_auto_plan_matches_its_own_forward(tmp_path, arch, tp):
    model = hf_model(arch)
    per_layer = arch == "llama"  # the API's per-block check, on one of them: every decoder layer on its own
    report = tpcompile.verify(model, (IDS,), tp=tp, plan="auto", out_dir=tmp_path, per_layer=per_layer)
    assert report.ok and report.max_rel_err <= 1e-5, report
    if per_layer:
        assert report.first_divergent is None and len(report.per_layer) == SMALL["num_hidden_layers"]
        assert all(r["ok"] and r["max_rel_err"] <= 1e-5 for r in report.per_layer.values())


def _auto(model, tp):
    pre = preflight(capture(model, (IDS,)), load_rules("auto"), tp=tp, itemsize=4)
    return pre.partition.plan, pre.partition.changes


def test_auto_plan_cuts_every_block_and_the_vocabulary():
    plan, changes = _auto(hf_model("qwen2"), tp=2)
    assert plan.notes == [] and changes["propagate_placements"]["fallbacks"] == []
    pl = plan.placements
    assert pl["model.model.layers.0.self_attn.q_proj.bias"] == Shard(0, 2)          # colwise bias cut like its weight
    assert pl["model.model.layers.1.self_attn.o_proj.weight"] == Shard(1, 2)
    assert pl["model.model.layers.1.mlp.down_proj.weight"] == Shard(1, 2)
    assert pl["model.model.embed_tokens.weight"] == pl["model.lm_head.weight"] == Shard(0, 2)
    assert changes["mask_vocab_lookup"] == ["embedding"]
    kinds = [k for k, *_ in changes["insert_collectives"]]
    assert kinds.count("all_reduce") == 1 + 2 * 2 and kinds.count("all_gather") == 1  # embedding, 2 per layer, logits


def test_fused_projections_are_cut_part_by_part():
    plan, changes = _auto(hf_model("phi3"), tp=2)
    assert plan.placements["model.model.layers.0.self_attn.qkv_proj.weight"] == Shard(0, 2, (32, 16, 16))
    assert plan.placements["model.model.layers.0.mlp.gate_up_proj.weight"] == Shard(0, 2, (64, 64))
    rewrites = [(name, old, new) for name, _, old, new in changes["rewrite_shapes"]]
    assert ("slice_3", 32, 16) in rewrites and ("slice_3", 48, 24) in rewrites  # k = qkv[32:48] -> [16:24]
    plan, changes = _auto(hf_model("gpt2"), tp=2)
    assert plan.placements["model.transformer.h.0.attn.c_attn.weight"] == Shard(1, 2, (32, 32, 32))  # Conv1D (in, out)
    assert plan.placements["model.transformer.h.0.attn.c_proj.weight"] == Shard(0, 2)
    assert plan.styles["model.transformer.h.0.attn.c_proj.bias"] == "replicate"     # added once, after the all-reduce
    assert len(changes["split_rowwise_bias"]) == 4
    assert plan.local_shape("model.lm_head.weight") == (51, 32)                     # tied, 101 padded to 102


def test_fused_qkv_with_fewer_kv_heads_than_ranks_replicates_only_the_kv_parts():
    plan, changes = _auto(hf_model("phi3"), tp=4)  # 4 q heads, 2 kv heads
    assert plan.placements["model.model.layers.0.self_attn.qkv_proj.weight"] == Shard(0, 4, (32, 16, 16), (4, 2, 2))
    assert plan.local_shape("model.model.layers.0.self_attn.qkv_proj.weight") == (8 + 8 + 8, 32)
    assert plan.notes == [] and changes["propagate_placements"]["fallbacks"] == []
    rewrites = [(name, old, new) for name, _, old, new in changes["rewrite_shapes"]]
    assert ("slice_3", 32, 8) in rewrites and ("slice_3", 48, 16) in rewrites  # q 8 wide, k 8 wide (1 of 2 heads)


def test_heads_not_divisible_by_tp_stay_replicated_with_the_numbers():
    # 6 heads over tp=4: the attention block stays whole, the reason names the numbers
    model = Logits(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "hidden_size": 48,
                                                                             "num_attention_heads": 6})))
    plan, _ = _auto(model, tp=4)
    assert plan.styles["model.model.layers.0.self_attn.q_proj.weight"] == "replicate"
    assert plan.styles["model.model.layers.0.mlp.up_proj.weight"] == "colwise"
    assert any("size 6" in n and "not divisible by tp=4" in n for n in plan.notes), plan.notes


def test_the_derived_plan_saves_as_a_rule_file_plan_accepts(tmp_path):
    gm = capture(hf_model("gpt2"), (IDS,))
    auto = derive_plan(gm, tp=2)
    auto.save(tmp_path / "gpt2.yaml")
    again, _ = _auto(hf_model("gpt2"), tp=2)
    pre = preflight(capture(hf_model("gpt2"), (IDS,)), load_rules(tmp_path / "gpt2.yaml"), tp=2, itemsize=4)
    assert pre.partition.plan.placements == again.placements


def test_a_model_from_outside_transformers(tmp_path):
    from tests.test_verify import GPTish
    torch.manual_seed(0)
    model = GPTish().eval()
    ids = torch.randint(0, 50, (2, 8))
    report = tpcompile.verify(model, (ids,), tp=2, plan="auto", out_dir=tmp_path)
    assert report.ok and report.max_rel_err <= 1e-5, report


def test_llama_8b_per_rank_parameter_bytes_at_tp4_are_a_quarter():
    from graphs.llama import Llama
    with torch.device("meta"):  # the Llama-3-8B shape (conf/model/llama_8b.yaml): no weights allocated
        model = Llama(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, tie_embeddings=False)
    ids = torch.zeros(1, 32, dtype=torch.long, device="meta")
    pre = preflight(capture(model, (ids,)), load_rules("auto"), tp=4, itemsize=2)
    plan = pre.partition.plan
    total = sum(torch.Size(s).numel() for f, s in plan.shapes.items() if f not in plan.extra)
    local = sum(torch.Size(plan.local_shape(f)).numel() for f in plan.shapes)
    assert abs(local / total - 0.25) < 0.03 * 0.25, local / total
    assert plan.notes == []


def test_the_report_prints_the_plan_and_each_collective_with_its_bytes_per_token():
    pre = preflight(capture(hf_model("qwen2"), (IDS,)), load_rules("auto"), tp=2, itemsize=4)
    report = pre.report()
    assert '- {match: "model.model.layers.*.self_attn.o_proj.weight", style: rowwise}' in report
    # 16 tokens; the residual stream is 32 floats = 128 B per token; logits 100 floats = 400 B per token
    assert "all_reduce x5 of 2x8x32: 128 B/token each" in report            # embedding + 2 per layer
    assert "all_gather x1 of 2x8x100: 400 B/token each" in report
    assert "left replicated" not in report
