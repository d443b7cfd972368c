"""decode_attention: which attention nodes it replaces (decode graphs of llama_tiny's graph and of transformers'
Mistral with a sliding window) and which it leaves (prefill, masks that differ per head); the rewritten decode
graph against the captured one on a filled cache; share_attention_mask, one mask for every layer's op; the Triton
kernels against the reference (SDPA in float64) in Triton's interpreter on the CPU and on a GPU, where the op also
runs compiled by Inductor and greedy generation of an artifact built with the pass equals a full recompute (skipped
without triton / CUDA)."""
import copy
import importlib.util
import math

import pytest
import torch
from torch.fx import GraphModule

from tpcompile.capture import capture
from tpcompile.kernels.decode_attention import reference
from tpcompile.passes import optional_passes
from tpcompile.passes.decode_attention import decode_attention, share_attention_mask
from tpcompile.runtime.generate import generation_inputs

ops = torch.ops.tpcompile
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
B, MAX_SEQ, VOCAB = 2, 40, 256


def llama(dtype=torch.float32):
    from graphs.llama import Llama
    torch.manual_seed(0)
    model = Llama(VOCAB, 64, 2, 4, 2, 128).to(dtype)
    model.setup_cache(B, MAX_SEQ, dtype)
    return model.eval()


def positions(filled: list[int]) -> torch.Tensor:
    return torch.tensor(filled)[:, None]


def prefill(model, lengths: list[int]) -> None:
    """Rows filled to `lengths` tokens through the model's own cached forward (pads at the scratch slot)."""
    T = max(lengths)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    pos = torch.stack([torch.cat([torch.full((T - n,), MAX_SEQ), torch.arange(n)]) for n in lengths])
    with torch.no_grad():
        model(ids, pos)


def test_the_decode_graph_attends_through_the_op_and_computes_what_it_did():
    """One op per layer in the decode graph, none in the prefill graph; on a filled cache (rows of different
    lengths) the rewritten graph gives the captured graph's logits bit for bit (on the CPU the op is SDPA)."""
    model = llama()
    prefill(model, [9, 30])
    decode = capture(model, (torch.zeros(B, 1, dtype=torch.long), positions([9, 30])))
    chunk = capture(model, (torch.zeros(B, 8, dtype=torch.long), torch.zeros(B, 8, dtype=torch.long)))
    assert decode_attention(chunk) == []
    before = copy.deepcopy(decode)
    changed = decode_attention(decode)
    assert len(changed) == 2
    targets = [n.target for n in decode.graph.nodes]
    assert targets.count(ops.decode_attention.default) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    ids = torch.tensor([[3], [77]])
    with torch.no_grad():
        want, got = before(ids, positions([9, 30])), decode(ids, positions([9, 30]))
    assert torch.equal(got, want)


def test_the_layers_read_one_copy_of_the_mask_made_once():
    """After decode_attention, share_attention_mask gives both layers' ops one node that makes the mask (Inductor's
    force_stride_order prim, contiguous), fed by the first layer's view of the step's mask (each layer views it
    itself, the same computation); the logits stay bit for bit."""
    model = llama()
    prefill(model, [9, 30])
    decode = capture(model, (torch.zeros(B, 1, dtype=torch.long), positions([9, 30])))
    assert share_attention_mask(decode) == []  # no op yet: nothing to share
    decode_attention(decode)
    before = copy.deepcopy(decode)
    masks = {n.args[3] for n in decode.graph.nodes if n.target == ops.decode_attention.default}
    changed = share_attention_mask(decode)
    assert len(masks) == 2  # each layer views the step's mask itself
    assert len(changed) == 1 and changed[0].endswith("(2 reads)")
    readers = [n for n in decode.graph.nodes if n.target == ops.decode_attention.default]
    once = {n.args[3] for n in readers}
    assert len(once) == 1 and len(readers) == 2
    (node,) = once
    assert node.target == torch.ops.prims.inductor_force_stride_order.default and node.args[0] in masks
    assert node.meta["val"].is_contiguous() and node.meta["val"].shape == node.args[0].meta["val"].shape
    ids = torch.tensor([[3], [77]])
    with torch.no_grad():
        want, got = before(ids, positions([9, 30])), decode(ids, positions([9, 30]))
    assert torch.equal(got, want)


def test_masks_read_from_a_tensor_written_between_the_layers_are_not_shared():
    """Two layers view a mask buffer the same way; when an op writes the buffer between them, the views hold
    different values and each layer keeps its own; without the write they are one."""
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, 4, 1, 8, generator=gen), torch.randn(B, 2, 6, 8, generator=gen), \
        torch.randn(B, 2, 6, 8, generator=gen)
    args = (q, k, v, torch.tensor([[True] * 3 + [False] * 3] * B)[:, None, :], torch.tensor([3, 4]))

    def layers(write: bool) -> GraphModule:
        g = torch.fx.Graph()
        nodes = [g.placeholder(n) for n in ("q", "k", "v", "seen", "pos")]
        qn, kn, vn, seen, pos = nodes
        for node, val in zip(nodes, args):
            node.meta["val"] = val
        ys = []
        for layer in range(2):
            if layer and write:  # this step's key becomes seen, in place
                rows = g.call_function(aten.arange.default, (B,))
                g.call_function(aten.index_put_.default, (seen, [rows, g.call_function(aten.zeros.default, ([B],),
                                {"dtype": torch.long}), pos], g.call_function(aten.scalar_tensor.default, (True,),
                                {"dtype": torch.bool})))
            mask = g.call_function(aten.unsqueeze.default, (seen, 1))
            mask.meta["val"] = args[3].unsqueeze(1)
            ys.append(g.call_function(ops.decode_attention.default, (qn, kn, vn, mask, 0.5)))
        g.output(g.call_function(aten.add.Tensor, tuple(ys)))
        return GraphModule(torch.nn.Module(), g)

    for write, shared in ((False, 1), (True, 0)):
        gm = layers(write)
        want = gm(*(a.clone() for a in args))
        assert len(share_attention_mask(gm)) == shared
        assert torch.equal(gm(*(a.clone() for a in args)), want)


def test_transformers_sliding_window_decode_graph_is_rewritten_with_its_window_mask():
    """transformers' Mistral (window 8) captured through the wrapper, GQA folded first: every layer's attention
    becomes the op, whose mask argument is the window mask the model built."""
    from transformers import MistralConfig, MistralForCausalLM

    from tpcompile.hf_model import CausalLM
    from tpcompile.passes.fold_repeat_kv import fold_repeat_kv
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    with torch.device("meta"):
        model = CausalLM(MistralForCausalLM(config))
        model.setup_cache(B, MAX_SEQ, torch.float32)
    gm = capture(model, generation_inputs(B, 1, MAX_SEQ, VOCAB)[1])
    assert len(fold_repeat_kv(gm)) == 2
    assert len(decode_attention(gm)) == 2
    nodes = [n for n in gm.graph.nodes if n.target == ops.decode_attention.default]
    assert all(n.args[3].meta["val"].shape == (B, 1, 1, MAX_SEQ + 1) for n in nodes)
    assert all(n.args[4] == pytest.approx(1 / math.sqrt(16)) for n in nodes)
    assert [c.endswith("(2 reads)") for c in share_attention_mask(gm)] == [True]  # one window mask for both


def test_attention_the_op_does_not_cover_is_left_alone():
    """Masks that differ per head, additive masks, causal attention and prefill stay SDPA."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 24, 16)
    for mask in (torch.ones(2, 4, 1, 24, dtype=torch.bool), torch.zeros(2, 1, 1, 24)):
        assert decode_attention(capture(Attend(), (q, k, k, mask))) == []
    assert len(decode_attention(capture(Attend(), (q, k, k, torch.ones(1, 1, 1, 24, dtype=torch.bool))))) == 1
    assert decode_attention(capture(Attend(), (torch.randn(2, 4, 3, 16), k, k,
                                               torch.ones(2, 1, 3, 24, dtype=torch.bool)))) == []


@pytest.mark.parametrize("name", ["decode_attention", "share_attention_mask", "one_row_linear"])
def test_the_gpu_passes_run_on_gpu_engines_only_and_can_be_skipped(name):
    """The passes on by default in GPU engines that call torch ops (one_row_linear's own tests are in
    test_one_row_linear.py)."""
    assert name in optional_passes("inductor_cudagraphs", "cuda")
    assert name in optional_passes("aoti", "cuda:0") and name in optional_passes("eager", "cuda")
    assert name not in optional_passes("inductor", "cpu") and name not in optional_passes("aoti", "cpu")
    assert name not in optional_passes("onnx", "cuda")
    assert name not in optional_passes("aoti", "cuda", skip=[name])


CASES = [  # B, Hq, Hkv, S, D, filled per row, splits, window
    (2, 8, 2, 200, 32, [5, 150], 3, None),
    (1, 4, 4, 129, 16, [128], 2, None),       # every slot seen; no GQA
    (3, 6, 2, 300, 24, [0, 299, 64], 4, 50),  # groups of 3, D not a power of two, sliding window, one key seen
    (2, 2, 1, 65, 8, [64, 20], 1, None),      # one split, D under a tensor core's 16
    (1, 8, 1, 517, 64, [516], 7, 100),        # more blocks than splits, uneven
    (2, 4, 2, 130, 16, [129, 129], 3, 1),     # idle rows: the scratch slot (the last) alone is seen
]


def run_case(case, dtype, device, op, hidden: float | None = None, rope: bool = False):
    """The op's output and the reference's (float64) for a case; `hidden`: the value of every k and v element of the
    slots the mask hides, as the op gets them (the reference gets the random ones), to show they are never read;
    `rope`: the op gets cos and sin tables (random, halves unequal; one per row, or one for all in the odd-length
    cases) and rotates q first."""
    b, hq, hkv, s, d, filled, splits, window = case
    gen = torch.Generator().manual_seed(hq * s + d)
    tables = {}
    if rope:
        rows = 1 if len(filled) % 2 else b
        tables = {name: torch.randn(rows, 1, 1, d, generator=gen).to(device) for name in ("cos", "sin")}
    q = torch.randn(b, hq, 1, d, generator=gen).to(dtype).to(device)
    k = torch.randn(b, s, hkv, d, generator=gen).to(dtype).to(device).transpose(1, 2)  # the cache's layout
    v = torch.randn(b, s, hkv, d, generator=gen).to(dtype).to(device).transpose(1, 2)
    slots, pos = torch.arange(s), torch.tensor(filled)[:, None]
    seen = (slots <= pos) & ((slots > pos - window) if window else True)
    mask = seen[:, None, None, :].to(device)
    ks, vs = k, v
    if hidden is not None:
        ks, vs = (x.masked_fill(~mask.transpose(-1, -2), hidden) for x in (k, v))
    got = op(q, ks, vs, mask, 1 / math.sqrt(d), splits, **tables)
    want = reference(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(d),
                     **{name: t.double() for name, t in tables.items()})
    return got, want


@pytest.mark.skipif(not HAS_TRITON, reason="Triton's interpreter needs triton")
def test_kernels_in_the_triton_interpreter_equal_the_reference(tmp_path):
    """float32 and float16 (the interpreter has no bfloat16), every case, in a process with TRITON_INTERPRET=1; again
    with NaN in every k and v element the mask hides: the kernel never reads them (a NaN read would reach the
    output through p * v even with p = 0)."""
    from tests.conftest import interpreted
    code = ("import torch, sys; from tests.passes.test_decode_attention import CASES, run_case; "
            "from tpcompile.kernels.flash_decode import launch\n"
            "for dtype in (torch.float32, torch.float16):\n"
            "    for case in CASES:\n"
            "        for hidden, rope in ((None, False), (float('nan'), False), (None, True)):\n"
            "            got, want = run_case(case, dtype, 'cpu', launch, hidden, rope)\n"
            "            tol = 2e-6 if dtype == torch.float32 else 2e-3\n"
            "            err = (got.double() - want).abs().max().item()\n"
            "            assert err <= tol, (case, dtype, hidden, rope, err)\n"
            "            print(case, dtype, hidden, rope, err)\n")
    assert interpreted(code).count("torch.float") == 2 * 3 * len(CASES)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernels need CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_the_gpu_equal_the_reference_eager_and_compiled(dtype):
    """bfloat16: within a rounding of the output (2^-8 relative) plus the bfloat16 softmax weights' (the same
    bound as torch's bfloat16 tolerance), and no further from float64 than twice torch's own SDPA in bfloat16."""
    from tpcompile.kernels.flash_decode import launch
    torch._dynamo.reset()  # one compile per case (static shapes), within dynamo's recompile limit
    compiled = torch.compile(lambda q, k, v, m, s, **tables: ops.decode_attention(q, k, v, m, s, **tables),
                             fullgraph=True, dynamic=False)
    for case in CASES:
        unpipelined = lambda q, k, v, m, s, splits, **t: launch(q, k, v, m, s, splits, stages=1, **t)  # noqa: E731
        through_inductor = lambda q, k, v, m, s, splits, **t: compiled(q, k, v, m, s, **t)  # noqa: E731
        for op, hidden, rope in ((launch, None, False), (through_inductor, None, False), (launch, None, True),
                                 (through_inductor, None, True), (launch, float("nan"), False),
                                 (unpipelined, float("nan"), True)):  # NaN where the mask hides: never read
            got, want = run_case(case, dtype, "cuda", op, hidden, rope)
            assert got.dtype == dtype and got.shape == want.shape
            if dtype == torch.float32:
                assert (got.double() - want).abs().max().item() <= 2e-6, case
                continue
            torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=2 ** -7, msg=str(case))
            sdpa, _ = run_case(case, dtype, "cuda", lambda q, k, v, m, s, splits, **t: reference(q, k, v, m, s, **t),
                               rope=rope)
            err, err_sdpa = ((x.double() - want).norm() / want.norm() for x in (got, sdpa))
            assert err <= 2 * err_sdpa + 1e-4, (case, err, err_sdpa)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernels need CUDA and triton")
def test_inductor_makes_the_layers_mask_once_with_share_attention_mask():
    """Inductor lowering llama_tiny's decode graph on the GPU: without share_attention_mask each layer's op gets its
    own buffer that makes the mask (Inductor copies a computed input of a Triton kernel per reader), with it one
    buffer serves both layers: one node fewer before fusion (counted there: fusion may merge the copies' kernels);
    the logits agree."""
    from torch._inductor import metrics

    from tpcompile.capture import retarget_device
    model = llama()
    prefill(model, [9, 30])
    ids, pos = torch.tensor([[3], [77]]), positions([9, 30])
    nodes, logits = {}, {}
    for share in (False, True):
        # a copy per capture: moving the graph to the GPU moves the parameters it shares with the module it traced
        gm = capture(copy.deepcopy(model), (torch.zeros(B, 1, dtype=torch.long), pos))
        decode_attention(gm)
        assert bool(share_attention_mask(gm)) if share else True
        retarget_device(gm, "cuda")
        gm = gm.to("cuda")
        gm.recompile()
        torch._dynamo.reset()
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
            logits[share] = torch.compile(gm, fullgraph=True, dynamic=False)(ids.cuda(), pos.cuda())
        nodes[share] = metrics.ir_nodes_pre_fusion
    assert nodes[False] > 0 and nodes[True] <= nodes[False] - 1, nodes
    torch.testing.assert_close(logits[True], logits[False])


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernels need CUDA and triton")
@pytest.mark.parametrize("backend, rope, one_row", [("inductor", False, False), ("aoti", False, False),
                                                    ("aoti", True, False), ("aoti", True, True)])
def test_gpu_artifact_with_the_op_decodes_what_a_full_recompute_does(backend, rope, one_row, job_config):
    """rope: with rope_into_attention and fuse_cache_write (backend.fuse_rope): q rotated in the op's kernel, k
    rotated and both caches written by write_kv's; one_row: an artifact of one row with fuse_norm_residual too (every
    fusion of a batch-1 decode step at once), each prompt alone."""
    from tests.test_generate import PROMPTS, recompute
    from tpcompile.api import Artifact
    from tpcompile.pipeline import build_generation, load_model
    from tpcompile.weights import materialize
    job = job_config(f"backend={backend}", "runtime.device=cuda", "tp=1", f"backend.fuse_rope={rope}",
                     *(["generation.max_batch=1", "backend.fuse_norm_residual=true"] if one_row else []))
    artifact = Artifact(build_generation(job).path)
    assert len(artifact.manifest.changes["decode"]["decode_attention"]) == 2
    for name in ("rope_into_attention", "fuse_cache_write"):
        assert len(artifact.manifest.changes["decode"].get(name, [])) == 2 * rope
    model = load_model(job, seq_len=job.generation.max_seq)
    ref = materialize(model.module, model.source, model.dtype)
    assert len(artifact.manifest.changes["decode"].get("fuse_norm_residual", [])) == (9 if one_row else 0)
    got = [artifact.generate([p], 24)[0] for p in PROMPTS] if one_row else artifact.generate(PROMPTS, 24)
    for row, prompt in enumerate(PROMPTS):
        assert got[row] == recompute(ref, prompt, 24)[0]
