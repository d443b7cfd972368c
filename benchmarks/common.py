"""What every benchmark record carries: where and when it ran, the device's ceilings measured in the same
process (copy bandwidth counting reads + writes, bf16 matmul rate), and where it is written
(results/<what>_<model>_<device>_<date>.json, `result_path`)."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tpcompile.util import provenance as cli_provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def provenance() -> dict:
    return {"device_name": torch.cuda.get_device_name(), "device_count": torch.cuda.device_count(),
            **cli_provenance()}


def device_tag(count: int = 1) -> str:
    """The device part of a result name: "cpu", or the GPU's model number ("h100") with the count when a
    record spans several ("4xh200")."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    tag = (found.group(1) if found else name).lower()
    return f"{count}x{tag}" if count > 1 else tag


def result_path(what: str, model: str, device: str, date: str | None = None, results: Path = RESULTS) -> Path:
    """results/<what>_<model>_<device>_<date>.json. Underscores separate the fields, so inside a field they become
    hyphens (llama_8b -> llama-8b); several models join with "+", written "." (the GPU machine sends back only
    files named with letters, digits, ".", "-" and "_"; older records have the "+"); "none" where no model is
    involved. date is YYYY-MM-DD (today, UTC, by default); a second record with the same name gets -2, -3, ...
    after the date."""
    def field(text: str) -> str:
        return re.sub(r"[^a-z0-9.-]+", "-", text.lower().replace("_", "-").replace("+", ".")).strip("-")
    date = date or time.strftime("%Y-%m-%d", time.gmtime())
    stem = f"{field(what)}_{field(model)}_{field(device)}_{date}"
    path, n = Path(results) / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = Path(results) / f"{stem}-{n}.json"
    return path


def timed(fn, repeat: int) -> float:
    """Seconds per call of fn on the current GPU (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def ceilings() -> dict:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy = 2 * a.numel() / timed(lambda: b.copy_(a), 20)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3 / timed(lambda: x @ y, 10)
    return {"copy_bandwidth_GBps": copy / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}


def tpcompile_bench(model: str, backend: str, out: Path, batch=1, prompt=32, new=128, max_seq=256, chunk=32, tp=1,
                    profile_steps=0, extra=(), timeout_s=900, tag="", env=None) -> dict:
    """`tpcompile bench` on cuda in a subprocess (bf16); its JSON record, or {"error": ...}. tag names the run's
    folders apart from a run of the same model, backend, batch and prompt with other `extra` overrides or `env`
    (added to the subprocess's environment)."""
    suffix = f"_{tag}" if tag else ""
    results = out / f"tmp_{model}_tp{tp}_{backend}_b{batch}_p{prompt}{suffix}"
    cmd = ["bench", f"model={model}", f"tp={tp}", "dtype=bfloat16",
           "runtime.device=cuda", f"backend={backend}", f"generation.max_batch={batch}", f"generation.max_seq={max_seq}",
           f"generation.prefill_chunk={chunk}", f"bench.prompt_len={prompt}", f"bench.new_tokens={new}",
           f"bench.profile_steps={profile_steps}", f"bench.results_dir={results}", f"out_dir={out / 'engines'}",
           f"hydra.run.dir={out / 'hydra'}/{model}_tp{tp}_{backend}_{batch}_{prompt}{suffix}", *extra]
    print(f"{time.strftime('%H:%M:%S')} bench {model} {backend} batch {batch} prompt {prompt} {tag}".rstrip(), flush=True)
    ran = cli(*cmd, env=env, timeout_s=timeout_s)
    print(ran["stdout"][-1500:], ran["stderr"][-1500:] if ran["rc"] else "", flush=True)
    files = glob.glob(str(results / "*.json"))
    if ran["rc"] == "timeout":
        return {"model": model, "tp": tp, "backend": backend, "error": f"timed out after {timeout_s} s"}
    if ran["rc"] or not files:
        return {"model": model, "tp": tp, "backend": backend, "error": (ran["stderr"] or ran["stdout"])[-600:]}
    rec = json.loads(Path(files[0]).read_text())
    rec["wall_seconds_with_compile"] = ran["seconds"]
    return rec


def child(code: str, *argv: str, timeout: int = 300, env: dict | None = None) -> dict:
    """`python -c code argv...` in its own process, so a crash (SIGSEGV) is a result: its exit status, the
    last "step: ..." line it printed and the tail of its output."""
    try:
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout, env=env)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", str(e.stdout or "")
    steps = [line for line in text.splitlines() if line.startswith("step: ")]
    return {"rc": rc, "reached": steps[-1] if steps else None,
            "tail": "\n".join(line for line in text.splitlines() if "Warning" not in line)[-1500:]}


def write_collective_record(what: str, name: str, world: int, rows: list, out, **extra) -> Path:
    """The record of a collective benchmark on the GPUs of one host (rank 0 writes it):
    results/<name>_none_<n>x<gpu>_<date>.json with provenance, NCCL's version and the multicast settings."""
    record = {**provenance(), "what": what, "world_size": world,
              "nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows,
              "env": {k: os.environ.get(k) for k in NO_MULTICAST}, **extra}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(name, "none", device_tag(world), results=out)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}", flush=True)
    return path



def cli(*args: str, env: dict | None = None, timeout_s: int = 900) -> dict:
    """`python -m tpcompile.cli args...` from the repository root in its own process group (NVLink multicast off,
    env added): exit status ("timeout" after timeout_s, when the whole group, workers included, is killed), wall
    seconds, stdout and stderr."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "tpcompile.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, **NO_MULTICAST, **(env or {})})
    try:
        stdout, stderr = p.communicate(timeout=timeout_s)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        rc = "timeout"
    return {"rc": rc, "seconds": time.perf_counter() - t0, "stdout": stdout, "stderr": stderr}
