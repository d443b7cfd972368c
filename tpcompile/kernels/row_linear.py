"""One row times a weight matrix, with what a decode step does around such a product made in the same kernel; what
the passes one_row_linear and fuse_norm_residual put into decode graphs of one row:

    torch.ops.tpcompile.row_linear(x, w, up, norm, eps, residual, config) -> y (..., N)

    x (..., K) holding one row; w (N, K);
    up None, or like x: the row is silu(x) * up (a gated MLP's down projection);
    norm None, or (K,): the row is rms_norm(x, norm, eps) (not with up);
    residual None, or (..., N): added to the product;
    config [BLOCK_N, BLOCK_K, num_warps, num_stages], the kernel's launch settings (the passes tune them).

Reference (any device): the ops the passes replaced, rms_norm / silu * up, linear, add. On a GPU with triton:
gemv.py, one kernel that reads w once near the copy rate. Registered as a torch.library.triton_op there, so
Inductor and AOTInductor compile the kernel into the engine; without triton it is a plain custom op that runs the
reference.
"""
import importlib.util

import torch
from torch import Tensor

NAME = "tpcompile::row_linear"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEFAULT = (4, 2048, 4, 1)  # the launch settings where none were tuned (BLOCK_N, BLOCK_K, num_warps, num_stages)


def reference(x: Tensor, w: Tensor, up: Tensor | None, norm: Tensor | None, eps: float, residual: Tensor | None,
              config: list[int]) -> Tensor:
    F = torch.nn.functional
    if norm is not None:
        x = F.rms_norm(x, [x.shape[-1]], norm, eps)
    y = F.linear(F.silu(x) * up if up is not None else x, w)
    return y + residual if residual is not None else y


def _op(x: Tensor, w: Tensor, up: Tensor | None, norm: Tensor | None, eps: float, residual: Tensor | None,
        config: list[int]) -> Tensor:
    if x.device.type != "cuda":
        return reference(x, w, up, norm, eps, residual, config)
    from tpcompile.kernels.gemv import launch

    def c(t):
        return t.contiguous() if t is not None else None
    return launch(x.contiguous(), w.contiguous(), c(up), tuple(config), c(norm), eps, c(residual))


if HAS_TRITON:
    row_linear = torch.library.triton_op(NAME, _op, mutates_args=())
else:
    row_linear = torch.library.custom_op(NAME, reference, mutates_args=())
    row_linear.register_fake(lambda x, w, up, norm, eps, residual, config: x.new_empty(*x.shape[:-1], w.shape[0]))
