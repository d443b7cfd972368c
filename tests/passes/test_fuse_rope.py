"""The passes of backend.fuse_rope. rope_into_attention: in llama_tiny's decode graph (half-width tables, float32
inside) and transformers' Llama's (full-width tables) each layer's query rotation goes into its decode_attention
op and the logits stay those of the captured graph (the op's reference on the CPU); share_attention_mask makes
each table once for all layers; rotations the op does not compute, and queries with no rotation, are left alone.
fuse_cache_write: each layer's two cache writes become one write_kv, k's rotation inside; logits and caches after
a step equal the captured graph's, eagerly and compiled by Inductor (the attention reads the caches after the
write); writes it does not cover are left alone; its Triton kernel against the reference in Triton's interpreter
and on a GPU. The split kernel's rotation against the reference: test_decode_attention.py."""
import copy
import importlib.util

import pytest
import torch

from tests.passes.test_decode_attention import B, MAX_SEQ, VOCAB, llama, positions, prefill
from tpcompile.capture import capture
from tpcompile.passes import optional_passes
from tpcompile.passes.decode_attention import decode_attention, share_attention_mask
from tpcompile.passes.fold_repeat_kv import fold_repeat_kv
from tpcompile.passes.fuse_cache_write import fuse_cache_write
from tpcompile.passes.rope_into_attention import rope_into_attention

ops = torch.ops.tpcompile
aten = torch.ops.aten
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
IDS, POS = torch.tensor([[3], [77]]), positions([9, 30])


def attention_nodes(gm):
    return [n for n in gm.graph.nodes if n.target == ops.decode_attention.default]


def rewritten(gm, cache_write: bool = False):
    """A copy of gm after decode_attention, and gm after it, rope_into_attention[, fuse_cache_write] and
    share_attention_mask, with what the last ones changed."""
    decode_attention(gm)
    before = copy.deepcopy(gm)
    changed = rope_into_attention(gm), *([fuse_cache_write(gm)] if cache_write else []), share_attention_mask(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return before, gm, changed


def step(gm):
    """The logits of a decode step and the caches after it."""
    with torch.no_grad():
        return gm(IDS, POS), {name: t.clone() for name, t in gm.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_graph_rotates_q_in_the_op_and_computes_what_it_did(dtype):
    """Both layers' rotations of q go in (the half-width tables widened), the key's stays; the tables and the mask
    are made once for both layers; the logits are bit for bit those before, rows filled to different lengths."""
    model = llama(dtype)
    prefill(model, [9, 30])
    gm = capture(model, (torch.zeros(B, 1, dtype=torch.long), POS))
    chunks = sum(n.target == aten.chunk.default for n in gm.graph.nodes)
    before, gm, (rotated, shared) = rewritten(gm)
    assert [c.split(":")[1] for c in rotated] == [" rotation of transpose (half-width tables)",
                                                  " rotation of transpose_6 (half-width tables)"]
    assert sum(n.target == aten.chunk.default for n in gm.graph.nodes) == chunks - 2  # q's gone, k's kept
    assert len(shared) == 3 and all(s.endswith("(2 reads)") for s in shared)  # mask, cos, sin
    nodes = attention_nodes(gm)
    for i in (3, 5, 6):
        assert len({n.args[i] for n in nodes}) == 1
    cos = nodes[0].args[5]
    assert cos.meta["val"].shape == (B, 1, 1, 16) and cos.target == torch.ops.prims.inductor_force_stride_order.default
    with torch.no_grad():
        assert torch.equal(gm(IDS, POS), before(IDS, POS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_llama_graph_rotates_q_in_the_op_and_writes_the_caches_with_one(dtype):
    """transformers' rotate_half form, after fold_repeat_kv, rope_into_attention alone and with fuse_cache_write:
    float32 bit for bit (logits and caches); bfloat16, where the graph rounds each product to bfloat16 and the ops
    round once, within one rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tpcompile.hf_model import CausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = CausalLM(LlamaForCausalLM(config).to(dtype).eval())
    model.setup_cache(B, MAX_SEQ, dtype)
    prefill(model, [9, 30])
    gm = capture(model, (torch.zeros(B, 1, dtype=torch.long), POS))
    assert len(fold_repeat_kv(gm)) == 2
    only_q = copy.deepcopy(gm)
    before, only_q, (rotated, shared) = rewritten(only_q)
    assert len(rotated) == 2 and all(c.endswith("(full-width tables)") for c in rotated)
    assert sum(n.target == aten.neg.default for n in only_q.graph.nodes) == 2  # the key's rotation stays
    assert len(shared) == 3
    _, gm, (_, written, _) = rewritten(gm, cache_write=True)
    assert len(written) == 2 and aten.neg.default not in [n.target for n in gm.graph.nodes]
    (want, want_caches), (got_q, _), (got, got_caches) = step(before), step(only_q), step(gm)
    if dtype == torch.float32:
        assert torch.equal(got_q, want) and torch.equal(got, want)
        assert all(torch.equal(got_caches[n], want_caches[n]) for n in want_caches)
    else:
        for logits in (got_q, got):
            torch.testing.assert_close(logits, want, rtol=2 ** -7, atol=2 ** -7)
        for n in want_caches:
            torch.testing.assert_close(got_caches[n], want_caches[n], rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_graph_writes_both_caches_with_one_op_before_attention_reads_them(dtype):
    """Each layer's two index_put_ become one write_kv (k rotated in it), the tables made once for both ops of both
    layers; logits and caches after a step bit for bit those before; compiled by Inductor (the op's reference on
    the CPU, functionalized: the reads ordered after the write) within float rounding."""
    model = llama(dtype)
    prefill(model, [9, 30])
    gm = capture(model, (torch.zeros(B, 1, dtype=torch.long), POS))
    before, gm, (_, written, shared) = rewritten(gm, cache_write=True)
    assert written == [f"layers_{i}_attn_cache_k, layers_{i}_attn_cache_v: one write, k rotated" for i in (0, 1)]
    targets = [n.target for n in gm.graph.nodes]
    assert aten.index_put_.default not in targets and aten.chunk.default not in targets  # no rotation left either
    assert sorted(c.rsplit("(", 1)[1] for c in shared) == ["2 reads)", "4 reads)", "4 reads)"]  # mask; cos, sin
    writes = [n for n in gm.graph.nodes if n.target == ops.write_kv.default]
    assert len(writes) == 2 and len({n.args[5] for n in writes} | {n.args[5] for n in attention_nodes(gm)}) == 1
    compiled = copy.deepcopy(gm)
    (want, want_caches), (got, got_caches) = step(before), step(gm)
    assert torch.equal(got, want) and got_caches.keys() == want_caches.keys()
    assert all(torch.equal(got_caches[n], want_caches[n]) for n in want_caches)
    with torch.no_grad():
        logits = torch.compile(compiled, fullgraph=True, dynamic=False)(IDS, POS)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(logits, want, **tol)
    for name, t in compiled.named_buffers():
        torch.testing.assert_close(t, want_caches[name], **tol)


def test_exported_and_compiled_by_aotinductor_the_write_comes_before_the_reads(tmp_path):
    """The rewritten decode graph through torch.export and AOTInductor (as aoti engines are built, here on the CPU):
    the step's logits are those of the captured graph, which they are only if the attention reads the caches
    after write_kv (the step's own key and value are among those it sees)."""
    model = llama()
    prefill(model, [9, 30])
    gm = capture(model, (torch.zeros(B, 1, dtype=torch.long), POS))
    before, gm, (_, written, _) = rewritten(gm, cache_write=True)
    assert len(written) == 2
    want, _ = step(before)
    program = torch.export.export(gm, (IDS, POS))
    assert [n.target for n in program.graph.nodes].count(ops.write_kv.default) == 2
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "decode.pt2"))
    torch.testing.assert_close(torch._inductor.aoti_load_package(package)(IDS, POS), want, rtol=1e-5, atol=1e-5)


class Attend(torch.nn.Module):
    """One layer of one-query attention over given k, v, whose query is `rotate(x, cos, sin)`."""

    def __init__(self, rotate):
        super().__init__()
        self.rotate = rotate

    def forward(self, x, k, v, mask, cos, sin):
        return torch.nn.functional.scaled_dot_product_attention(self.rotate(x, cos, sin), k, v, attn_mask=mask)


def half(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def swapped(x, cos, sin):  # the second half with the first half's table product: no rotation
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * cos + x2 * sin], dim=-1)


def interleaved(x, cos, sin):  # GPT-J's pairs (x[2i], x[2i+1]): not the rotate-half form the op computes
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def test_what_is_not_a_rotate_half_rotation_is_left_alone():
    """Of four queries (rotate-half, a cross-wired one, GPT-J's interleaved pairs, none), the first only goes in;
    every graph computes what it did."""
    gen = torch.Generator().manual_seed(0)
    x, k = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 4, 24, 16, generator=gen)
    mask = torch.rand(2, 1, 1, 24, generator=gen) < 0.7
    cos, sin = torch.randn(2, 1, 1, 8, generator=gen), torch.randn(2, 1, 1, 8, generator=gen)
    args = (x, k, k.flip(2), mask, cos, sin)
    for rotate, found in ((half, 1), (swapped, 0), (interleaved, 0), (lambda x, c, s: x * c.sum(), 0)):
        gm = capture(Attend(rotate), args)
        assert len(decode_attention(gm)) == 1
        want = gm(*args)
        assert len(rope_into_attention(gm)) == found, rotate
        assert len(attention_nodes(gm)[0].args) == 5 + 2 * found
        torch.testing.assert_close(gm(*args), want, rtol=1e-6, atol=1e-6)


def test_rope_into_attention_is_asked_for_and_only_on_gpu_engines():
    assert "rope_into_attention" not in optional_passes("aoti", "cuda")  # opt-in
    assert "rope_into_attention" in optional_passes("aoti", "cuda", opt_in=["rope_into_attention"])
    assert "rope_into_attention" not in optional_passes("aoti", "cpu", opt_in=["rope_into_attention"])
    assert "rope_into_attention" not in optional_passes("onnx", "cuda", opt_in=["rope_into_attention"])


def test_what_is_not_one_new_slot_per_row_is_left_alone():
    """Writes that add into the cache (accumulate) are no plain writes: the graph keeps both index_put_; the same
    writes without accumulate become one write_kv; every graph computes what it did."""
    class Write(torch.nn.Module):
        def __init__(self, accumulate: bool):
            super().__init__()
            self.accumulate = accumulate
            self.register_buffer("kc", torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(1)))
            self.register_buffer("vc", torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(2)))

        def forward(self, q, k, v, pos, mask):
            rows = torch.arange(2)[:, None]
            kc = aten.index_put_(self.kc, [rows, None, pos], k.transpose(1, 2), self.accumulate)
            vc = aten.index_put_(self.vc, [rows, None, pos], v.transpose(1, 2), self.accumulate)
            return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 1, 8, generator=gen),
            torch.randn(2, 2, 1, 8, generator=gen), torch.tensor([[3], [11]]),
            torch.arange(12)[None, None, None, :] <= torch.tensor([3, 11])[:, None, None, None])
    for accumulate, found in ((True, 0), (False, 1)):
        module = Write(accumulate)
        gm = capture(module, args)
        assert len(decode_attention(gm)) == 1
        want = copy.deepcopy(gm)(*args)
        assert len(fuse_cache_write(gm)) == found, accumulate
        assert sum(n.target == aten.index_put_.default for n in gm.graph.nodes) == 2 * (1 - found)
        torch.testing.assert_close(gm(*args), want, rtol=1e-6, atol=1e-6)


WRITE_CASES = [  # B, Hkv, S, D, positions, RoPE tables: one per row, one for all, none
    (2, 4, 41, 16, [9, 40], "rows"),
    (1, 2, 17, 64, [0], "shared"),
    (3, 1, 9, 24, [8, 3, 5], None),       # D not a power of two
    (2, 8, 65, 128, [64, 1], "rows"),
]


def run_write(case, dtype, device, launch):
    """The caches after `launch` and after the reference, from the same random caches, k and v (views into one
    projection's output, as in a graph) and tables."""
    from tpcompile.kernels.write_kv import reference
    b, h, s, d, pos, tables = case
    gen = torch.Generator().manual_seed(s * d)
    caches = [torch.randn(b, h, s, d, generator=gen).to(dtype).to(device) for _ in range(2)]
    row = torch.randn(b, 1, 3 * h * d, generator=gen).to(dtype).to(device)
    k, v = (row[..., i * h * d:(i + 1) * h * d].view(b, 1, h, d).transpose(1, 2) for i in (0, 2))
    rope = {}
    if tables:
        rows = b if tables == "rows" else 1
        rope = {name: torch.randn(rows, 1, 1, d, generator=gen).to(device) for name in ("cos", "sin")}
    positions = torch.tensor(pos, device=device)[:, None]
    got, want = [c.clone() for c in caches], [c.clone() for c in caches]
    launch(*got, k, v, positions, rope.get("cos"), rope.get("sin"))
    reference(*want, k, v, positions, rope.get("cos"), rope.get("sin"))
    return got, want, caches


def check_write(got, want, before, dtype, case):
    """Equal to the reference (k rotated: within one rounding of the cache's dtype) and every other slot as it was."""
    tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for g, w, old in zip(got, want, before):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=str(case))
        new = torch.zeros_like(old, dtype=torch.bool)
        new[torch.arange(len(case[4]))[:, None], :, torch.tensor(case[4])[:, None]] = True
        assert torch.equal(g[~new], old[~new]), case


@pytest.mark.skipif(not HAS_TRITON, reason="Triton's interpreter needs triton")
def test_write_kernel_in_the_triton_interpreter_equals_the_reference():
    """float32 and float16 (the interpreter has no bfloat16), every case, in a process with TRITON_INTERPRET=1."""
    from tests.conftest import interpreted
    code = ("import torch; from tests.passes.test_fuse_rope import WRITE_CASES, run_write, check_write\n"
            "from tpcompile.kernels.kv_store import launch\n"
            "for dtype in (torch.float32, torch.float16):\n"
            "    for case in WRITE_CASES:\n"
            "        check_write(*run_write(case, dtype, 'cpu', launch), dtype, case)\n"
            "        print(case, dtype)\n")
    assert interpreted(code).count("torch.float") == 2 * len(WRITE_CASES)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernel needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kernel_on_the_gpu_equals_the_reference_eager_and_compiled(dtype):
    from tpcompile.kernels.kv_store import launch
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.write_kv(*a), fullgraph=True, dynamic=False)
    for case in WRITE_CASES:
        for fn in (launch, compiled):
            check_write(*run_write(case, dtype, "cuda", fn), dtype, case)


@pytest.mark.parametrize("max_batch, tp", [(1, 1), (2, 2)])
def test_the_decode_graph_a_gpu_build_compiles_has_every_layer_fused(job_config, max_batch, tp):
    """The passes a GPU build with backend.fuse_rope runs, on the graphs it captures (at one row, indexing writes
    each row's values through a view without its leading dims of 1) and on the rank graph at tp=2: in the decode
    graph each layer's rotation of q is in its attention and its writes are one write_kv; then at one row the
    products take their norms and residual adds: no index_put_, chunk or rms_norm is left. The prefill graph
    (chunks of several tokens) is left to Inductor."""
    from tpcompile.build import preflight
    from tpcompile.passes.one_row_linear import fuse_norm_residual, one_row_linear
    from tpcompile.pipeline import generation_graphs, load_model, rules_of
    job = job_config(f"tp={tp}", f"generation.max_batch={max_batch}", "backend=aoti_cudagraphs",
                     "backend.fuse_rope=true", "backend.fuse_norm_residual=true")
    passes = job.backend.passes("cuda")
    assert {"rope_into_attention", "fuse_cache_write"} <= passes
    graphs = generation_graphs(job, load_model(job, seq_len=job.generation.max_seq))
    changes = {name: preflight(g.gm, rules_of(job), tp, 4, passes).partition.changes for name, g in graphs.items()}
    assert [len(changes["decode"][p]) for p in ("rope_into_attention", "fuse_cache_write")] == [2, 2]
    assert not changes["prefill"].get("rope_into_attention") and not changes["prefill"].get("fuse_cache_write")
    gm = graphs["decode"].gm
    if max_batch == 1:
        one_row_linear(gm)
        fuse_norm_residual(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ops.write_kv.default) == 2 and targets.count(ops.decode_attention.default) == 2
    left = {aten.index_put_.default, aten.chunk.default} | ({aten.rms_norm.default} if max_batch == 1 else set())
    assert not left & set(targets)
