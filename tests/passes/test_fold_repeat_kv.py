"""fold_repeat_kv on transformers' own repeat_kv (expand + reshape of the kv heads before a masked SDPA): the copy is
gone, attention reads the kv heads with enable_gqa, and the outputs equal the unfolded graph's."""
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from tpcompile.capture import capture
from tpcompile.passes.fold_repeat_kv import fold_repeat_kv

aten = torch.ops.aten


class Attention(torch.nn.Module):
    def __init__(self, n_rep: int):
        super().__init__()
        self.n_rep = n_rep

    def forward(self, q, k, v, mask):  # q (B, H, T, D); k, v (B, KV, S, D); mask (B, 1, T, S)
        return F.scaled_dot_product_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), attn_mask=mask)


def inputs(heads=8, kv=2, T=3, S=11, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 1, T, S, generator=g) > 0.3
    mask[..., 0] = True  # no empty row
    return (torch.randn(2, heads, T, D, generator=g), torch.randn(2, kv, S, D, generator=g),
            torch.randn(2, kv, S, D, generator=g), mask)


def test_the_copy_of_the_kv_heads_is_folded_into_attention():
    gm = capture(Attention(4), inputs())
    want = [gm(*inputs(seed=s)) for s in (1, 2)]
    changed = fold_repeat_kv(gm)
    assert len(changed) == 1
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.expand.default not in ops
    (sdpa,) = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert sdpa.kwargs["enable_gqa"] is True and sdpa.args[1].op == "placeholder"
    for s, w in zip((1, 2), want):
        torch.testing.assert_close(gm(*inputs(seed=s)), w, rtol=1e-6, atol=1e-6)


def test_no_repetition_no_change():
    gm = capture(Attention(1), inputs(heads=2, kv=2))
    assert fold_repeat_kv(gm) == []
