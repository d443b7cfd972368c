"""Attention of one query per row over a static KV cache, reading only the part of the cache the mask lets the
query see; what the pass decode_attention puts into decode graphs:

    torch.ops.tpcompile.decode_attention(q, k, v, mask, scale[, cos, sin]) -> y (B, Hq, 1, D)

    q (B, Hq, 1, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv));
    mask bool (B or 1, 1, 1, S), True where the key is seen; cos, sin (B or 1, 1, 1, D), given by the pass
    rope_into_attention: the query is q rotated first, q * cos + rotate_half(q) * sin (rotate_half(q) =
    cat(-q[..., D/2:], q[..., :D/2])), in float32 and rounded to q's dtype.

Reference (any device): scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=True), the op the pass
replaced, after `rotated` where cos and sin are given. On a GPU with triton: flash_decode.py, whose split kernel
reads k and v only of the slots the mask lets the query see, so a decode step reads the filled prefix of the cache,
not all of it. Registered as a torch.library.triton_op there, so Inductor and AOTInductor compile its kernels into
the engine (no Python call at run time); without triton it is a plain custom op that runs the reference.
"""
import importlib.util

import torch
from torch import Tensor

NAME = "tpcompile::decode_attention"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cos: Tensor | None = None,
              sin: Tensor | None = None) -> Tensor:
    q = q if cos is None else rotated(q, cos, sin)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def rotated(q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, rotate-half form, in float32 (float64 for a float64 q), in q's dtype."""
    x = q.to(torch.promote_types(q.dtype, torch.float32))
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).to(q.dtype)


def _op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cos: Tensor | None = None,
        sin: Tensor | None = None) -> Tensor:
    if q.device.type != "cuda":
        return reference(q, k, v, mask, scale, cos, sin)
    from tpcompile.kernels.flash_decode import launch
    tables = {} if cos is None else {"cos": unit_last(cos), "sin": unit_last(sin)}
    return launch(unit_last(q), unit_last(k), unit_last(v), mask, scale, **tables)


def unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


if HAS_TRITON:
    decode_attention = torch.library.triton_op(NAME, _op, mutates_args=())
else:
    decode_attention = torch.library.custom_op(NAME, reference, mutates_args=())
    decode_attention.register_fake(lambda q, k, v, mask, scale, cos=None, sin=None: torch.empty_like(q))
