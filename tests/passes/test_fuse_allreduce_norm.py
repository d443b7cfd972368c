"""fuse_allreduce_norm: which all-reduce -> add -> RMSNorm chains it fuses and which it leaves (rank graphs of
llama_tiny and of transformers' Llama, small hand-written blocks); the fused op's reference against the unfused
graph and against sums computed without collectives, on real gloo processes at tp 2 and 4; greedy generation of a
llama_tiny artifact with the pass applied at load against the unfused engine and a full recompute; the
peer-memory kernel against an fp32 rank-order sum on GPUs (skipped without CUDA)."""
import pytest
import torch
import torch.nn.functional as F

from tests.passes.handlers import BLOCKS, D, block_inputs
from tpcompile.build import preflight
from tpcompile.capture import capture
from tpcompile.passes.fuse_allreduce_norm import fuse_allreduce_norm, wanted
from tpcompile.plan import load_rules
from tpcompile.runtime.launcher import WorkerGroup

aten, c10d, ops = torch.ops.aten, torch.ops._c10d_functional, torch.ops.tpcompile


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def rank_graph(model, args, plan: str, tp: int = 2):
    return preflight(capture(model, args), load_rules(plan), tp, 4).partition.gm


def test_llama_rank_graph_every_all_reduce_is_fused():
    from graphs.llama import Llama
    from tpcompile.runtime.generate import generation_inputs
    with torch.device("meta"):
        model = Llama(256, 64, 2, 4, 2, 128)
        model.setup_cache(2, 32, torch.float32)
    gm = rank_graph(model, generation_inputs(2, 1, 32, vocab=None)[1], "megatron")
    changed = fuse_allreduce_norm(gm)
    # attention and MLP all-reduces of 2 blocks; the last one's sum reaches the final norm through a select
    assert [(op, norm) for op, _, norm in changed] == [
        ("all_reduce_add_rms_norm", "rms_norm_1"), ("all_reduce_add_rms_norm", "rms_norm_2"),
        ("all_reduce_add_rms_norm", "rms_norm_3"), ("all_reduce_add", "")]
    ts = targets(gm)
    assert c10d.all_reduce.default not in ts and ts.count(c10d.all_gather_into_tensor.default) == 1  # logits
    assert ts.count(aten.rms_norm.default) == 2  # the first block's (the embedding is not reduced) and the head's
    fused = [n for n in gm.graph.nodes if n.target == ops.all_reduce_add_rms_norm.default]
    assert [n.args[2].target for n in fused] == ["layers.0.mlp_norm.weight", "layers.1.attn_norm.weight",
                                                  "layers.1.mlp_norm.weight"]
    assert all(n.args[3:5] == (1e-5, False) for n in fused)
    assert fuse_allreduce_norm(gm) == []  # nothing left to fuse


def test_partition_runs_the_pass_when_asked():
    from graphs.llama import Llama
    from tpcompile.autoplan import resolve_rules
    from tpcompile.passes import partition
    from tpcompile.plan import make_plan
    with torch.device("meta"):
        model = Llama(256, 64, 2, 4, 2, 128)
    for fuse in (False, True):
        gm = capture(model, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
        rules, notes, applied = resolve_rules(gm, load_rules("megatron"), 2)
        part = partition(gm, make_plan(gm, rules, 2, notes, applied), "0",
                         frozenset({"fuse_allreduce_norm"}) if fuse else frozenset())
        assert len(part.changes.get("fuse_allreduce_norm", [])) == (4 if fuse else 0)
        assert targets(gm).count(c10d.all_reduce.default) == (0 if fuse else 4)


def test_transformers_rmsnorm_chain_is_fused_with_its_rounding():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits
    gm = rank_graph(Logits(), (torch.zeros(2, 8, dtype=torch.long, device="meta"),), "auto")
    reduces = targets(gm).count(c10d.all_reduce.default)
    changed = fuse_allreduce_norm(gm)
    assert len(changed) == 4 and all(op == "all_reduce_add_rms_norm" for op, _, _ in changed)
    assert targets(gm).count(c10d.all_reduce.default) == reduces - 4  # the embedding's, with no residual, stays
    assert targets(gm).count(aten.rsqrt.default) == 1                 # the first block's norm reads it
    fused = [n for n in gm.graph.nodes if n.target == ops.all_reduce_add_rms_norm.default]
    assert all(n.args[3:5] == (1e-6, True) for n in fused)


def block_graph(name: str):
    args = tuple(t.to("meta") for t in block_inputs(0, torch.float32))
    with torch.device("meta"):
        return capture(BLOCKS[name](), args)


@pytest.mark.parametrize("name,op", [("torch", "all_reduce_add_rms_norm"),
                                     ("torch_reduced_first", "all_reduce_add_rms_norm"),
                                     ("hf", "all_reduce_add_rms_norm"), ("no_norm", "all_reduce_add")])
def test_blocks_fuse(name, op):
    gm = block_graph(name)
    assert [c[0] for c in fuse_allreduce_norm(gm)] == [op]
    ts = targets(gm)
    assert c10d.all_reduce.default not in ts and aten.add.Tensor not in ts and aten.rsqrt.default not in ts
    assert aten.rms_norm.default not in ts


class Shared(torch.nn.Module):
    """The reduced value is used twice: the collective's output must stay."""

    def forward(self, x, residual):
        r = c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        h = residual + r
        return F.rms_norm(h, (D,), None, 1e-5), r * 2


class Broadcast(torch.nn.Module):
    """A residual of another shape (broadcast by the add): the op takes equal shapes only."""

    def forward(self, x, residual):
        return F.rms_norm(residual[:1] + c10d.wait_tensor(c10d.all_reduce(x, "sum", "0")), (D,))


class TwoDims(torch.nn.Module):
    """A norm over the last two dims: the all-reduce and add fuse, the norm stays."""

    def forward(self, x, residual):
        h = residual + c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        return F.rms_norm(h, h.shape[-2:])


@pytest.mark.parametrize("module,left", [(Shared, [c10d.all_reduce.default, aten.rms_norm.default]),
                                         (Broadcast, [c10d.all_reduce.default, aten.rms_norm.default]),
                                         (TwoDims, [ops.all_reduce_add.default, aten.rms_norm.default])])
def test_what_is_left(module, left):
    args = tuple(t.to("meta") for t in block_inputs(0, torch.float32))
    gm = capture(module(), args)
    fuse_allreduce_norm(gm)
    ts = targets(gm)
    assert all(t in ts for t in left) and ops.all_reduce_add_rms_norm.default not in ts


def test_policy():
    assert wanted("inductor_cudagraphs", "cuda") and wanted("eager", "cuda:1")
    assert not wanted("inductor", "cpu") and not wanted("aoti_cudagraphs", "cuda") and not wanted("onnx", "cuda")


def rank_sum(tp: int, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + sum of every rank's x, computed here in fp64 without any collective."""
    xs = [block_inputs(r, dtype, seed)[0].double() for r in range(tp)]
    residual = block_inputs(0, dtype, seed)[1].double()
    return residual + sum(xs), residual


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_fused_blocks_equal_unfused_under_gloo(tp):
    with WorkerGroup(tp=tp, handler="tests.passes.handlers:make_blocks", handler_args={}) as group:
        outs = {dtype: group.call("compare", {"dtype": dtype})[0] for dtype in ("float32", "bfloat16")}
    for dtype, out in outs.items():
        s, _ = rank_sum(tp, getattr(torch, dtype))
        # bf16: gloo rounds every partial sum of tp values of magnitude ~3 (ulp 2^-7 at 2..4)
        rtol, atol = (1e-6, 1e-6) if dtype == "float32" else (1e-2, tp * 2 ** -7)
        weight = torch.randn(D, generator=torch.Generator().manual_seed(7)).to(getattr(torch, dtype)).double()
        for name, rec in out.items():
            assert len(rec["ops"]) == 1, name
            for unfused, fused in zip(rec["unfused"], rec["fused"]):
                assert torch.equal(unfused, fused), (dtype, name)  # the reference is the unfused graph's ops
            if name == "no_norm":
                torch.testing.assert_close(rec["fused"][0].double(), s[:, -1] * 2, rtol=rtol, atol=2 * atol)
                continue
            torch.testing.assert_close(rec["fused"][1].double(), s, rtol=rtol, atol=atol)
            eps = 1e-6 if name == "hf" else 1e-5  # the norm of the sum, by hand in fp64
            normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight
            torch.testing.assert_close(rec["fused"][0].double(), normed, rtol=rtol, atol=4 * atol)


@pytest.mark.slow
def test_inductor_compiles_the_fused_op(tmp_path):
    """torch.compile traces the op through its fake implementation and calls it at run time (gloo, tp=2)."""
    with WorkerGroup(tp=2, handler="tests.passes.handlers:make_blocks", handler_args={},
                     env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}) as group:
        out = group.call("compare", {"dtype": "float32", "blocks": ["torch", "hf"], "compile": True},
                         timeout_s=600)[0]
    for name, rec in out.items():
        for fused, compiled in zip(rec["fused"], rec["compiled"]):
            torch.testing.assert_close(compiled, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_an_engine_file_with_the_op_loads_in_a_fresh_process(tmp_path):
    """The eager backend's engine file keeps the op; a process that imports the backend alone can load it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tpcompile.lower import eager
    gm = block_graph("torch")
    fuse_allreduce_norm(gm)
    args = tuple(t.to("meta") for t in block_inputs(0, torch.float32))
    (name,) = eager.lower(torch.export.export(gm, args), tmp_path, "engine")
    script = ("import sys, torch\nfrom tpcompile.lower import eager\n"
              "gm = torch.export.load(sys.argv[1]).module()\n"
              "print(sorted(str(n.target) for n in gm.graph.nodes if 'tpcompile' in str(n.target)))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "['tpcompile.all_reduce_add_rms_norm.default']"


PROMPTS = [[5, 17, 99, 3, 250, 7, 1], [42] * 20, [200, 1, 2]]  # one and two prefill chunks


def generate(group, prompts: list[list[int]], n: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens per prompt and the logits of every step (steps, rows, vocab), from an engine's worker group."""
    reply = group.call("generate_start", {"prompts": prompts, "max_new_tokens": n, "return_logits": True})[0]
    steps, logits = list(reply["tokens"]), list(reply["logits"])
    while not reply["done"]:
        reply = group.call("generate_step", {"n": n})[0]
        steps += reply["tokens"]
        logits += reply["logits"]
    return [list(row) for row in zip(*steps)], torch.stack(logits)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_fused_engine_generates_what_the_unfused_one_does(job_config, tp):
    """llama_tiny (eager, CPU, gloo): the pass applied to the loaded prefill and decode graphs; greedy tokens and
    logits equal the unfused engine's bit for bit and the tokens equal a full recompute of the unsharded model."""
    from tpcompile.api import Artifact
    from tpcompile.pipeline import build_generation, load_model
    from tpcompile.weights import materialize
    job = job_config(f"tp={tp}", "generation.max_seq=64")
    built = build_generation(job, log=lambda *_: None)
    n = 12
    with Artifact(built.path).session() as s:
        want_tokens, want_logits = s.generate(PROMPTS, n, return_logits=True, step_tokens=4)
    with WorkerGroup(tp=tp, handler="tests.passes.handlers:make_fused_engine",
                     handler_args={"artifact": str(built.path)}) as group:
        fused = group.call("fused")[0]["fused"]
        tokens, logits = generate(group, PROMPTS, n)
        ids = torch.tensor([PROMPTS[1][:16]] * 4)
        trip = group.call("round_trip", {"args": [ids, torch.arange(16).repeat(4, 1)]})[0]
    for graph in ("prefill", "decode"):  # 2 blocks: attention and MLP all-reduce each; the last one has no norm
        assert [op for op, _, _ in fused[graph]] == ["all_reduce_add_rms_norm"] * 3 + ["all_reduce_add"], fused
    assert tokens == want_tokens
    assert torch.equal(logits, torch.stack([torch.as_tensor(x) for x in want_logits]))
    assert trip["ops"] == ["tpcompile.all_reduce_add.default", "tpcompile.all_reduce_add_rms_norm.default"]
    assert torch.equal(trip["got"], trip["want"])
    model = load_model(job, seq_len=64)
    reference = materialize(model.module, model.source, model.dtype)
    with torch.no_grad():
        for prompt, got in zip(PROMPTS, tokens):
            seq = list(prompt)
            for _ in range(n):
                seq.append(int(reference(torch.tensor([seq]))[0, -1].argmax()))
            assert got == seq[len(prompt):]


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_triton() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(GPUS == 0 or not has_triton(), reason="the peer-memory kernel needs CUDA and triton")
@pytest.mark.parametrize("tp", [tp for tp in (1, 2, 4, 8) if tp <= max(GPUS, 1)])
def test_peer_memory_kernel_matches_a_rank_order_sum(tp):
    """On GPUs (NCCL): the sum bit-identical to an fp32 rank-order sum, the norm within a rounding of torch's, the
    same bits on every rank, also replayed from a CUDA graph; a message over the peer buffer runs the reference."""
    from tests.passes.handlers import KERNEL_CASES
    with WorkerGroup(tp=tp, handler="tests.passes.handlers:make_kernel_check", handler_args={}, device="cuda") as group:
        out = group.call("check", timeout_s=600)[0]
    for case, rec in zip(KERNEL_CASES + [("graph",)] * len(out["graph"]), out["cases"] + out["graph"]):
        assert "reason" not in rec, (case, rec)
        assert rec["sum_equal"] and rec["same_on_every_rank"], (case, rec)
        assert rec["normed_err"] <= 2 ** -7, (case, rec)  # one bf16 rounding of the largest value
    assert "over the" in out["too_large"] and out["fallback_equal"]
    assert out["late_rows"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not has_triton(), reason="Triton's interpreter needs triton")
@pytest.mark.parametrize("tp", [2, 4])
def test_peer_memory_kernel_protocol_in_the_triton_interpreter(tp, tmp_path):
    """The kernel run by Triton's interpreter on the CPU, one process per rank, peer buffers in shared files: sums
    exact against an fp32 rank-order sum, the same bits on every rank, over 12 calls of mixed sizes and dtypes (the
    rounds wrap around; each reset covers the previous call's size); the round advanced once per call."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.passes.handlers import INTERPRETED_CASES, interpreted_expected, peer_files
    repeats = 2
    for dtype in {c[2] for c in INTERPRETED_CASES}:
        peer_files(str(tmp_path), tp, dtype, create=True)
    code = "import sys; from tests.passes.handlers import interpreted_rank as r; r(*map(int, sys.argv[1:3]), " \
           "sys.argv[3], int(sys.argv[4]))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(tp), str(tmp_path), str(repeats)], cwd=REPO,
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(tp)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(tp)]
    for rep in range(repeats):
        for i, (_, _, dtype, upcast) in enumerate(INTERPRETED_CASES):
            normed, s = interpreted_expected(tp, rep, i)
            for out in outs:
                assert torch.equal(out[f"{rep}.{i}.s"], s), (rep, i)
                assert torch.equal(out[f"{rep}.{i}.s"], outs[0][f"{rep}.{i}.s"])
                if normed is not None:
                    got = out[f"{rep}.{i}.normed"].float()
                    assert (got - normed.float()).abs().max() <= 2 ** -7 * normed.float().abs().max(), (rep, i)
                    assert torch.equal(out[f"{rep}.{i}.normed"], outs[0][f"{rep}.{i}.normed"])
    calls = {d: repeats * sum(c[2] == d for c in INTERPRETED_CASES) for d in {c[2] for c in INTERPRETED_CASES}}
    for d, n in calls.items():  # [round, programs finished, elements to reset, rows that gave up]
        last = max(i for i, c in enumerate(INTERPRETED_CASES) if c[2] == d)
        rows, width = INTERPRETED_CASES[last][:2]
        assert outs[0][f"ctrl.{d}"].tolist() == [n % 3, 0, tp * rows * width, 0], d
