"""Handler factories for tests/passes, built inside worker processes: "tests.passes.handlers:<name>".

    make_fused_engine   the real engine of an artifact, with fuse_allreduce_norm applied to its graphs at load
    make_blocks         small residual blocks with a real all-reduce, run unfused and fused on every rank
"""
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tpcompile.capture import capture
from tpcompile.passes.fuse_allreduce_norm import fuse_allreduce_norm
from tpcompile.runtime.engine import RankEngine

c10d = torch.ops._c10d_functional
D = 48


class FusedEngine(RankEngine):
    """RankEngine whose (eager) graphs are rewritten by fuse_allreduce_norm once loaded."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fused = {name: fuse_allreduce_norm(gm) for name, gm in self.graphs.items()}

    def handle(self, op: str, payload: dict) -> dict:
        if op == "fused":
            return {"fused": self.fused}
        if op == "round_trip":  # the fused prefill graph through torch.export save/load, run on the same inputs
            gm, args = self.graphs["prefill"], tuple(payload["args"])
            with torch.no_grad():
                want = gm(*args)
                program = torch.export.export(gm, args)
                path = Path(tempfile.mkdtemp()) / "fused.pt2"
                torch.export.save(program, path)
                loaded = torch.export.load(path).module()
                got = loaded(*args)
            ops = sorted({str(n.target) for n in loaded.graph.nodes if "tpcompile" in str(n.target)})
            return {"want": want, "got": got, "ops": ops} if self.rank == 0 else {}
        return super().handle(op, payload)


def make_fused_engine(*, rank: int, world_size: int, device, artifact: str) -> FusedEngine:
    return FusedEngine(rank=rank, world_size=world_size, device=device, artifact=artifact)


class TorchNorm(torch.nn.Module):
    """all-reduce -> add(residual) -> F.rms_norm; returns (normed, sum)."""

    def __init__(self, residual_first: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(D))
        self.residual_first = residual_first

    def forward(self, x, residual):
        r = c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        h = residual + r if self.residual_first else r + residual
        return F.rms_norm(h, (D,), self.weight, 1e-5), h


class HFNorm(torch.nn.Module):
    """all-reduce -> add(residual) -> transformers' LlamaRMSNorm; returns (normed, sum)."""

    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(D, eps=1e-6)

    def forward(self, x, residual):
        h = residual + c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        return self.norm(h), h


class NoNorm(torch.nn.Module):
    """all-reduce -> add(residual) -> the last token of the sum (no norm follows)."""

    def forward(self, x, residual):
        h = residual + c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        return h[:, -1] * 2


BLOCKS = {"torch": TorchNorm, "torch_reduced_first": lambda: TorchNorm(residual_first=False), "hf": HFNorm,
          "no_norm": NoNorm}


def block_inputs(rank: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial sums x (seeded by rank) and the residual every rank holds alike."""
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed * 100 + rank + 1))
    residual = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed * 100))
    return x.to(dtype), residual.to(dtype)


class Blocks:
    """op "compare": every block captured, run unfused and fused on this rank's inputs."""

    def __init__(self, rank: int, world_size: int, device: str):
        self.rank, self.world_size, self.device = rank, world_size, device

    def handle(self, op: str, payload: dict) -> dict:
        """compare: per block, the outputs unfused and fused (and compiled by Inductor, fused, with
        payload["compile"]) and what the pass fused."""
        if op != "compare":
            raise KeyError(f"Blocks has no op {op!r}")
        dtype = getattr(torch, payload["dtype"])
        out = {}
        for name in payload.get("blocks", BLOCKS):
            module = BLOCKS[name]().to(dtype)
            for p in module.parameters():  # a weight that is not all ones, the same on every rank
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
            args = block_inputs(self.rank, dtype)
            gm = capture(module, args)
            with torch.no_grad():
                rec = {"unfused": _listed(gm(*args)), "ops": fuse_allreduce_norm(gm)}
                rec["fused"] = _listed(gm(*args))
                if payload.get("compile"):
                    rec["compiled"] = _listed(torch.compile(gm, fullgraph=True, dynamic=False)(*args))
            out[name] = rec
        return out if self.rank == 0 else {}


def _listed(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def make_blocks(*, rank: int, world_size: int, device: str) -> Blocks:
    return Blocks(rank, world_size, device)


# (rows, D, dtype, norm): norm None is the plain all-reduce + add, False aten.rms_norm, True transformers' rounding
KERNEL_CASES = [(1, 4096, "bfloat16", False), (1, 4096, "bfloat16", True), (4, 1000, "bfloat16", None),
                (3, 64, "float32", False), (128, 4096, "bfloat16", False), (2, 8192, "float16", True),
                (1, 4096, "bfloat16", False)]


def kernel_inputs(rank: int, rows: int, d: int, dtype: str, seed: int, device) -> tuple:
    """This rank's x (seeded by rank), and the residual and weight every rank holds alike."""
    def randn(*shape, s):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s)).to(getattr(torch, dtype)).to(device)
    return randn(rows, d, s=1000 * seed + rank + 1), randn(rows, d, s=1000 * seed), randn(d, s=1000 * seed + 999)


class KernelCheck:
    """op "check": the peer-memory kernel (tpcompile/kernels/lamport.py) against allreduce_norm.rank_order, on
    this rank's GPU: per case, whether the sum is bit-identical, the norm's largest error, whether every rank got
    the same bits; then the same calls replayed from a CUDA graph with new inputs; then a message too large for
    the peer buffer, which the op runs as the reference."""

    def __init__(self, rank: int, world_size: int, device: str):
        import torch.distributed as dist
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cuda", torch.cuda.current_device())
        self.group = dist.group.WORLD.group_name

    def handle(self, op: str, payload: dict) -> dict:
        from tpcompile.kernels import lamport
        if op != "check":
            raise KeyError(f"KernelCheck has no op {op!r}")
        cases = [self.case(i, *c) for i, c in enumerate(KERNEL_CASES)]
        graph = self.replayed()
        x, residual, weight = kernel_inputs(self.rank, 129, 4096, "bfloat16", 99, self.device)  # 1 MiB + 8 KiB
        too_large = lamport.fused(x, residual, weight, 1e-5, False, self.group)
        fallback = torch.ops.tpcompile.all_reduce_add_rms_norm(x, residual, weight, 1e-5, False, self.group)
        from tpcompile.kernels.allreduce_norm import reference
        want = reference(x, residual, weight, 1e-5, False, self.group)
        late = lamport.workspace(self.group, torch.bfloat16, self.device).late_rows()
        return {"cases": cases, "graph": graph, "too_large": too_large, "late_rows": late,
                "fallback_equal": all(torch.equal(a, b) for a, b in zip(fallback, want))}

    def case(self, i: int, rows: int, d: int, dtype: str, norm) -> dict:
        from tpcompile.kernels import lamport
        from tpcompile.kernels.allreduce_norm import rank_order
        x, residual, weight = kernel_inputs(self.rank, rows, d, dtype, i, self.device)
        got = lamport.fused(x, residual, weight, 1e-5, norm, self.group)
        if isinstance(got, str):
            return {"reason": got}
        want = rank_order(x, residual, weight, 1e-5, norm, self.group)
        return self.compare(got, want)

    def compare(self, got, want) -> dict:
        rec = {"sum_equal": torch.equal(got[1], want[1]), "same_on_every_rank": True, "normed_err": 0.0}
        for mine in [t for t in got if t is not None]:
            gathered = torch.ops._c10d_functional.all_gather_into_tensor(mine.contiguous(), self.world_size, self.group)
            gathered = torch.ops._c10d_functional.wait_tensor(gathered).view(self.world_size, *mine.shape)
            rec["same_on_every_rank"] &= all(torch.equal(g, gathered[0]) for g in gathered)
        if got[0] is not None:
            scale = want[0].float().abs().max().item()
            rec["normed_err"] = (got[0].float() - want[0].float()).abs().max().item() / scale
        return rec

    def replayed(self) -> list[dict]:
        """Two calls captured in one CUDA graph (the round advances on the device), replayed with new inputs."""
        from tpcompile.kernels import lamport
        from tpcompile.kernels.allreduce_norm import rank_order
        a = kernel_inputs(self.rank, 1, 4096, "bfloat16", 50, self.device)
        b = kernel_inputs(self.rank, 8, 4096, "bfloat16", 51, self.device)
        for _ in range(2):  # compiled and launched once outside the capture
            lamport.fused(*a, 1e-5, False, self.group)
            lamport.fused(*b, 1e-5, True, self.group)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_a = lamport.fused(*a, 1e-5, False, self.group)
            out_b = lamport.fused(*b, 1e-5, True, self.group)
        recs = []
        for seed in range(60, 64):
            for static, new in ((a, kernel_inputs(self.rank, 1, 4096, "bfloat16", seed, self.device)),
                                (b, kernel_inputs(self.rank, 8, 4096, "bfloat16", seed + 10, self.device))):
                for t, n in zip(static, new):
                    t.copy_(n)
            graph.replay()
            recs.append(self.compare(out_a, rank_order(*a, 1e-5, False, self.group)))
            recs.append(self.compare(out_b, rank_order(*b, 1e-5, True, self.group)))
        return recs


def make_kernel_check(*, rank: int, world_size: int, device: str) -> KernelCheck:
    return KernelCheck(rank, world_size, device)


# The kernel's protocol on the CPU, under Triton's interpreter (TRITON_INTERPRET=1): one process per rank, each
# rank's peer buffer a shared file every process maps, so pushes land in the other processes' memory as over P2P.
INTERPRETED_CASES = [(1, 64, "bfloat16", False), (3, 100, "bfloat16", True), (2, 64, "float32", None),
                     (5, 32, "float16", False), (1, 64, "bfloat16", False), (4, 128, "bfloat16", True)]
INTERPRETED_MAX = 1024  # elements per rank and call


def peer_files(root: str, tp: int, dtype: str, create: bool = False) -> list[torch.Tensor]:
    """Every rank's buffer (3 rounds x tp x INTERPRETED_MAX), mapped from files under root; create: fill with the
    sentinel (-0.0)."""
    from tpcompile.kernels.lamport import INT, SENTINEL
    dt = getattr(torch, dtype)
    bufs = [torch.from_file(f"{root}/{dtype}{r}", shared=True, size=3 * tp * INTERPRETED_MAX, dtype=dt)
            for r in range(tp)]
    if create:
        for b in bufs:
            b.view(INT[dt]).fill_(SENTINEL[INT[dt]])
    return bufs


def interpreted_rank(rank: int, tp: int, root: str, repeats: int) -> None:
    """Run INTERPRETED_CASES `repeats` times as rank `rank`; save the outputs and control blocks to root."""
    from tpcompile.kernels import lamport
    bufs = {d: peer_files(root, tp, d) for d in {c[2] for c in INTERPRETED_CASES}}
    peers = {d: torch.tensor([b.data_ptr() for b in bufs[d]], dtype=torch.int64) for d in bufs}
    ctrls = {d: torch.zeros(4, dtype=torch.int32) for d in bufs}
    outs = {}
    for rep in range(repeats):
        for i, (rows, d, dtype, upcast) in enumerate(INTERPRETED_CASES):
            x, residual, weight = kernel_inputs(rank, rows, d, dtype, 10 * rep + i, "cpu")
            normed, s = lamport.launch(x, residual, weight, 1e-5, upcast, peers=peers[dtype].data_ptr(),
                                       buffer=bufs[dtype][rank], ctrl=ctrls[dtype], rank=rank, tp=tp)
            outs[f"{rep}.{i}.s"] = s
            if normed is not None:
                outs[f"{rep}.{i}.normed"] = normed
    outs.update({f"ctrl.{d}": c for d, c in ctrls.items()})
    torch.save(outs, f"{root}/out{rank}.pt")


def interpreted_expected(tp: int, rep: int, i: int) -> tuple:
    """What the kernel computes for case i of repeat rep, in torch ops; fp32 -> bf16 truncates, as the interpreter
    does (a GPU rounds to nearest even)."""
    rows, d, dtype, upcast = INTERPRETED_CASES[i]
    dt = getattr(torch, dtype)

    def down(t):
        if dt == torch.bfloat16:
            return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dt)
        return t.to(dt)
    xs = [kernel_inputs(r, rows, d, dtype, 10 * rep + i, "cpu")[0] for r in range(tp)]
    _, residual, weight = kernel_inputs(0, rows, d, dtype, 10 * rep + i, "cpu")
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    s = down(residual.float() + down(total).float())
    if upcast is None:
        return None, s
    f = s.float()
    y = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)
    return down(down(y).float() * weight.float() if upcast else y * weight.float()), s
