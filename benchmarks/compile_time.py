"""Compile time per backend and tp, cold start and steady-state latency per backend (CPU or one GPU).

    python benchmarks/compile_time.py [--backends eager,inductor,aoti,onnx] [--tps 1,2,4,8] [--calls 20]
    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --start-tp 1 \
        --backends eager,inductor,inductor_cudagraphs,aoti     # -> results/compile_llama-tiny_h100_<date>.json

On a GPU, engines for tp > 1 are compiled for ranks that share the one GPU (runtime.collectives=gloo): the
engine and its compile do not depend on how many GPUs there are; cold start and latency run at --start-tp.

The figure is compile(tp=8) / compile(tp=1): the engine is compiled once for all ranks, only the weight
slicing loops over ranks, so it must stay near 1. llama_tiny runs with n_heads=8 (head_dim 8) so tp=8 divides
the heads; kv heads (2) are replicated past tp=2. Every compile gets a fresh Inductor cache (cold).
Cold start: a fresh `python` that loads the artifact and runs it once on tp workers (process start to first
output), with a fresh Inductor cache. Latency: one call on a kept session (rank 0's output back included).
Writes benchmarks/results/compile_<model>_<device>_<date>.json: one record per measurement, each with device,
torch, commit, date.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

MODEL = ["model=llama_tiny", "model.graph.n_heads=8"]  # main() replaces it from --device/--model/--dtype
COLD_START = """
import sys, time, tpcompile
from tpcompile.capture import example_inputs
art = tpcompile.load(sys.argv[1])
y = art.run(*example_inputs(art.manifest.graphs["forward"]["inputs"], device="cpu", seed=1))
print("first output", tuple(y.shape), flush=True)
"""


def job(out_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tpcompile.config import CONF_DIR, register
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[f"out_dir={out_dir}", *MODEL, *overrides]))


def compile_once(out_dir: Path, backend: str, tp: int) -> tuple[Path, float]:
    from tpcompile.pipeline import build_artifact
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpc-bench-inductor-")
    start = time.perf_counter()
    path = build_artifact(job(out_dir, f"backend={backend}", f"tp={tp}")).path
    return path, time.perf_counter() - start


def cold_start(path: Path) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="tpc-bench-inductor-"),
           "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COLD_START, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "first output" not in proc.stdout:
        raise RuntimeError(f"cold start of {path} failed:\n{proc.stderr[-2000:]}")
    return seconds


def latency(path: Path, calls: int) -> list[float]:
    from tpcompile.api import Artifact
    from tpcompile.capture import example_inputs
    art = Artifact(path)
    x = example_inputs(art.manifest.graphs["forward"]["inputs"], device="cpu", seed=1)
    with art.session() as run:
        for _ in range(3):
            run(*x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run(*x)
            times.append(time.perf_counter() - start)
    return times


def provenance(device: str) -> dict:
    from tpcompile.util import provenance as cli_provenance
    if device == "cuda":
        from common import provenance as gpu_provenance  # benchmarks/common.py: GPU name and count, commit
        return {"device": "cuda", "cores": os.cpu_count(), **gpu_provenance()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"device": "cpu", "device_name": cpu, "cores": os.cpu_count(),
            "omp_threads": int(os.environ["OMP_NUM_THREADS"]), **cli_provenance()}


def measure(backend: str, tps: list[int], args, base: dict, tmp: Path, records: list, save) -> None:
    """Appends this backend's records, calling save() after each one: a time-out keeps what was measured."""
    paths = {}
    for tp in tps:
        paths[tp], seconds = compile_once(tmp / backend, backend, tp)
        records.append({**base, "what": "compile", "backend": backend, "tp": tp, "seconds": seconds})
        print(f"compile {backend:9s} tp={tp}: {seconds:7.2f} s", flush=True)
        save()
    if args.start_tp not in paths:
        paths[args.start_tp], _ = compile_once(tmp / backend, backend, args.start_tp)
    seconds = cold_start(paths[args.start_tp])
    records.append({**base, "what": "cold_start", "backend": backend, "tp": args.start_tp, "seconds": seconds})
    print(f"cold start {backend:9s} tp={args.start_tp}: {seconds:7.2f} s", flush=True)
    save()
    times = latency(paths[args.start_tp], args.calls)
    records.append({**base, "what": "latency", "backend": backend, "tp": args.start_tp, "calls": len(times),
                    "p50_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                    "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))]})
    print(f"latency {backend:9s} tp={args.start_tp}: p50 {records[-1]['p50_ms']:.2f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="eager,inductor,aoti,onnx")
    ap.add_argument("--tps", default="1,2,4,8")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--start-tp", type=int, default=2, help="tp of the cold-start and latency runs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="a conf/model preset (default: llama_tiny with 8 heads)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/compile_<model>_<device>_<date>.json")
    ap.add_argument("--keep", default=None, help="build the artifacts in this folder and keep them (default: a "
                                                 "temporary folder, removed at the end)")
    args = ap.parse_args()
    backends, tps = args.backends.split(","), [int(t) for t in args.tps.split(",")]
    global MODEL
    MODEL = ([f"model={args.model}"] if args.model else MODEL) + [f"dtype={args.dtype}"] + (
        ["runtime.device=cuda", "runtime.collectives=gloo"] if args.device == "cuda" else [])
    if args.out is None:
        from common import device_tag, result_path  # benchmarks/common.py
        args.out = str(result_path("compile", args.model or "llama_tiny", device_tag() if args.device == "cuda" else "cpu"))
    base = {**provenance(args.device), "model": args.model or "llama_tiny(n_heads=8)", "dtype": args.dtype}
    records = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tpc-bench-") as tmp:
        tmp = args.keep or tmp
        compile_once(Path(tmp) / "warmup", "eager", tps[0])  # imports and first-capture costs, not recorded
        def save():  # after every measurement: a time-out keeps what was measured
            out.write_text(json.dumps(records, indent=1) + "\n")
        for backend in backends:
            try:
                measure(backend, tps, args, base, Path(tmp), records, save)
            except Exception as e:  # keep the other backends' rows; the error is a record too
                records.append({**base, "what": "error", "backend": backend, "error": repr(e)[-3000:]})
                print(f"{backend}: {records[-1]['error']}", flush=True)
                save()
    table(records, tps)
    print(f"wrote {out}")


def table(records: list[dict], tps: list[int]) -> None:
    rows = {}
    for r in records:
        row = rows.setdefault(r["backend"], {})
        if r["what"] == "compile":
            row[f"tp={r['tp']}"] = f"{r['seconds']:.1f}"
        elif r["what"] == "cold_start":
            row["cold start s"] = f"{r['seconds']:.1f}"
        elif r["what"] == "latency":
            row["p50 ms"] = f"{r['p50_ms']:.2f}"
    for row in rows.values():
        if f"tp={tps[0]}" in row and f"tp={tps[-1]}" in row:
            row[f"tp{tps[-1]}/tp{tps[0]}"] = f"{float(row[f'tp={tps[-1]}']) / float(row[f'tp={tps[0]}']):.2f}"
    cols = [f"tp={t}" for t in tps] + [f"tp{tps[-1]}/tp{tps[0]}", "cold start s", "p50 ms"]
    print("| backend | " + " | ".join(f"compile {c} s" if c.startswith("tp=") else c for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for backend, row in rows.items():
        print(f"| {backend} | " + " | ".join(row.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main()
