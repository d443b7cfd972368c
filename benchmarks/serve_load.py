"""Load on `tpcompile serve`: N concurrent streaming clients on loopback send a fixed number of requests, then
stop; per concurrency level: output tokens/s, TTFT and TPOT p50/p95/p99 (client side, per request), and
`tpcompile bench`'s streaming step p50 on the same artifact settings for comparison with TPOT at concurrency 1.

    python benchmarks/serve_load.py                                   # CPU, llama_tiny, tp=1
    python benchmarks/serve_load.py --model llama_1b --device cuda --dtype bfloat16 --backend inductor_cudagraphs
    python benchmarks/serve_load.py --guidellm                        # also run guidellm once (if installed)
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --decode-steps 8  # a shared CPU: no spinning thread teams

Requests: random token-id prompts of --prompt-len tokens, --max-tokens new tokens each, greedy (a random-weight
preset has no eos, so every request makes all its tokens). The server gets max_batch = the largest concurrency,
so TPOT at concurrency 1 runs the same static decode graph as at 32. Writes
results/serve-load_<model>_<device>_<date>.json.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, device_tag, result_path  # noqa: E402
from tpcompile.bench import percentile  # noqa: E402
from tpcompile.config import ServerConfig  # noqa: E402
from tpcompile.util import provenance  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="eager")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32, help="generation.prefill_chunk")
    p.add_argument("--decode-steps", type=int, default=ServerConfig.decode_steps,
                   help="server.decode_steps: the most decode steps per worker call")
    p.add_argument("--guidellm", action="store_true", help="also run guidellm against the server once")
    p.add_argument("--work", default=None, help="engines and logs (default: a temp dir, removed)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    work = Path(a.work or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    max_seq = -(-(a.prompt_len + a.max_tokens) // a.chunk) * a.chunk
    overrides = [f"model={a.model}", f"tp={a.tp}", f"runtime.device={a.device}", f"dtype={a.dtype}",
                 f"backend={a.backend}", f"generation.max_batch={max(levels)}", f"generation.max_seq={max_seq}",
                 f"generation.prefill_chunk={a.chunk}", f"out_dir={work / 'engines'}"]
    serve = [f"server.decode_steps={a.decode_steps}"]
    record = {"model": a.model, "tp": a.tp, "device": a.device, "dtype": a.dtype, "backend": a.backend,
              "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "requests_per_level": a.requests,
              "max_batch": max(levels), "max_seq": max_seq, "prefill_chunk": a.chunk,
              "decode_steps": a.decode_steps, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **provenance(),
              "device_name": _device_name(a.device), "levels": [],
              "how": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])}
    server, url = start_server(overrides + serve, work)
    try:
        for c in levels:
            run_level(url, a, c, requests=min(4, c), warm=True)  # warm-up: first calls, thread start
            level = run_level(url, a, c, requests=a.requests)
            record["levels"].append(level)
            print(json.dumps(level), flush=True)
        if a.guidellm:
            record["guidellm"] = run_guidellm(url, a, work)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    record["bench"] = run_bench(overrides, work)
    first = record["levels"][0]
    if first["concurrency"] == 1 and record["bench"].get("decode_ms_p50"):
        record["tpot_p50_c1_over_bench_p50"] = first["tpot_ms"]["p50"] / record["bench"]["decode_ms_p50"]
    if len(record["levels"]) > 1:
        record["throughput_ratio_last_over_first"] = (record["levels"][-1]["output_tokens_per_s"]
                                                      / record["levels"][0]["output_tokens_per_s"])
    out = result_path("serve-load", a.model, device_tag(a.tp) if a.device == "cuda" else "cpu",
                      results=Path(a.results))
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


def start_server(overrides: list[str], work: Path) -> tuple[subprocess.Popen, str]:
    out, err = work / "serve.out", work / "serve.err"
    cmd = [sys.executable, "-m", "tpcompile.cli", "serve", *overrides, "server.port=0", "server.max_queue=1024",
           f"hydra.run.dir={work / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(out, "w"), stderr=open(err, "w"))
    end = time.monotonic() + 1800  # a first compile of a large model with a compiling backend
    while not (m := re.search(r"on (http://\S+) after", out.read_text())):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"the server did not start: {err.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, m[1]


def one_request(url: str, body: dict) -> dict:
    """A streamed completion; the arrival time of every token's chunk, on this client."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"error": f"{resp.status} {resp.read()[:200]!r}"}
    times = []
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return {"error": chunk["error"]["message"]}
        if chunk["choices"] and chunk["choices"][0].get("token_ids"):
            times.append(time.perf_counter() - t0)
    conn.close()
    return {"ttft": times[0], "tpot": (times[-1] - times[0]) / max(1, len(times) - 1), "e2e": times[-1],
            "tokens": len(times)}


def run_level(url: str, a, concurrency: int, requests: int, warm: bool = False) -> dict:
    rng = random.Random(concurrency)
    bodies = [{"model": a.model, "prompt": [rng.randrange(256) for _ in range(a.prompt_len)],
               "max_tokens": a.max_tokens, "temperature": 0, "return_token_ids": True, "stream": True}
              for _ in range(requests)]
    results, lock = [], threading.Lock()

    def client():
        while True:
            with lock:
                if not bodies:
                    return
                body = bodies.pop()
            r = one_request(url, body)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    if warm:
        return {}

    def pct(key: str) -> dict:
        values = [r[key] * 1e3 for r in ok]
        return {f"p{q}": round(percentile(values, q / 100), 3) for q in (50, 95, 99)} if values else {}
    return {"concurrency": concurrency, "requests": requests, "errors": [r["error"] for r in results if "error" in r],
            "wall_s": round(wall, 3), "output_tokens": sum(r["tokens"] for r in ok),
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "requests_per_s": round(len(ok) / wall, 3), "ttft_ms": pct("ttft"), "tpot_ms": pct("tpot"),
            "e2e_ms": pct("e2e")}


def run_bench(overrides: list[str], work: Path) -> dict:
    """`tpcompile bench` on the same artifact settings (batch = max_batch, the graph the server runs)."""
    run = work / "bench"
    cmd = [sys.executable, "-m", "tpcompile.cli", "bench", *overrides, "bench.profile_steps=0",
           "bench.prompt_len=32", "bench.new_tokens=32", f"hydra.run.dir={run}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        return {"error": (r.stderr or r.stdout)[-600:]}
    rec = json.loads((run / "bench.json").read_text())
    return {k: rec[k] for k in ("batch", "decode_ms_p50", "decode_ms_p95", "decode_ms_run", "prefill_ms")}


def run_guidellm(url: str, a, work: Path) -> dict:
    """guidellm (an independent load generator, 0.8 CLI) once at concurrency 8; its figures, or why it could not
    run. It sends chat requests: ASCII prompts of prompt_len - 24 characters (one byte-tokenizer token each), so
    with the fallback chat format ("user: ...\nassistant:") they fit max_seq."""
    exe = shutil.which("guidellm")
    if exe is None:
        return {"error": "guidellm is not installed (pip install guidellm)"}
    data, out = work / "guidellm_prompts.jsonl", work / "guidellm.json"
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"prompt": "".join(rng.choice("abcdefghij ") for _ in range(a.prompt_len - 24)),
                                        "output_tokens_count": a.max_tokens}) + "\n" for _ in range(a.requests)))
    cmd = [exe, "run", "--backend", f"kind=openai_http,target={url},model={a.model}",
           "--profile", "kind=concurrent,streams=8", "--constraint", f"kind=max_requests,count={a.requests}",
           "--data", f"kind=json_file,path={data}", "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=work)
    if r.returncode or not out.is_file():
        return {"cmd": " ".join(cmd), "error": (r.stderr or r.stdout)[-1500:]}
    m = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    keys = ("time_to_first_token_ms", "time_per_output_token_ms", "inter_token_latency_ms", "request_latency",
            "output_tokens_per_second")
    summary = {k: {q: m[k]["successful"]["percentiles"][q] for q in ("p50", "p95", "p99")} for k in keys}
    summary["output_tokens_per_second"]["mean"] = m["output_tokens_per_second"]["successful"]["mean"]
    return {"cmd": " ".join(cmd), "version": _guidellm_version(exe), "requests": m["request_totals"], **summary}


def _guidellm_version(exe: str) -> str:
    return subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()


def _device_name(device: str) -> str:
    import torch
    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
