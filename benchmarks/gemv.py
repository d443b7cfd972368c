"""The one-row products of a decode step on one GPU, each on its own: what Inductor makes of them with our engines'
settings, cuBLAS, and a plain Triton matrix-vector kernel written here, at a model's per-layer shapes. It asks
whether any of them reaches the copy rate where the engine's kernel does not (the down projection of llama_8b ran
at 85% of it in the engine's profile).

    python benchmarks/gemv.py --model llama_8b     # -> results/gemv_llama-8b_<gpu>_<date>.json

Each product is y = x @ W.T (bf16, x one row), with what the engine fuses around it where that changes the bytes:
the down projection takes silu(gate) * up as x and adds the residual. Each figure is the time of one call in a
CUDA graph of calls that cycle over enough copies of W that none is read from L2 (as a model's layers are), and
the fraction of the measured copy rate it reached over W's bytes. Every variant is checked against a float64
reference first. The record also holds the launch settings Inductor's coordinate-descent search chose for its
kernels (the `.best_config` files of a fresh Inductor cache).

The Triton kernel here is an experiment: it is in no engine.
"""
import argparse
import glob
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gemv_inductor_"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import ceilings, device_tag, provenance, result_path  # noqa: E402  benchmarks/common.py
from tpcompile.lower import inductor_options  # noqa: E402

# (name, K, N, fused): fused "silu_mul_residual" = the down projection, "residual" = the o projection
SHAPES = {
    "llama_8b": [("qkv", 4096, 6144, ""), ("o", 4096, 4096, "residual"), ("gate_up", 4096, 28672, ""),
                 ("down", 14336, 4096, "silu_mul_residual"), ("head", 4096, 128256, "")],
    "llama_1b": [("qkv", 2048, 3072, ""), ("o", 2048, 2048, "residual"), ("gate_up", 2048, 16384, ""),
                 ("down", 8192, 2048, "silu_mul_residual"), ("head", 2048, 128256, "")],
}


@triton.jit
def _gemv(X, U, W, R, Y, N, K, SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] = W[rows] @ x (+ r[rows]); x = silu(X) * U when SILU_MUL. One program: BLOCK_N rows of W, the whole
    K in steps of BLOCK_K, so each chunk of x is loaded (and its SiLU computed) once for BLOCK_N rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ks_ok = ks < K
        x = tl.load(X + ks, mask=ks_ok, other=0.0).to(tl.float32)
        if SILU_MUL:
            u = tl.load(U + ks, mask=ks_ok, other=0.0).to(tl.float32)
            x = x * tl.sigmoid(x) * u
        w = tl.load(W + rows[:, None] * K + ks[None, :], mask=rows_ok[:, None] & ks_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if RESIDUAL:
        y += tl.load(R + rows, mask=rows_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows_ok)


def triton_gemv(config):
    block_n, block_k, warps, stages = config

    def run(x, u, w, r, y):
        n, k = w.shape
        _gemv[(triton.cdiv(n, block_n),)](x, u if u is not None else x, w, r if r is not None else y, y, n, k,
                                          u is not None, r is not None, block_n, block_k,
                                          num_warps=warps, num_stages=stages)
        return y
    return run


def eager(x, u, w, r):
    a = torch.nn.functional.silu(x) * u if u is not None else x
    y = torch.nn.functional.linear(a, w)
    return y + r if r is not None else y


def reference(x, u, w, r):
    d = torch.float64
    return eager(x.to(d), u.to(d) if u is not None else None, w.to(d), r.to(d) if r is not None else None)


def graph_time(call, weights, reps: int = 20) -> float:
    """Seconds per call: a CUDA graph of `reps` rounds over every copy of the weights, replayed."""
    for w in weights:
        call(w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for w in weights:
                call(w)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / (reps * len(weights)))
    del g
    return best


def best_configs(cache_dir: str) -> list:
    """The launch settings Inductor's coordinate-descent search chose, per kernel it compiled so far."""
    found = []
    for path in glob.glob(os.path.join(cache_dir, "**", "*.best_config"), recursive=True):
        source = Path(path).with_suffix(".py")
        name = None
        if source.exists():
            name = next((line.split("(")[0][4:] for line in source.read_text().splitlines()
                         if line.startswith("def triton_")), None)
        found.append({"kernel": name, **json.loads(Path(path).read_text())})
    return found


def configs():
    for block_n in (1, 2, 4, 8):
        for block_k in (512, 1024, 2048, 4096):
            if block_n * block_k > 16384 or block_n * block_k < 512:
                continue
            for warps in (4, 8):
                for stages in (1, 2):
                    yield block_n, block_k, warps, stages


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_8b", choices=sorted(SHAPES))
    ap.add_argument("--shapes", nargs="*", help="a subset of the model's products (default: all)")
    ap.add_argument("--backend", default="aoti_cudagraphs", help="whose Inductor settings (lower.inductor_options)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = ceilings()
    copy = bw["copy_bandwidth_GBps"] * 1e9
    options = inductor_options(args.backend, "cuda")
    print(f"copy {bw['copy_bandwidth_GBps']:.0f} GB/s, Inductor settings {options}", flush=True)
    rows = []
    for name, k, n, fused in SHAPES[args.model]:
        if args.shapes and name not in args.shapes:
            continue
        t0 = time.perf_counter()
        wbytes = n * k * 2
        copies = max(2, -(-(512 << 20) // wbytes))
        dev, dt = "cuda", torch.bfloat16
        weights = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=dt)
        u = torch.randn(1, k, device=dev, dtype=dt) if "silu" in fused else None
        r = torch.randn(1, n, device=dev, dtype=dt) if "residual" in fused else None
        y = torch.empty(1, n, device=dev, dtype=dt)
        want = reference(x, u, weights[0], r)
        scale = want.abs().max().item()
        row = {"product": name, "K": k, "N": n, "fused": fused, "weight_bytes": wbytes, "copies": copies}

        def record(label, call, seconds):
            err = (call(weights[0]).double() - want).abs().max().item() / scale
            row[label] = {"us": seconds * 1e6, "of_copy_rate": wbytes / seconds / copy, "max_err_rel": err}
            print(f"  {name:8s} {label:10s} {seconds * 1e6:8.1f} us  {wbytes / seconds / copy:6.1%} of copy  "
                  f"err {err:.1e}", flush=True)

        record("cublas", lambda w: eager(x, u, w, r), graph_time(lambda w: eager(x, u, w, r), weights))
        compiled = torch.compile(eager, options=options, dynamic=False, fullgraph=True)
        before = {c["kernel"] for c in best_configs(os.environ["TORCHINDUCTOR_CACHE_DIR"])}
        record("inductor", lambda w: compiled(x, u, w, r), graph_time(lambda w: compiled(x, u, w, r), weights))
        row["inductor_configs"] = [c for c in best_configs(os.environ["TORCHINDUCTOR_CACHE_DIR"])
                                   if c["kernel"] not in before]
        # the Triton kernel: a short sweep of its settings on plain launches, then the best three in a graph
        trial = []
        for config in configs():
            run = triton_gemv(config)
            try:
                run(x, u, weights[0], r, y)
                torch.cuda.synchronize()
            except Exception as e:  # a setting this GPU cannot run (shared memory, registers)
                print(f"  skip {config}: {type(e).__name__}", flush=True)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(3 * copies):
                run(x, u, weights[i % copies], r, y)
            end.record()
            end.synchronize()
            trial.append((start.elapsed_time(end), config))
        trial.sort()
        timed = []
        for _, config in trial[:4]:
            run = triton_gemv(config)
            timed.append((graph_time(lambda w: run(x, u, w, r, y), weights), config))
        seconds, config = min(timed)
        run = triton_gemv(config)
        record("triton", lambda w: run(x, u, w, r, y).clone(), seconds)
        row["triton"]["config"] = dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), config))
        row["triton"]["tried"] = [{"us": s * 1e6, "config": c} for s, c in timed]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        del weights
        torch.cuda.empty_cache()
    record = {**provenance(), **bw, "what": "one-row products, each alone, in CUDA graphs", "model": args.model,
              "inductor_options": options, "rows": rows}
    out = Path(args.out) if args.out else None
    path = result_path("gemv", args.model, device_tag(), results=out) if out else \
        result_path("gemv", args.model, device_tag())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
