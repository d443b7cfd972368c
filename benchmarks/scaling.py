"""Tensor-parallel scaling on the GPUs of one host, resumable across runs.

    python benchmarks/scaling.py --model llama_8b --tps 1 2 4 --verify-tps 2 4 --work outputs/scaling

Steps, each skipped when its record is already in --work (so a second run finishes what a first began):
1. the device's ceilings (copy bandwidth, bf16 matmul rate) on GPU 0;
2. `tpcompile compile kv_cache=true` for every tp at once, on the CPUs (random bf16 weights, one file per rank),
   while the GPUs run 3 and 4;
3. all-reduce latency, 8 KiB to 1 MiB, on 2 and on every GPU (benchmarks/allreduce.py under torchrun);
4. `tpcompile verify` with NCCL at each verify tp (llama_tiny under eager and inductor_cudagraphs, llama_1b
   fp32 eager), and tp=2 with both ranks on GPU 0 over gloo (a check of the CUDA engines with collectives);
5. `tpcompile bench` (batch 1, 32-token prompt, 128 new tokens, inductor_cudagraphs) at every tp, with the
   collective share from the profiler and each rank's load time.
After every step, summary.json in --work holds everything so far, with the speed-up and scaling efficiency
(speed-up / tp) against tp=1, per step (p50, synchronised) and over a whole run (`_run`), and the per-rank HBM
fraction; at the end it is copied to results/scaling_<model>_<n>x<gpu>_<date>.json. NVLink multicast stays off
(common.NO_MULTICAST).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import NO_MULTICAST, REPO, RESULTS, ceilings, device_tag, provenance, result_path, tpcompile_bench

ENV = {**os.environ, **NO_MULTICAST}
BENCH = dict(batch=1, prompt=32, new=128, max_seq=256, chunk=32)


def tpcompile(*args, timeout_s: float = 600, env=None) -> dict:
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "tpcompile.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout_s, env=env or ENV)
    except subprocess.TimeoutExpired:
        return {"args": list(args), "ok": False, "error": f"timed out after {timeout_s} s"}
    tail = (r.stdout + r.stderr)[-800:]
    print(" ".join(args), "->", r.returncode, tail[-300:], flush=True)
    return {"args": list(args), "ok": r.returncode == 0, "seconds": time.perf_counter() - t0, "output_tail": tail}


def compile_args(model: str, tp: int, work: Path) -> list[str]:
    """The same artifact `tpcompile bench` below asks for (same cache key), compiled ahead."""
    b = BENCH
    return ["compile", "kv_cache=true", f"model={model}", f"tp={tp}", "dtype=bfloat16", "runtime.device=cuda",
            "backend=inductor_cudagraphs", f"generation.max_batch={b['batch']}", f"generation.max_seq={b['max_seq']}",
            f"generation.prefill_chunk={b['chunk']}", f"out_dir={work / 'engines'}", f"hydra.run.dir={work}/hydra/compile_tp{tp}"]


def summarize(work: Path, state: dict) -> None:
    benches = {spec: r for spec, r in state.get("bench", {}).items() if "decode_ms_p50" in r}
    base = benches.get("1")
    table = []
    for spec, r in sorted(benches.items()):
        tp = r["tp"]
        row = {"tp": tp, "device_name": r.get("device_name"),
               "decode_ms_p50": r["decode_ms_p50"], "tokens_per_s": r["decode_tokens_per_s"],
               "decode_ms_run": r.get("decode_ms_run"), "tokens_per_s_run": r.get("decode_tokens_per_s_run"),
               "hbm_fraction_per_rank": r.get("hbm_fraction"), "hbm_fraction_per_rank_run": r.get("hbm_fraction_run"),
               "collective_share": r["collective_share"], "collectives_per_step": r.get("collectives_per_step"),
               "weight_bytes_per_rank": r["weight_bytes_per_rank"], "peak_memory_bytes": r["peak_memory_bytes"],
               "load_seconds_per_rank": r.get("load_seconds_per_rank")}
        if base:
            row["speedup"] = base["decode_ms_p50"] / r["decode_ms_p50"]
            row["efficiency"] = row["speedup"] / tp
            if base.get("decode_ms_run") and r.get("decode_ms_run"):  # over a whole run: the throughput figure
                row["speedup_run"] = base["decode_ms_run"] / r["decode_ms_run"]
                row["efficiency_run"] = row["speedup_run"] / tp
        table.append(row)
    state["table"] = table
    (work / "summary.json").write_text(json.dumps(state, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama_8b")
    ap.add_argument("--tps", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--verify-tps", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--work", default=str(REPO / "outputs" / "scaling"))
    ap.add_argument("--out", default=str(RESULTS), help="where the final record goes")
    ap.add_argument("--skip", nargs="*", default=[], help="steps to skip: allreduce verify bench")
    ap.add_argument("--benches", nargs="*", default=None,
                    help="bench runs in order, e.g. 4 2 1, or 4:KEY=VALUE for one more tpcompile override")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    summary = work / "summary.json"
    state = json.loads(summary.read_text()) if summary.exists() else {}
    gpus = torch.cuda.device_count()
    tps = [tp for tp in args.tps if tp <= gpus]
    state.setdefault("runs", []).append({**provenance(), "model": args.model, "tps": tps})
    if "ceilings" not in state:
        state["ceilings"] = ceilings()
        torch.cuda.empty_cache()
    summarize(work, state)

    specs = args.benches or [str(tp) for tp in tps]
    todo = sorted({int(spec.split(":")[0]) for spec in specs
                   if "decode_ms_p50" not in state.get("bench", {}).get(spec, {}) and int(spec.split(":")[0]) <= gpus})
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(todo) + 1)))  # the compiles share the CPUs
    compiles = {tp: subprocess.Popen([sys.executable, "-m", "tpcompile.cli", *compile_args(args.model, tp, work)],
                                     cwd=REPO, env={**ENV, "OMP_NUM_THREADS": threads},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                for tp in todo}
    t_compile = time.perf_counter()

    if "allreduce" not in args.skip:
        for world in sorted({2, gpus} - {1}):
            key = f"allreduce_{world}"
            if key in state or world > gpus:
                continue
            out = work / key
            try:
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                                    "benchmarks/allreduce.py", "--out", str(out)], cwd=REPO, env=ENV,
                                   capture_output=True, text=True, timeout=150)
                error = (r.stderr or r.stdout)[-800:]
            except subprocess.TimeoutExpired:
                error = "timed out after 150 s"
            files = sorted(out.glob("*.json"))
            state[key] = json.loads(files[-1].read_text()) if files else {"error": error}
            summarize(work, state)

    if "verify" not in args.skip:
        checks = state.setdefault("verify", {})
        runs = [(f"llama_tiny_tp{tp}_{be}", ["verify", "model=llama_tiny", f"tp={tp}", "runtime.device=cuda",
                                             f"backend={be}"]) for tp in args.verify_tps if tp <= gpus
                for be in ("eager", "inductor_cudagraphs")]
        runs += [(f"llama_1b_tp{tp}_eager", ["verify", "model=llama_1b", f"tp={tp}", "runtime.device=cuda"])
                 for tp in args.verify_tps if tp <= gpus]
        runs += [("llama_tiny_tp2_one_gpu_gloo_inductor", ["verify", "tp=2", "runtime.device=cuda",
                                                           "runtime.collectives=gloo", "backend=inductor"])]
        for name, cmd in runs:
            if checks.get(name, {}).get("ok"):
                continue
            env = {**ENV, "CUDA_VISIBLE_DEVICES": "0"} if "one_gpu" in name else ENV
            checks[name] = tpcompile(*cmd, f"out_dir={work / 'verify_engines'}", f"hydra.run.dir={work}/hydra/{name}",
                                     timeout_s=300, env=env)
            summarize(work, state)

    for tp, proc in compiles.items():
        proc.wait(timeout=900)
    state.setdefault("compile_seconds_parallel", time.perf_counter() - t_compile)

    if "bench" not in args.skip:
        benches = state.setdefault("bench", {})
        for spec in args.benches or [str(tp) for tp in sorted(tps, reverse=True)]:  # the largest tp first
            tp, _, extra_spec = spec.partition(":")  # "4", or "4:KEY=VALUE" for one more override
            if int(tp) > gpus or "decode_ms_p50" in benches.get(spec, {}):
                continue
            extra = [extra_spec] if extra_spec else []
            benches[spec] = tpcompile_bench(args.model, "inductor_cudagraphs", work, tp=int(tp), profile_steps=8,
                                            timeout_s=420, extra=extra, **BENCH)
            summarize(work, state)
    summarize(work, state)
    for row in state["table"]:
        print(json.dumps(row))
    record = result_path("scaling", args.model, device_tag(gpus), results=Path(args.out))
    record.write_text(json.dumps(state, indent=1))
    print(f"wrote {record}")


if __name__ == "__main__":
    main()
