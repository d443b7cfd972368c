"""A decode step's writes of k and v into their caches as one op, k rotated first (RoPE) where tables are given;
what the pass fuse_cache_write puts into decode graphs:

    torch.ops.tpcompile.write_kv(k_cache, v_cache, k, v, positions[, cos, sin]) -> None, writes both caches

    k_cache, v_cache (B, Hkv, S, D); k, v (B, Hkv, 1, D); positions (B, 1) integers in [0, S): row b's new key
    and value go to slot positions[b] of its cache rows, k_cache[b, :, positions[b]] = k[b, :, 0] (the same for v);
    cos, sin (B or 1, 1, 1, D): k is rotated first, k * cos + rotate_half(k) * sin, in float32, then rounded to the
    cache's dtype (kernels/decode_attention.rotated).

Reference (any device): each written by indexing (index_put_), as the graph wrote them. On a GPU with triton:
kv_store.py, one kernel for both caches. Registered as a torch.library.triton_op that mutates both caches, so
Inductor and AOTInductor compile the kernel into the engine and order the cache's readers after it; without triton,
a custom op that runs the reference.
"""
import importlib.util

import torch
from torch import Tensor

from tpcompile.kernels.decode_attention import unit_last, rotated

NAME = "tpcompile::write_kv"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor | None = None,
              sin: Tensor | None = None) -> None:
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k = k if cos is None else rotated(k, cos, sin)
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache[rows, :, positions] = new.transpose(1, 2).to(cache.dtype)


def _op(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor | None = None,
        sin: Tensor | None = None) -> None:
    if k.device.type != "cuda":
        return reference(k_cache, v_cache, k, v, positions, cos, sin)
    from tpcompile.kernels.kv_store import launch
    tables = (None, None) if cos is None else (unit_last(cos), unit_last(sin))
    launch(k_cache, v_cache, unit_last(k), unit_last(v), positions, *tables)


if HAS_TRITON:
    write_kv = torch.library.triton_op(NAME, _op, mutates_args={"k_cache", "v_cache"})
else:
    write_kv = torch.library.custom_op(NAME, reference, mutates_args={"k_cache", "v_cache"})
    write_kv.register_fake(lambda k_cache, v_cache, k, v, positions, cos=None, sin=None: None)
