"""one_row_linear: which linears it replaces (llama_tiny's decode graph of one row, with and without fuse_linears,
and transformers' Llama's)
and which it leaves (prefill chunks, two rows, a bias); the rewritten graph against the captured one; the Triton
kernel against the reference (linear in float64) in Triton's interpreter on the CPU and on a GPU, eager and compiled,
and its tuning there; GPU artifacts of one row built with the pass decode what a full recompute does (the GPU tests
are skipped without triton / CUDA)."""
import copy
import importlib.util

import pytest
import torch

from tpcompile.capture import capture
from tpcompile.kernels.row_linear import reference
from tpcompile.passes import optional_passes
from tpcompile.passes.fuse_linears import fuse_linears
from tpcompile.passes.one_row_linear import fuse_norm_residual, one_row_linear

ops = torch.ops.tpcompile
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
VOCAB, MAX_SEQ, LAYERS = 256, 40, 2


def llama(batch: int):
    from graphs.llama import Llama, RMSNorm
    torch.manual_seed(0)
    model = Llama(VOCAB, 64, LAYERS, 4, 2, 128)
    model.setup_cache(batch, MAX_SEQ, torch.float32)
    for m in model.modules():  # norm weights that are not ones, so that a norm applied without them shows
        if isinstance(m, RMSNorm):
            m.weight.data = torch.rand(m.weight.shape) + 0.5
    return model.eval()


def decode_graph(batch: int = 1, tokens: int = 1):
    model = llama(batch)
    ids = torch.randint(0, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a filled cache, so that attention reads something
        model(ids, torch.arange(12).expand(batch, 12))
    return capture(model, (torch.zeros(batch, tokens, dtype=torch.long), torch.full((batch, tokens), 12)))


def linears(gm) -> int:
    return sum(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes)


def test_the_one_row_decode_graph_reads_every_weight_through_the_op_and_computes_what_it_did():
    """q, k, v, o, gate, up, down per layer and the head: 7 * 2 + 1 ops, the two down projections with the
    activation inside (no silu, no mul left); the logits bit for bit (on the CPU the op is the linear it replaced)."""
    gm = decode_graph()
    before = copy.deepcopy(gm)
    changed = one_row_linear(gm)
    assert len(changed) == 7 * LAYERS + 1 and linears(gm) == 0
    assert sum("silu(g) * u" in c for c in changed) == LAYERS
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ops.row_linear.default) == 7 * LAYERS + 1
    assert torch.ops.aten.silu.default not in targets
    gated = [n for n in gm.graph.nodes if n.target == ops.row_linear.default and n.args[2] is not None]
    assert [tuple(n.args[1].meta["val"].shape) for n in gated] == [(64, 128)] * LAYERS
    ids, pos = torch.tensor([[7]]), torch.tensor([[12]])
    with torch.no_grad():
        want, got = before(ids, pos), gm(ids, pos)
    assert torch.equal(got, want)


def test_after_fuse_linears_each_fused_weight_is_one_product():
    gm = decode_graph()
    shapes = {name: tuple(p.shape) for name, p in gm.named_parameters()}
    fused = fuse_linears(gm, shapes)
    assert len(fused) == 2 * LAYERS  # q/k/v and gate/up of each layer
    changed = one_row_linear(gm)
    assert len(changed) == 4 * LAYERS + 1
    assert sum(c.split(":")[1].startswith(" 128 x 64") for c in changed) == LAYERS  # q/k/v: 64 + 2 * 32 rows


def test_linears_of_more_than_one_row_or_with_a_bias_are_left_alone():
    """Two rows, a chunk of 8 tokens (whose head reads the last token only: one row, replaced), a bias."""
    assert one_row_linear(decode_graph(batch=2)) == []
    chunk = decode_graph(tokens=8)
    changed = one_row_linear(chunk)
    assert len(changed) == 1 and f"{VOCAB} x 64" in changed[0] and linears(chunk) == 7 * LAYERS

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.proj(x)
    gm = capture(Biased(), (torch.randn(1, 1, 16),))
    assert one_row_linear(gm) == [] and linears(gm) == 1


def count(gm, target) -> int:
    return sum(n.target == target for n in gm.graph.nodes)


def test_norms_and_residual_adds_go_into_the_op_and_the_graph_computes_what_it_did():
    """fuse_norm_residual after one_row_linear: q, k, v, gate, up and the head take their RMSNorm inside (5 per layer
    + 1), o and down their residual add (2 per layer); no norm is left and 2 adds per layer fewer; the logits within
    float32 rounding (the op's reference computes the norm with torch's rms_norm)."""
    gm = decode_graph()
    before = copy.deepcopy(gm)
    one_row_linear(gm)
    adds = count(gm, torch.ops.aten.add.Tensor)
    changed = fuse_norm_residual(gm)
    assert len(changed) == 7 * LAYERS + 1
    assert sum("rms_norm(" in c for c in changed) == 5 * LAYERS + 1
    assert sum(", + " in c or ": + " in c for c in changed) == 2 * LAYERS
    assert count(gm, torch.ops.aten.rms_norm.default) == 0
    assert count(gm, torch.ops.aten.add.Tensor) == adds - 2 * LAYERS
    ids, pos = torch.tensor([[7]]), torch.tensor([[12]])
    with torch.no_grad():
        want, got = before(ids, pos), gm(ids, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fuse_norm_residual(gm) == []  # nothing left to take in


def test_after_fuse_linears_each_fused_product_takes_its_norm_or_its_residual():
    gm = decode_graph()
    fuse_linears(gm, {name: tuple(p.shape) for name, p in gm.named_parameters()})
    one_row_linear(gm)
    changed = fuse_norm_residual(gm)
    assert len(changed) == 4 * LAYERS + 1
    assert sum("rms_norm(" in c for c in changed) == 2 * LAYERS + 1  # q/k/v and gate/up of each layer, the head
    assert count(gm, torch.ops.aten.rms_norm.default) == 0


def test_a_norm_read_by_another_op_stays_and_is_not_taken_in():
    """The norm's result also read by something else than the op: computing it twice would cost, so it stays."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(16, eps=1e-6)
            self.proj = torch.nn.Linear(16, 8, bias=False)

        def forward(self, x):
            n = self.norm(x)
            return self.proj(n), n * 2
    gm = capture(Block(), (torch.randn(1, 1, 16),))
    assert len(one_row_linear(gm)) == 1
    assert fuse_norm_residual(gm) == []


def test_at_tp_2_the_norms_go_in_and_the_adds_after_an_all_reduce_stay():
    """llama_tiny's rank graph at tp=2 (megatron plan), one row: o and down end in partial sums that are all-reduced
    before the residual add, so no add may go into them; every norm still does (the head's, read through a
    select of the last token, too)."""
    from graphs.llama import Llama
    from tpcompile.build import preflight
    from tpcompile.plan import load_rules
    from tpcompile.runtime.generate import generation_inputs
    with torch.device("meta"):
        model = Llama(VOCAB, 64, LAYERS, 4, 2, 128)
        model.setup_cache(1, MAX_SEQ, torch.float32)
    gm = preflight(capture(model, generation_inputs(1, 1, MAX_SEQ, vocab=None)[1]), load_rules("megatron"), 2,
                   4).partition.gm
    reduces = count(gm, torch.ops._c10d_functional.all_reduce.default)
    assert len(one_row_linear(gm)) == 7 * LAYERS + 1
    changed = fuse_norm_residual(gm)
    assert not any("+ " in c for c in changed)
    assert sum("rms_norm(" in c for c in changed) == 5 * LAYERS + 1
    assert count(gm, torch.ops._c10d_functional.all_reduce.default) == reduces == 2 * LAYERS


def test_fuse_norm_residual_is_asked_for_and_only_on_gpu_engines():
    """(one_row_linear runs on GPU engines by default: test_decode_attention.py's test of the GPU passes.)"""
    assert "fuse_norm_residual" not in optional_passes("aoti", "cuda")  # opt-in
    assert "fuse_norm_residual" in optional_passes("aoti", "cuda", opt_in=["fuse_norm_residual"])
    assert "fuse_norm_residual" not in optional_passes("aoti", "cpu", opt_in=["fuse_norm_residual"])


# n, k, what the op does around the product, config: rows and columns that the blocks do not divide, a K shorter
# than a block, one row per program
CASES = [(40, 96, "", (4, 64, 4, 1)), (37, 200, "gated", (8, 64, 4, 2)), (5, 33, "gated", (1, 128, 4, 1)),
         (64, 512, "", (16, 128, 8, 1)), (3, 1030, "gated", (2, 1024, 4, 1)), (40, 96, "normed", (4, 64, 4, 1)),
         (37, 1030, "normed residual", (8, 256, 4, 2)), (5, 200, "gated residual", (2, 128, 4, 1)),
         (64, 33, "residual", (16, 32, 4, 1))]


def run_case(case, dtype, device, op):
    """op(x, w, up, config, norm, eps, residual) (gemv.launch's order) against the float64 reference."""
    n, k, what, config = case
    gen = torch.Generator().manual_seed(n * k)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    x, w = t(1, 1, k, scale=3.0), t(n, k, scale=k ** -0.5)
    up = t(1, 1, k) if "gated" in what else None
    norm = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(device) if "normed" in what else None
    residual = t(1, 1, n) if "residual" in what else None
    got = op(x, w, up, config, norm, 1e-5, residual)
    d = torch.float64
    want = reference(x.to(d), w.to(d), up.to(d) if up is not None else None,
                     norm.to(d) if norm is not None else None, 1e-5, residual.to(d) if residual is not None else None, [])
    return got, want


@pytest.mark.skipif(not HAS_TRITON, reason="Triton's interpreter needs triton")
@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the GPU tests check the kernel itself (and triton 3.6's interpreter "
                                     "fails on a loop bound that is an argument, with NumPy 2)")
def test_kernel_in_the_triton_interpreter_equals_the_reference():
    """float32 and float16 (the interpreter has no bfloat16), every case, in a process with TRITON_INTERPRET=1: within
    float32 summation order, or a float16 rounding of the output."""
    from tests.conftest import interpreted
    code = ("import torch; from tests.passes.test_one_row_linear import CASES, run_case; "
            "from tpcompile.kernels.gemv import launch\n"
            "for dtype in (torch.float32, torch.float16):\n"
            "    for case in CASES:\n"
            "        got, want = run_case(case, dtype, 'cpu', launch)\n"
            "        assert got.dtype == dtype and got.shape == want.shape, (case, got.shape)\n"
            "        err = ((got.double() - want).abs() / (want.abs() + 1)).max().item()\n"
            "        assert err <= (1e-5 if dtype == torch.float32 else 2 ** -10), (case, dtype, err)\n"
            "        print(case, dtype, err)\n")
    assert interpreted(code).count("torch.float") == 2 * len(CASES)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernel needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_the_gpu_equals_the_reference_eager_and_compiled(dtype):
    """bfloat16: within a rounding of the output and no further from float64 than twice cuBLAS's bfloat16 product."""
    from tpcompile.kernels.gemv import launch
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, up, c, norm, eps, r: ops.row_linear(x, w, up, norm, eps, r, list(c)),
                             fullgraph=True, dynamic=False)
    for case in CASES:
        for op in (launch, compiled):
            got, want = run_case(case, dtype, "cuda", op)
            assert got.dtype == dtype and got.shape == want.shape
            if dtype == torch.float32:
                assert ((got.double() - want).abs() / (want.abs() + 1)).max().item() <= 1e-5, case
                continue
            torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=2 ** -7, msg=str(case))
            theirs, _ = run_case(case, dtype, "cuda", lambda x, w, up, c, norm, eps, r: reference(x, w, up, norm, eps,
                                                                                                  r, c))
            err, err_theirs = ((t.double() - want).norm() / want.norm() for t in (got, theirs))
            assert err <= 2 * err_theirs + 1e-4, (case, err, err_theirs)


@pytest.mark.skipif(not HAS_TRITON, reason="the candidates are the kernel's launch settings (needs triton)")
def test_tuning_has_candidates_for_every_row_length_and_keeps_those_measured_for_long_rows():
    """Short rows (the tests' models, K = 64) once left tune nothing to measure, and the pass wrote None on a GPU."""
    import triton

    from tpcompile.kernels.gemv import CANDIDATES, candidates
    shapes = {(n, warps, stages) for n, _, warps, stages in CANDIDATES}
    for k in (1, 16, 33, 64, 128, 1030, 2048, 4096, 5632, 14336):
        got = candidates(k)
        assert got and len(set(got)) == len(got), k
        assert all(block_k <= max(16, 2 * triton.next_power_of_2(k)) for _, block_k, _, _ in got), (k, got)
        assert {(n, warps, stages) for n, _, warps, stages in got} == shapes, k
    assert candidates(2048) == candidates(14336) == CANDIDATES
    assert candidates(64) == [(n, 128, warps, stages) for n, warps, stages in dict.fromkeys(
        (n, warps, stages) for n, _, warps, stages in CANDIDATES)]


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernel needs CUDA and triton")
def test_tuning_on_the_gpu_picks_a_candidate_and_the_pass_writes_it():
    from tpcompile.kernels.gemv import candidates, tune
    assert tune(256, 1024, True, torch.bfloat16, "cuda:0") in candidates(1024)
    assert tune(256, 1024, False, torch.bfloat16, "cuda:0", normed=True, residual=True) in candidates(1024)
    gm = decode_graph()
    changed = one_row_linear(gm, "cuda:0")
    assert len(changed) == 7 * LAYERS + 1
    assert len(fuse_norm_residual(gm, "cuda:0")) == 7 * LAYERS + 1
    products = [n for n in gm.graph.nodes if n.target == ops.row_linear.default]
    assert products and all(tuple(n.args[6]) in candidates(n.args[1].meta["val"].shape[1]) for n in products)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="the kernel needs CUDA and triton")
@pytest.mark.parametrize("backend", ["inductor", "aoti"])
@pytest.mark.parametrize("fuse", [False, True], ids=["", "fuse_norm_residual"])
def test_gpu_artifact_of_one_row_decodes_what_a_full_recompute_does(backend, fuse, job_config):
    """An artifact of one row (generation.max_batch=1): its decode graph reads every weight through the op (q/k/v,
    o, gate/up, down per layer, the head), with fuse_norm_residual every one of them takes its norm or its residual
    add in; greedy tokens equal a full recompute of the unsharded model."""
    from tests.test_generate import PROMPTS, recompute
    from tpcompile.api import Artifact
    from tpcompile.pipeline import build_generation, load_model
    from tpcompile.weights import materialize
    job = job_config(f"backend={backend}", "runtime.device=cuda", "tp=1", "generation.max_batch=1",
                     f"backend.fuse_norm_residual={fuse}")
    artifact = Artifact(build_generation(job).path)
    layers = len({f.split(".")[1] for f in artifact.manifest.params if f.startswith("layers.")})
    assert len(artifact.manifest.changes["decode"]["one_row_linear"]) == 4 * layers + 1
    assert len(artifact.manifest.changes["decode"].get("fuse_norm_residual", [])) == (4 * layers + 1 if fuse else 0)
    model = load_model(job, seq_len=job.generation.max_seq)
    ref = materialize(model.module, model.source, model.dtype)
    for prompt in PROMPTS:
        assert artifact.generate([prompt], 24)[0] == recompute(ref, prompt, 24)[0]


def test_transformers_llama_decode_graph_of_one_row_reads_every_weight_through_the_op():
    """transformers' Llama captured through the wrapper (on the meta device, as builds capture it; its SiLU
    activation module, its own linears): the same products as llama_tiny's graph, the gate read through the op."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tpcompile.hf_model import CausalLM
    from tpcompile.runtime.generate import generation_inputs
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = CausalLM(LlamaForCausalLM(config))
        model.setup_cache(1, MAX_SEQ, torch.float32)
    gm = capture(model, generation_inputs(1, 1, MAX_SEQ, VOCAB)[1])
    changed = one_row_linear(gm)
    assert len(changed) == 7 * LAYERS + 1 and linears(gm) == 0
    assert sum("silu(g) * u" in c for c in changed) == LAYERS
    assert torch.ops.aten.silu.default not in [n.target for n in gm.graph.nodes]
    # its RMSNorm is written out (float32 inside, rounded back): the same five norms per layer go in, and the head's
    changed = fuse_norm_residual(gm)
    assert sum("rms_norm(" in c for c in changed) == 5 * LAYERS + 1 and count(gm, torch.ops.aten.rsqrt.default) == 0
