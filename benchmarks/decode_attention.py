"""One-query attention over a static KV cache on one GPU: what the decode graph ran before the pass
decode_attention (scaled_dot_product_attention with the boolean mask, enable_gqa) against the op it puts there
(tpcompile/kernels/flash_decode.py), at a model's per-layer shapes, for several filled lengths and cache sizes.

    python benchmarks/decode_attention.py            # -> results/decode-attention_llama-8b_<gpu>_<date>.json
    python benchmarks/decode_attention.py --stages 1 2 3 --per-sm 2 3 4 8   # and the op at each num_stages of its
                                                # split kernel and programs per SM (op_s{stages}_p{per_sm}_us)

Each figure is the time of one layer's call, from a CUDA graph of one call per layer, each layer its own cache (as
in a model: no layer reads another's bytes from L2), replayed; and the bandwidth it reached over the k/v bytes of
the filled slots (what it must read). Both are checked against the reference in float64 first.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import ceilings, device_tag, provenance, result_path  # benchmarks/common.py
from tpcompile.kernels.decode_attention import reference
from tpcompile.kernels.flash_decode import PER_SM, launch, splits_for

SHAPES = {"llama_8b": dict(heads=32, kv_heads=8, head_dim=128, layers=32),
          "llama_1b": dict(heads=32, kv_heads=4, head_dim=64, layers=22)}


def sdpa(q, k, v, mask, scale):
    """What the decode graph called before the pass."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def inputs(shape: dict, batch: int, slots: int, filled: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, shape["heads"], 1, shape["head_dim"], device="cuda", generator=gen, dtype=torch.bfloat16)
    cache = [torch.randn(batch, slots, shape["kv_heads"], shape["head_dim"], device="cuda", generator=gen,
                         dtype=torch.bfloat16) for _ in range(2)]
    mask = (torch.arange(slots, device="cuda") < filled)[None, None, None, :].expand(batch, 1, 1, slots)
    return q, cache[0].transpose(1, 2), cache[1].transpose(1, 2), mask


def per_call(fns: list, repeat: int = 20) -> float:
    """Seconds per call, from a CUDA graph of one call of each fn."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat / len(fns)


def row(model: str, batch: int, slots: int, filled: int, bandwidth: float, stages: list[int],
        per_sm: list[int]) -> dict:
    shape = SHAPES[model]
    scale = 1 / math.sqrt(shape["head_dim"])
    layers = [inputs(shape, batch, slots, filled, seed) for seed in range(shape["layers"])]
    q, k, v, mask = layers[-1]
    want = reference(q.double(), k.double(), v.double(), mask, scale)
    errors = {"sdpa": (sdpa(*layers[-1], scale).double() - want).abs().max().item(),
              "op": (launch(*layers[-1], scale).double() - want).abs().max().item()}
    kv_bytes = 2 * batch * shape["kv_heads"] * filled * shape["head_dim"] * 2
    rec = {"model": model, "batch": batch, "cache_slots": slots, "filled": filled, "kv_bytes_filled": kv_bytes,
           "max_abs_err": errors}
    for name, fn in (("sdpa", sdpa), ("op", launch)):
        sec = per_call([lambda a=a, fn=fn: fn(*a, scale) for a in layers])
        rec[f"{name}_us"] = sec * 1e6
        rec[f"{name}_fraction_of_copy_bw"] = kv_bytes / sec / bandwidth
    rec["speedup"] = rec["sdpa_us"] / rec["op_us"]
    cos, sin = (torch.rand(batch, 1, 1, shape["head_dim"], device="cuda") for _ in range(2))
    rec["op_rope_us"] = per_call([lambda a=a: launch(*a, scale, cos=cos, sin=sin) for a in layers]) * 1e6
    rows = batch * shape["kv_heads"]
    for n in stages:  # the split kernel at other num_stages (shared memory per program against pipelining)
        for p in per_sm or [PER_SM]:  # and other numbers of programs
            splits = splits_for(rows, slots, q.device, p)
            got = launch(*layers[-1], scale, splits, stages=n).double()
            rec[f"op_s{n}_p{p}_max_abs_err"] = (got - want).abs().max().item()
            rec[f"op_s{n}_p{p}_splits"] = splits
            rec[f"op_s{n}_p{p}_us"] = per_call([lambda a=a: launch(*a, scale, splits, stages=n) for a in layers]) * 1e6
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama_8b"])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--cases", nargs="+", default=["1:257:160", "1:8193:1000", "1:8193:4000", "1:16385:1000",
                                                     "1:16385:4000", "1:16385:16000", "8:8193:4000", "32:2049:1000"],
                    help="batch:cache slots:filled slots")
    ap.add_argument("--stages", nargs="*", type=int, default=[],
                    help="also time the op with these num_stages of its split kernel (op_us: the default's)")
    ap.add_argument("--per-sm", nargs="*", type=int, default=[],
                    help="with --stages: also at these split programs per SM (default: the kernel's)")
    args = ap.parse_args()
    base = {**provenance(), **ceilings()}
    bandwidth = base["copy_bandwidth_GBps"] * 1e9
    rows = []
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    path = result_path("decode-attention", "+".join(args.models), device_tag(),
                       **({"results": args.out} if args.out else {}))
    for model in args.models:
        for case in args.cases:
            batch, slots, filled = map(int, case.split(":"))
            try:
                rows.append(row(model, batch, slots, filled, bandwidth, args.stages, args.per_sm))
            except Exception as e:  # keep measuring the rest
                rows.append({"model": model, "case": case, "error": repr(e)[:500]})
            print(json.dumps(rows[-1]), flush=True)
            path.write_text(json.dumps({**base, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
