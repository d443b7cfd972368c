"""One row times a weight matrix, optionally through a gated MLP's activation first; what the pass
one_row_linear puts into decode graphs of one row:

    torch.ops.tpcompile.row_linear(x, w, up, config) -> y (..., N)

    x (..., K) holding one row; w (N, K); up None, or like x: then the row is silu(x) * up;
    config [BLOCK_N, BLOCK_K, num_warps, num_stages], the kernel's launch settings (the pass tunes them).

Reference (any device): linear(silu(x) * up, w), or linear(x, w), the ops the pass replaced. On a GPU with triton:
gemv.py, one kernel that reads w once near the copy rate and makes the activation inside. Registered as a
torch.library.triton_op there, so Inductor and AOTInductor compile the kernel into the engine; without triton it
is a plain custom op that runs the reference.
"""
import importlib.util

import torch
from torch import Tensor

NAME = "tpcompile::row_linear"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEFAULT = (4, 2048, 4, 1)  # the launch settings where none were tuned (BLOCK_N, BLOCK_K, num_warps, num_stages)


def reference(x: Tensor, w: Tensor, up: Tensor | None, config: list[int]) -> Tensor:
    return torch.nn.functional.linear(torch.nn.functional.silu(x) * up if up is not None else x, w)


def _op(x: Tensor, w: Tensor, up: Tensor | None, config: list[int]) -> Tensor:
    if x.device.type != "cuda":
        return reference(x, w, up, config)
    from tpcompile.kernels.gemv import launch
    return launch(x.contiguous(), w.contiguous(), up.contiguous() if up is not None else None, tuple(config))


if HAS_TRITON:
    row_linear = torch.library.triton_op(NAME, _op, mutates_args=())
else:
    row_linear = torch.library.custom_op(NAME, reference, mutates_args=())
    row_linear.register_fake(lambda x, w, up, config: x.new_empty(*x.shape[:-1], w.shape[0]))
