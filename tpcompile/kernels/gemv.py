"""The Triton kernel behind torch.ops.tpcompile.row_linear (row_linear.py): one row times a weight matrix,
y = W @ x, reading W once at the copy rate, with a gated MLP's activation silu(x) * up, or an RMSNorm of x, made
inside, and a residual added to y.

    program i: rows i * BLOCK_N ... of W, the whole K in steps of BLOCK_K. Each step loads a chunk of x (and of up,
    computing the activation there) once for its BLOCK_N rows, and a BLOCK_N x BLOCK_K tile of W, which is read once
    and so loaded with evict_first; fp32 accumulation. An RMSNorm scales the row by one number, 1 / rms(x), so
    the program multiplies x by the norm's weight as it goes, sums x^2 beside the product and scales the row's
    sums at the end: the norm costs no pass of its own over x.

The launch settings that reach the copy rate depend on the shape and the GPU (a long K wants several rows per
program to share the chunks of x; few rows want narrow programs so that every SM has work), so `tune` measures a
short list of them on the GPU the engine is built for, the way a decode step reads weights (each from HBM, in a
CUDA graph), and the pass writes the fastest into the graph. Needs triton; imported only on a GPU (or in Triton's
interpreter, TRITON_INTERPRET=1).
"""
import functools

import torch
import triton
import triton.language as tl

from tpcompile.kernels.launching import wrapped

# (BLOCK_N, BLOCK_K, num_warps, num_stages): the settings that won for llama_1b's and llama_8b's products on an H200
# in a wider sweep of up to 8 rows per program (benchmarks/gemv.py), and two of 16 rows for short rows (K = 2,048:
# llama_1b's gate/up, where Inductor's kernel stayed ahead of every setting of that sweep)
CANDIDATES = [(1, 1024, 4, 1), (1, 4096, 8, 1), (2, 1024, 4, 1), (2, 2048, 8, 1), (2, 4096, 4, 1), (2, 4096, 4, 2),
              (4, 1024, 8, 1), (4, 2048, 4, 1), (8, 1024, 4, 2), (8, 2048, 4, 1), (8, 2048, 8, 1),
              (16, 512, 4, 1), (16, 1024, 8, 1)]


@triton.jit
def _gemv_kernel(X, U, G, R, W, Y, N, K, eps, GATED: tl.constexpr, NORMED: tl.constexpr, RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ks_ok = ks < K
        x = tl.load(X + ks, mask=ks_ok, other=0.0).to(tl.float32)
        if NORMED:  # RMSNorm: x * g here, the row's 1 / rms (a scalar) after the sum
            squares += x * x
            x = x * tl.load(G + ks, mask=ks_ok, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(U + ks, mask=ks_ok, other=0.0).to(tl.float32)
            x = x * tl.sigmoid(x) * up
        w = tl.load(W + rows[:, None] * K + ks[None, :], mask=rows_ok[:, None] & ks_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if NORMED:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if RESIDUAL:
        y += tl.load(R + rows, mask=rows_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows_ok)


def launch(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor | None, config: tuple,
           norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) holding one row, contiguous; w (N, K) contiguous; up None or like x (then the row is silu(x) * up);
    norm None or (K,) (then the row is rms_norm(x) * norm, eps inside the root; not with up); residual None or
    (..., N), added -> (..., N) in x's dtype. Runs the kernel directly or, under torch.compile / export, as a wrapped
    Triton kernel."""
    n, k = w.shape
    if up is not None and norm is not None:
        raise ValueError("row_linear: up and norm together are not a product this kernel computes")
    block_n, block_k, warps, stages = config
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    wrapped(_gemv_kernel)[(triton.cdiv(n, block_n),)](
        x, x if up is None else up, x if norm is None else norm, y if residual is None else residual, w, y, n, k,
        float(eps), up is not None, norm is not None, residual is not None, block_n, block_k, num_warps=warps,
        num_stages=stages)
    return y


def candidates(k: int) -> list[tuple]:
    """The CANDIDATES measured for rows of length k, never none: a chunk (BLOCK_K) of more than twice the row's next
    power of two would mask most of its lanes off, so it is cut to that (at least 16), and settings the cut makes
    equal are measured once. No chunk of llama_1b's or llama_8b's rows (K >= 2,048) is cut."""
    longest = max(16, 2 * triton.next_power_of_2(k))
    return list(dict.fromkeys((n, min(block_k, longest), warps, stages) for n, block_k, warps, stages in CANDIDATES))


@functools.cache
def tune(n: int, k: int, gated: bool, dtype: torch.dtype, device: str, normed: bool = False,
         residual: bool = False) -> tuple:
    """The fastest of candidates(k) for an (n, k) weight on `device` (a CUDA device) in the product's variant, as a
    decode step reads it: a CUDA graph of calls over enough copies of the weight that none is served from L2."""
    dev = torch.device(device)
    copies = max(1, -(-(256 << 20) // (n * k * torch.finfo(dtype).bits // 8)))
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(n, k, device=dev, dtype=dtype, generator=gen) for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=dtype, generator=gen)
    extra = {"up": x.clone() if gated else None, "norm": x[0].clone() if normed else None, "eps": 1e-5,
             "residual": torch.randn(1, n, device=dev, dtype=dtype, generator=gen) if residual else None}
    best = (float("inf"), None)
    with torch.cuda.device(dev):
        for config in candidates(k):
            for w in weights:  # compiles, and warms the caches
                launch(x, w, config=config, **extra)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(4):
                    for w in weights:
                        launch(x, w, config=config, **extra)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(3):
                graph.replay()
            end.record()
            end.synchronize()
            best = min(best, (start.elapsed_time(end), config))
            del graph
    del weights
    torch.cuda.empty_cache()
    return best[1]
