"""All-reduce, residual add and RMSNorm as one torch op, what fuse_allreduce_norm puts into rank graphs:

    torch.ops.tpcompile.all_reduce_add_rms_norm(x, residual, weight, eps, upcast, group_name)
        -> (rms_norm(s), s)  with s = residual + all_reduce_sum(x)
    torch.ops.tpcompile.all_reduce_add(x, residual, group_name) -> residual + all_reduce_sum(x)

The norm is over the last dim. upcast picks its arithmetic, the one the unfused graph had:
    False: aten.rms_norm(s, [D], weight, eps)                                 (torch.nn.functional.rms_norm)
    True:  weight * (f * rsqrt(mean(f ** 2, -1) + eps)).to(s.dtype), f = s.to(float32)   (transformers' RMSNorm)

Reference (any device, any process group): the functional all-reduce, the add and the norm, the very ops of the
unfused graph, so a graph with the fused op computes what it computed before, bit for bit.
On a GPU, under NCCL, with peer access between the ranks, a one-shot peer-memory kernel does all of it in one
launch (lamport.py). It sums in fp32 in rank order, so every rank gets the same bits; NCCL's bf16 ring sum differs
from it in the last bit. Where it cannot run, the reference runs, after one line on stderr saying why.
"""
import sys

import torch
from torch import Tensor

c10d = torch.ops._c10d_functional
_said: set[str] = set()  # fallback reasons already printed by this process


def reference(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float | None, upcast: bool | None,
              group_name: str) -> tuple[Tensor | None, Tensor]:
    """The unfused ops: (normed, s). upcast None: no norm (normed is None)."""
    reduced = c10d.wait_tensor(c10d.all_reduce(x, "sum", group_name))
    s = torch.add(residual, reduced)
    return (None if upcast is None else rms_norm(s, weight, eps, upcast)), s


def rank_order(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float | None, upcast: bool | None,
               group_name: str) -> tuple[Tensor | None, Tensor]:
    """What the peer-memory kernel computes, in torch ops: every rank's x gathered and summed in fp32 in rank
    order, rounded to x's dtype, then the reference's add and norm. (normed, s); for tests and benchmarks."""
    tp = torch._C._distributed_c10d._resolve_process_group(group_name).size()
    parts = c10d.wait_tensor(c10d.all_gather_into_tensor(x.contiguous(), tp, group_name)).view(tp, *x.shape)
    total = parts[0].float()
    for r in range(1, tp):
        total = total + parts[r].float()
    s = torch.add(residual, total.to(x.dtype))
    return (None if upcast is None else rms_norm(s, weight, eps, upcast)), s


def rms_norm(s: Tensor, weight: Tensor | None, eps: float | None, upcast: bool) -> Tensor:
    if not upcast:
        return torch.ops.aten.rms_norm.default(s, [s.shape[-1]], weight, eps)
    f = s.to(torch.float32)
    f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    f = f.to(s.dtype)
    return f if weight is None else weight * f


@torch.library.custom_op("tpcompile::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float | None, upcast: bool,
                            group_name: str) -> tuple[Tensor, Tensor]:
    fused = _on_peer_memory(x, residual, weight, eps, upcast, group_name)
    return fused if fused is not None else reference(x, residual, weight, eps, upcast, group_name)


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, upcast, group_name):
    s = torch.add(residual, x)  # shapes, dtypes and strides of the reference's outputs
    return rms_norm(s, weight, eps, upcast), s


@torch.library.custom_op("tpcompile::all_reduce_add", mutates_args=())
def all_reduce_add(x: Tensor, residual: Tensor, group_name: str) -> Tensor:
    fused = _on_peer_memory(x, residual, None, None, None, group_name)
    return fused[1] if fused is not None else reference(x, residual, None, None, None, group_name)[1]


@all_reduce_add.register_fake
def _(x, residual, group_name):
    return torch.add(residual, x)


def _on_peer_memory(x, residual, weight, eps, upcast, group_name) -> tuple | None:
    """The peer-memory kernel's (normed, s), or None after saying (once per reason) why it cannot run."""
    if x.device.type == "cuda":
        out = _kernel(x, residual, weight, eps, upcast, group_name)
    else:
        out = f"{x.device.type} tensors"
    if not isinstance(out, str):
        return out
    if out not in _said:
        _said.add(out)
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"tpcompile: fused all-reduce runs as all-reduce + add + norm: {out}", file=sys.stderr, flush=True)
    return None


def _kernel(x, residual, weight, eps, upcast, group_name) -> tuple | str:
    try:
        from tpcompile.kernels import lamport
    except ImportError as e:  # no triton
        return f"no peer-memory kernel ({e})"
    return lamport.fused(x, residual, weight, eps, upcast, group_name)
