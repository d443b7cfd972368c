"""The Triton kernels behind torch.ops.tpcompile.decode_attention (decode_attention.py): attention of one query
per row over the keys its mask lets it see, split across the GPU (flash-decoding), reading only blocks of the
cache that the mask lets it see.

    split kernel, program (row b, kv head, split i): the blocks i, i + splits, i + 2 * splits, ... of the S slots.
        It reads the mask of all its blocks first and runs from the first block with a seen key to the last. For
        each, it reads the block's mask again (now from cache), then k and v of the seen slots only, both loads at
        once (a slot the mask hides is never read, and no branch waits on the mask: a decode step of few filled
        slots is bound by such chains of loads, not by bytes). It computes, for the kv head's whole group of query
        heads at once (one read of k, v), the softmax numerator and denominator online (running max) and writes
        the normalised partial output and its log-sum-exp. Given cos and sin, it first rotates the q it loads
        (RoPE, rotate-half form): the step needs no kernel of its own for q's rotation.
    merge kernel, program (row b, query head): the splits' partials weighted by exp(lse - max lse).

Blocks are dealt round-robin, so a filled prefix of any length spreads over every split. Triton software-pipelines
the split kernel's loop over blocks (k and v copied ahead into shared memory): with STAGES = 3, 71.7 KB of shared
memory per program on sm_90 (2: 38.9 KB; 1, no pipelining: 22.5 KB, as compiled by triton 3.9), so fewer programs
fit on an SM than `splits_for` asks for when most have work; `launch(..., stages=)` and
`benchmarks/decode_attention.py --stages` measure the others. Needs triton; imported only on a GPU.
"""
import torch
import triton
import triton.language as tl

from tpcompile.kernels.launching import wrapped

BLOCK_N = 64  # cache slots per block
STAGES = 3  # the split kernel's num_stages (Triton's default on CUDA)
PER_SM = 4  # split programs per SM that `splits_for` aims at


@triton.jit
def _split_kernel(Q, K, V, M, O, L, C, SN, scale: tl.constexpr, S, HKV: tl.constexpr, G: tl.constexpr,
                  sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sms, scb, ssb,
                  D: tl.constexpr, SPLITS: tl.constexpr, PER_SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, kvh = bh // HKV, bh % HKV
    g, d, n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    g_ok, d_ok = g < G, d < D
    h = kvh * G + g
    q_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h[:, None] * sqh + d[None, :], mask=q_ok, other=0.0)
    if ROPE:  # q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q[D/2:], q[:D/2]), in float32, then q's dtype
        half = d < D // 2
        turned = tl.load(Q + b * sqb + h[:, None] * sqh + tl.where(half, d + D // 2, d - D // 2)[None, :],
                         mask=q_ok, other=0.0).to(tl.float32)
        cos = tl.load(C + b * scb + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(SN + b * ssb + d, mask=d_ok, other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * cos[None, :] + tl.where(half[None, :], -turned, turned) * sin[None, :]).to(q.dtype)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # the first and last of this program's blocks with a seen key, from one load of all their mask bytes: the
    # loop runs over those only (a long cache filled at its start costs no step per empty block)
    j = tl.arange(0, PER_SPLIT)
    cols = (split + j * SPLITS)[:, None] * BLOCK_N + n[None, :]
    live = tl.max(tl.load(M + b * smb + cols * sms, mask=cols < S, other=0).to(tl.int32), axis=1) > 0
    first = tl.min(tl.where(live, j, PER_SPLIT), axis=0)
    last = tl.max(tl.where(live, j + 1, 0), axis=0)
    for step in range(first, last):
        c = (split + step * SPLITS) * BLOCK_N + n
        visible = tl.load(M + b * smb + c * sms, mask=c < S, other=0) != 0
        # k and v of the seen slots only (a masked-off slot is not read), both loads in flight at once
        seen = visible[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + kvh * skh + c[:, None] * sks + d[None, :], mask=seen, other=0.0)
        v = tl.load(V + b * svb + kvh * svh + c[:, None] * svs + d[None, :], mask=seen, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(visible[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    row = (b * HKV * G + h) * SPLITS + split  # partials: (B, Hq, SPLITS, D) and (B, Hq, SPLITS), contiguous
    tl.store(O + row[:, None] * D + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(L + row, lse, mask=g_ok)


@triton.jit
def _merge_kernel(O, L, Y, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # (b, query head); Y (B, Hq, 1, D) contiguous
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_ok, d_ok = s < SPLITS, d < D
    lse = tl.load(L + bh * SPLITS + s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - top))
    part = tl.load(O + (bh * SPLITS + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    y = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(Y + bh * D + d, y.to(Y.dtype.element_ty), mask=d_ok)


def splits_for(rows: int, slots: int, device: torch.device, per_sm: int = PER_SM) -> int:
    """Splits per (row, kv head): about `per_sm` programs per SM in all, never more than the blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(slots, BLOCK_N), triton.cdiv(per_sm * sms, rows)))


def launch(q, k, v, mask, scale: float, splits: int | None = None, stages: int = STAGES, cos=None,
           sin=None) -> torch.Tensor:
    """q (B, Hq, 1, D), k and v (B, Hkv, S, D) with unit stride along D, mask bool (B or 1, 1, 1, S) -> (B, Hq, 1, D)
    in q's dtype; stages: the split kernel's num_stages; cos, sin (B or 1, 1, 1, D) with unit stride along D, or
    None: q is rotated first (RoPE, rotate-half form, D even). Runs the kernels directly or, under torch.compile /
    export, as wrapped Triton kernels."""
    B, HQ, _, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    G = HQ // HKV
    splits = splits or splits_for(B * HKV, S, q.device)
    per_split = triton.next_power_of_2(triton.cdiv(triton.cdiv(S, BLOCK_N), splits))
    partial = torch.empty((B, HQ, splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, HQ, splits), dtype=torch.float32, device=q.device)
    y = torch.empty((B, HQ, 1, D), dtype=q.dtype, device=q.device)
    smb = mask.stride(0) if mask.shape[0] > 1 else 0
    rope = cos is not None
    cos, sin = (cos, sin) if rope else (q, q)  # not read without rope
    scb, ssb = (t.stride(0) if rope and t.shape[0] > 1 else 0 for t in (cos, sin))
    block_d = max(16, triton.next_power_of_2(D))
    wrapped(_split_kernel)[(B * HKV, splits)](
        q, k, v, mask, partial, lse, cos, sin, scale, S, HKV, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), smb, mask.stride(3), scb, ssb, D, splits, per_split,
        max(16, triton.next_power_of_2(G)), block_d, BLOCK_N, q.dtype == torch.float32, rope, num_warps=4,
        num_stages=stages)
    wrapped(_merge_kernel)[(B * HQ,)](partial, lse, y, D, splits, max(2, triton.next_power_of_2(splits)), block_d,
                                          num_warps=4)
    return y

