"""The one-row products of a decode step on one GPU, each on its own: cuBLAS, what Inductor makes of them with our
engines' settings, and the kernel of the op row_linear (tpcompile/kernels/gemv.py) with the launch settings the
pass one_row_linear tunes, and the best of a wider sweep of them, at a model's per-layer shapes.

    python benchmarks/gemv.py --model llama_8b     # -> results/gemv_llama-8b_<gpu>_<date>.json

Each product is y = x @ W.T (bf16, x one row); the down projection takes silu(gate) * up as x (the op makes it
inside). With --fused, what fuse_norm_residual adds: q/k/v, gate/up and the head take an RMSNorm of x, o and down
add a residual (-> results/gemv-fused_<model>_...). Each figure is the time of one call in a CUDA graph of calls that cycle over enough copies of W that
none is read from L2 (as a model's layers are), and the fraction of the measured copy rate it reached over W's
bytes. Every variant is checked against a float64 reference. The record also holds the launch settings Inductor's
coordinate-descent search chose for its kernels (the `.best_config` files of a fresh Inductor cache).
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

from common import ceilings, device_tag, provenance, result_path  # noqa: E402  benchmarks/common.py
from tpcompile.kernels.gemv import launch, tune  # noqa: E402
from tpcompile.kernels.row_linear import reference as op_reference  # noqa: E402
from tpcompile.lower import inductor_options  # noqa: E402

SHAPES = {  # (name, K, N)
    "llama_8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                 ("head", 4096, 128256)],
    "llama_1b": [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048),
                 ("head", 2048, 128256)],
}
# what each product does around it: with one_row_linear alone, and with fuse_norm_residual too (--fused)
AROUND = {"qkv": "", "o": "", "gate_up": "", "down": "gated", "head": ""}
FUSED = {"qkv": "normed", "o": "residual", "gate_up": "normed", "down": "gated residual", "head": "normed"}
CONFIG = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def eager(x, w, up, norm, residual):
    return op_reference(x, w, up, norm, 1e-5, residual, [])


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
        found.append({"kernel": name, "file": Path(path).name, **json.loads(Path(path).read_text())})
    return found


def sweep():
    for block_n in (1, 2, 4, 8, 16):
        for block_k in (256, 512, 1024, 2048, 4096):
            if 512 <= block_n * block_k <= 16384:
                for warps in (4, 8):
                    for stages in (1, 2):
                        yield block_n, block_k, warps, stages


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_8b", choices=sorted(SHAPES))
    ap.add_argument("--shapes", nargs="*", help="a subset of the model's products (default: all)")
    ap.add_argument("--backend", default="aoti_cudagraphs", help="whose Inductor settings (lower.inductor_options)")
    ap.add_argument("--sweep-top", type=int, default=4, help="sweep: how many settings, best on plain launches, "
                                                               "to time in a graph")
    ap.add_argument("--fused", action="store_true", help="each product with the RMSNorm before it or the residual "
                                                         "add after it inside (fuse_norm_residual)")
    ap.add_argument("--out", default=None, help="folder of the record (default benchmarks/results)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = ceilings()
    copy = bw["copy_bandwidth_GBps"] * 1e9
    options = inductor_options(args.backend, "cuda")
    print(f"copy {bw['copy_bandwidth_GBps']:.0f} GB/s, Inductor settings {options}", flush=True)
    rows = []
    for name, k, n in SHAPES[args.model]:
        if args.shapes and name not in args.shapes:
            continue
        what = (FUSED if args.fused else AROUND)[name]
        t0 = time.perf_counter()
        wbytes = n * k * 2
        copies = max(2, -(-(512 << 20) // wbytes))
        dev, dt = "cuda", torch.bfloat16
        weights = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=dt)
        up = torch.randn(1, k, device=dev, dtype=dt) if "gated" in what else None
        norm = torch.rand(k, device=dev, dtype=dt) + 0.5 if "normed" in what else None
        residual = torch.randn(1, n, device=dev, dtype=dt) if "residual" in what else None
        around = {"up": up, "norm": norm, "eps": 1e-5, "residual": residual}

        def c64(t):
            return t.to(torch.float64) if t is not None else None
        want = eager(c64(x), c64(weights[0]), c64(up), c64(norm), c64(residual))
        scale = want.abs().max().item()
        row = {"product": name, "K": k, "N": n, "around": what, "weight_bytes": wbytes, "copies": copies}

        def record(label, call, seconds, **extra):
            err = (call(weights[0]).double() - want).abs().max().item() / scale
            row[label] = {"us": seconds * 1e6, "of_copy_rate": wbytes / seconds / copy, "max_err_rel": err, **extra}
            print(f"  {name:8s} {label:9s} {seconds * 1e6:8.1f} us  {wbytes / seconds / copy:6.1%} of copy  "
                  f"err {err:.1e}  {extra.get('config', '')}", flush=True)

        def ours(config):
            return lambda w: launch(x, w, config=config, **around)

        record("cublas", lambda w: eager(x, w, up, norm, residual),
               graph_time(lambda w: eager(x, w, up, norm, residual), weights))
        compiled = torch.compile(eager, options=options, dynamic=False, fullgraph=True)
        before = {c["file"] for c in best_configs(os.environ["TORCHINDUCTOR_CACHE_DIR"])}
        record("inductor", lambda w: compiled(x, w, up, norm, residual),
               graph_time(lambda w: compiled(x, w, up, norm, residual), weights))
        row["inductor_configs"] = [c for c in best_configs(os.environ["TORCHINDUCTOR_CACHE_DIR"])
                                   if c["file"] not in before]
        tuned = tune(n, k, up is not None, dt, "cuda:0", norm is not None, residual is not None)
        record("ours", ours(tuned), graph_time(ours(tuned), weights), config=dict(zip(CONFIG, tuned)))
        # the wider sweep: every setting on plain launches, the best few in a graph
        trial = []
        for config in sweep():
            try:
                ours(config)(weights[0])
                torch.cuda.synchronize()
            except Exception as e:  # a setting this GPU cannot run (shared memory, registers)
                print(f"  skip {config}: {type(e).__name__}", flush=True)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(3 * copies):
                ours(config)(weights[i % copies])
            end.record()
            end.synchronize()
            trial.append((start.elapsed_time(end), config))
        timed = sorted((graph_time(ours(c), weights), c) for _, c in sorted(trial)[:args.sweep_top])
        seconds, best = timed[0]
        record("sweep", ours(best), seconds, config=dict(zip(CONFIG, best)),
               tried=[{"us": s * 1e6, "config": c} for s, c in timed])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        weights.clear()
        torch.cuda.empty_cache()
    result = {**provenance(), **bw, "what": "one-row products, each alone, in CUDA graphs", "model": args.model,
              "fused": args.fused, "inductor_options": options, "rows": rows}
    path = result_path("gemv-fused" if args.fused else "gemv", args.model, device_tag(), **({"results": Path(args.out)} if args.out else {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
