"""compute_activation_once: which product inputs it makes once (llama_tiny's SiLU gate in a decode step, the GELU
of the MLP graph with a bias, through views) and which it leaves (prefill rows, inputs without a costly op, inputs
that are no elementwise computation); the rewritten graph against the captured one, bit for bit; on a GPU,
Inductor's kernels: without the pass the down projection's reduction kernel computes the SiLU, with it a pointwise
kernel does and no reduction does (skipped without CUDA and triton)."""
import copy
import importlib.util
import re

import pytest
import torch

from tpcompile.capture import capture
from tpcompile.passes import optional_passes
from tpcompile.passes.compute_once import compute_activation_once

B, MAX_SEQ, VOCAB = 1, 40, 256  # one row: the products Inductor makes its own reductions
PRIM = "inductor_force_stride_order"


def llama():
    from graphs.llama import Llama
    torch.manual_seed(0)
    model = Llama(VOCAB, 64, 2, 4, 2, 128)
    model.setup_cache(B, MAX_SEQ, torch.float32)
    return model.eval()


def step(tokens: int):
    """(ids, positions) of `tokens` new tokens per row after 5 filled slots."""
    ids = torch.randint(0, VOCAB, (B, tokens), generator=torch.Generator().manual_seed(2))
    return ids, torch.arange(5, 5 + tokens).expand(B, tokens).contiguous()


def test_a_decode_step_makes_each_layers_gate_once_and_computes_the_same():
    model = llama()
    gm = capture(model, step(1))
    before = copy.deepcopy(gm)
    changed = compute_activation_once(gm)
    assert len(changed) == 2 and all(c.endswith("(silu)") for c in changed)
    downs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default and "down" in str(n.args[1])]
    assert len(downs) == 2
    for down in downs:
        x = down.args[0]
        assert PRIM in str(x.target) and x.meta["val"].is_contiguous()
        assert x.args[0].target == torch.ops.aten.mul.Tensor  # silu(gate) * up, made once
    with torch.no_grad():
        assert torch.equal(gm(*step(1)), before(*step(1)))


def test_prefill_rows_and_cheap_or_non_elementwise_inputs_are_left():
    assert compute_activation_once(capture(llama(), step(9))) == []  # 9 rows: a matmul kernel, not a reduction
    two = llama()
    two.setup_cache(2, MAX_SEQ, torch.float32)
    assert compute_activation_once(capture(two, (torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 5)))) == []

    class Cheap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            y = self.a(torch.relu(x) * 2)                # elementwise, nothing costly
            y = self.b(torch.softmax(y, -1))              # costly, but a reduction: Inductor realizes it anyway
            return self.c(torch.layer_norm(y, [8]))       # not elementwise
    assert compute_activation_once(capture(Cheap().eval(), (torch.randn(1, 8),))) == []


def test_gelu_through_a_view_is_made_once():
    from graphs.mlp import MLP

    class Flat(torch.nn.Module):  # the MLP graph on a (1, 1, dim) input: its products read a view of the GELU
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mlp = MLP(16, 64)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.mlp.blocks[0].fc1(x)).reshape(1, 64)
            return self.mlp.blocks[0].fc2(h) + self.mlp(x.reshape(1, 16))
    x = torch.randn(1, 1, 16)
    gm = capture(Flat().eval(), (x,))
    before = copy.deepcopy(gm)
    changed = compute_activation_once(gm)
    assert len(changed) == 3 and all(c.endswith("(gelu)") for c in changed)
    with torch.no_grad():
        assert torch.equal(gm(x), before(x))


def test_the_pass_runs_on_gpu_compiled_engines_only_and_can_be_skipped():
    assert "compute_activation_once" in optional_passes("inductor_cudagraphs", "cuda")
    assert "compute_activation_once" in optional_passes("aoti_cudagraphs", "cuda:0")
    for backend, device in (("inductor", "cpu"), ("eager", "cuda"), ("onnx", "cuda"), ("tensorrt", "cuda")):
        assert "compute_activation_once" not in optional_passes(backend, device)
    assert "compute_activation_once" not in optional_passes("aoti", "cuda", skip=["compute_activation_once"])


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                    reason="Inductor's GPU kernels need CUDA and triton")
def test_inductor_computes_the_silu_in_a_pointwise_kernel_not_in_the_product():
    from torch._inductor.utils import run_and_get_code

    from tpcompile.capture import retarget_device
    ids, pos = step(1)
    kernels, logits = {}, {}
    for once in (False, True):
        gm = capture(llama(), step(1))
        assert bool(compute_activation_once(gm)) if once else True
        retarget_device(gm, "cuda")
        gm = gm.to("cuda")
        gm.recompile()
        torch._dynamo.reset()
        # coordinate-descent tuning on, as GPU engines build: a one-row product is then Inductor's own reduction
        with torch._inductor.config.patch(fx_graph_cache=False, coordinate_descent_tuning=True), torch.no_grad():
            logits[once], code = run_and_get_code(torch.compile(gm, fullgraph=True, dynamic=False),
                                                  ids.cuda(), pos.cuda())
        names = set(re.findall(r"def (triton_\w+)\(", "\n".join(code)))
        kernels[once] = {n for n in names if "silu" in n}
    reductions = {once: {n for n in k if n.startswith(("triton_red", "triton_per"))} for once, k in kernels.items()}
    assert reductions[False], kernels  # the product's reduction recomputes the gate
    assert not reductions[True] and any(n.startswith("triton_poi") for n in kernels[True]), kernels
    torch.testing.assert_close(logits[True], logits[False])
