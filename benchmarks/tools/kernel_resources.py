"""What Triton makes of the decode-attention split kernel (tpcompile/kernels/flash_decode.py) for a GPU, compiled on
any machine (no GPU needed: triton's own ptxas): shared memory per program, whether the loop over blocks is
software-pipelined (cp.async copies into shared memory) and how k and v are loaded (16-byte vector loads or not),
at a model's shapes, for several num_stages and blocks per program. The kernel is compiled with the divisibility
the JIT would find at run time (pointers and the strides of a llama cache divisible by 16, the mask's slot stride 1).

    python benchmarks/tools/kernel_resources.py [--rope]             # -> results/kernel-resources_llama-8b_cpu-sm90_<date>.json
    PYTHONPATH=_old:$PYTHONPATH python benchmarks/tools/kernel_resources.py --out /tmp   # another checkout's kernel
"""
import argparse
import collections
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import RESULTS, result_path  # noqa: E402
from decode_attention import SHAPES  # noqa: E402  the per-layer shapes its microbenchmark times
from tpcompile.kernels import flash_decode  # noqa: E402
from tpcompile.util import provenance  # noqa: E402

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "M": "*i1", "O": "*fp32", "L": "*fp32", "C": "*fp32",
            "SN": "*fp32"}
STRIDES = ["sqb", "sqh", "skb", "skh", "sks", "svb", "svh", "svs", "smb", "scb", "ssb"]


def compiled(shape: dict, per_split: int, stages: int, arch: int, rope: bool = False):
    """The split kernel compiled for sm_<arch> at `shape`, `per_split` blocks per program, `stages`, with q rotated
    inside or not (arguments the kernel lacks, as an older checkout's, are left out)."""
    kernel = flash_decode._split_kernel
    group, head_dim = shape["heads"] // shape["kv_heads"], shape["head_dim"]
    constexprs = {"scale": head_dim ** -0.5, "HKV": shape["kv_heads"], "G": group, "D": head_dim, "SPLITS": 64,
                  "PER_SPLIT": per_split, "BLOCK_G": max(16, triton.next_power_of_2(group)),
                  "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "BLOCK_N": flash_decode.BLOCK_N,
                  "IEEE": False, "ROPE": rope, "sms": 1}
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names or k == "sms"}
    signature = {k: v for k, v in (POINTERS | {"S": "i32"} | {s: "i32" for s in STRIDES}).items()
                 if k in kernel.arg_names} | {k: "constexpr" for k in constexprs}
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in [*POINTERS, *STRIDES]
             if a in kernel.arg_names}
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": stages})


def resources(shape: dict, per_split: int, stages: int, arch: int, rope: bool = False) -> dict:
    k = compiled(shape, per_split, stages, arch, rope)
    ops = collections.Counter(re.findall(r"(ld\.global[.\w]*|cp\.async\.cg[.\w]*)", k.asm["ptx"]))
    return {"per_split": per_split, "stages": stages, **({"rope": True} if rope else {}),
            "shared_bytes": k.metadata.shared,
            "cp_async": sum(n for op, n in ops.items() if op.startswith("cp.async")),
            "global_loads": {op: n for op, n in ops.items() if op.startswith("ld.global")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama_8b", choices=sorted(SHAPES))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, H200)")
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--per-split", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--rope", action="store_true", help="also with q rotated in the kernel (rope_into_attention)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args()
    rows = [resources(SHAPES[args.model], p, s, args.arch, rope) for rope in [False] + [True] * args.rope
            for p in args.per_split for s in args.stages]
    for r in rows:
        print(json.dumps(r))
    rec = {**provenance(), "triton": triton.__version__, "target": f"sm_{args.arch}", "kernel": flash_decode.__file__,
           "what": "tpcompile/kernels/flash_decode.py _split_kernel compiled, not run", "rows": rows}
    path = result_path("kernel-resources", args.model, f"cpu-sm{args.arch}", results=Path(args.out))
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
