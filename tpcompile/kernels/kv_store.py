"""The Triton kernel behind torch.ops.tpcompile.write_kv (write_kv.py): program (row b, kv head h) loads k[b, h, 0]
and v[b, h, 0], rotates k when given cos and sin (as the decode-attention split kernel rotates q), and stores both
at slot positions[b] of their caches. One launch for both caches of a layer. Needs triton; imported only on a GPU.
"""
import triton
import triton.language as tl

from tpcompile.kernels.launching import wrapped


@triton.jit
def _store_kernel(K, V, KC, VC, P, C, SN, skb, skh, svb, svh, scb, sch, scs, sdb, sdh, sds, spb, scosb, ssinb,
                  H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    slot = tl.load(P + b * spb)
    k = tl.load(K + b * skb + h * skh + d, mask=ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + d, mask=ok, other=0.0)
    if ROPE:  # k * cos + rotate_half(k) * sin in float32
        half = d < D // 2
        turned = tl.load(K + b * skb + h * skh + tl.where(half, d + D // 2, d - D // 2), mask=ok,
                         other=0.0).to(tl.float32)
        cos = tl.load(C + b * scosb + d, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(SN + b * ssinb + d, mask=ok, other=0.0).to(tl.float32)
        k = k.to(tl.float32) * cos + tl.where(half, -turned, turned) * sin
    tl.store(KC + b * scb + h * sch + slot * scs + d, k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + b * sdb + h * sdh + slot * sds + d, v.to(VC.dtype.element_ty), mask=ok)


def launch(k_cache, v_cache, k, v, positions, cos=None, sin=None) -> None:
    """Shapes as write_kv's; k, v, the caches, cos and sin with unit stride along D."""
    B, H, _, D = k.shape
    rope = cos is not None
    cos, sin = (cos, sin) if rope else (k, k)  # not read without rope
    scosb, ssinb = (t.stride(0) if rope and t.shape[0] > 1 else 0 for t in (cos, sin))
    wrapped(_store_kernel)[(B * H,)](
        k, v, k_cache, v_cache, positions, cos, sin, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), positions.stride(0), scosb, ssinb, H, D, max(16, triton.next_power_of_2(D)), rope,
        num_warps=1)
