"""Decode on one GPU: tpcompile next to transformers' generate (static cache, compiled) and a plain eager run of
our own graph; long-context decode against its bandwidth floor; batched decode; pass ablations; the first token
of an already compiled artifact in a fresh process. The device's copy bandwidth and bf16 matmul rate are measured
first; every row carries device, torch version, commit and date.

    python benchmarks/gpu_decode.py --models llama_1b llama_8b     # -> results/decode_llama-1b+llama-8b_<gpu>_<date>.json

`--parts` run in the order given, for each model; `--backend` (default inductor_cudagraphs) is our engine's
backend in ours, ablation, batch and long. Our rows are `tpcompile bench` (bf16, tp=1) in a subprocess.

| part | what | record |
|---|---|---|
| ours | batch 1, 32-token prompt, 128 new tokens, 8 profiled steps (kernels per step) | decode |
| ablation | ours with `backend.skip_passes=[P]` for each P of `--skips` (fold_repeat_kv fuse_linears decode_attention share_attention_mask), then ours under each Inductor setting of `--inductor-options` (run with ours) | decode |
| eager | our graph under `backend=eager`, 16 new tokens | decode |
| aoti | ours under `backend=aoti_cudagraphs`, 8 profiled steps | decode |
| hf | transformers' generate, static cache, compiled, random weights | decode |
| checkpoint | the same shape saved as a transformers checkpoint, compiled through `model=hf` | decode |
| peer | the hand-written gpt-fast-style decoder of `--peer`, in its own process | decode |
| batch | `--batches` (8 and 32; 32-token prompt, 64 new, max_seq 128), ours and transformers | decode-batch |
| prefill | a 2048-token prompt in chunks of 512 | decode-prefill |
| long | prompts of 1000, 4000, 16000 tokens in one max_seq-16384 artifact, decode_attention on and off | decode-long |
| first_token | `tpcompile generate artifact=DIR` in a fresh process, caches cold then warm | first-token |

long: chunks of 512, 64 new tokens, then the same with `backend.skip_passes=[decode_attention]` (attention over
the whole static cache instead of the filled prefix). first_token: compile a generation artifact (batch 1,
max_seq 256, chunks of 32, as `ours` and `aoti` bench it, so theirs is reused) per `--first-token-backends`, then
generate 16 tokens in a fresh process with empty Inductor and Triton caches (cold) and again with the caches that
run left (warm): the process's wall time and the first-token time it reports.

Every bench row gets, from the bench record's own floor (`floor_ms_filled`): `kv_bytes_filled` (mean KV bytes of
the filled slots per decode step), `floor_ms` ((streamed weights + filled KV) / the bench's copy bandwidth) and
`over_floor` (ms per token over it). Its `kernel_busy` (from `tpcompile bench`) is the profiled kernel time of a step
over a whole run's step: under 1, the GPU waited for launches or the host (the profiler's own wall per step is
longer than an unprofiled step, so it is no denominator).
A prompt of 16,000 tokens fits a 16,384-slot artifact with 64 new tokens (`tpcompile bench` checks
prompt + new - 1 <= max_seq; the chunks' left padding goes to the scratch slot).

Engines, checkpoints and temporary files go to `--work` (default: `--out`); each record is rewritten after every
row, so a call cut short keeps what it ran. On one H200, the first `long` run compiles llama_8b with AOTInductor
in about 260 s, and each bench after it takes 40-50 s; so one 600-s call holds the long rows (pass on) and
another the first-token rows with a batch-1 bench of the same artifact:

    python benchmarks/gpu_decode.py --models llama_8b --backend aoti_cudagraphs --parts long \
        --long-prompts 32 1000 4000 16000 --long-attention on --work /tmp/w --out $OUT
    python benchmarks/gpu_decode.py --models llama_8b --parts first_token aoti \
        --first-token-backends aoti_cudagraphs --work /tmp/w --out $OUT
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from tpcompile.lower.inductor import user_options

from common import REPO, ceilings, cli, device_tag, provenance, result_path, tpcompile_bench  # benchmarks/common.py

SHAPES = {  # the presets in conf/model, for transformers' LlamaConfig
    "llama_1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, intermediate_size=5632, rope_theta=10000.0),
    "llama_8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}
FIRST_TOKEN = re.compile(r"first token (?:after )?([0-9.]+) ?s")  # in the line `tpcompile generate` ends with


def transformers_static(model: str, new=128, prompt=32, batch=1) -> dict:
    """transformers' generate with a static cache, forward compiled (mode="reduce-overhead"), on `batch` prompts."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[model], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    m.generation_config.cache_implementation = "static"  # generate compiles the decode step itself
    m.generation_config.pad_token_id = 0
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device="cuda")  # (B, T)

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(3):
        timed(new)
    full = sorted(timed(new) for _ in range(3))[1]
    first = sorted(timed(1) for _ in range(3))[1]
    per_token = (full - first) / (new - 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    table = m.get_input_embeddings().weight  # looked up, one row per token: no matmul work
    matmul_bytes = weight_bytes - table.numel() * table.element_size()
    del m, table
    torch.cuda.empty_cache()
    return {"model": model, "engine": f"transformers {transformers.__version__} generate, static cache, compiled",
            "decode_ms_run": per_token * 1e3, "weight_bytes": weight_bytes, "matmul_weight_bytes": matmul_bytes,
            "batch": batch, "prompt_len": prompt, "new_tokens": new}


def peer(model: str, script: str) -> list[dict]:
    """The peer script's hand-written gpt-fast-style decoder (eager and compiled) for this model's shape, in its
    own process: its JSON lines as rows. (transformers' generate is the part "hf".)"""
    size = {"llama_1b": "1b", "llama_8b": "8b"}[model]
    code = (f"import sys; sys.path.insert(0, {str(Path(script).resolve().parent)!r}); import {Path(script).stem} as p; "
            f"p.bench_gptfast(p.SIZES[{size!r}], {size!r}, p.copy_bandwidth())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    rows = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if "ms_per_token" in rec:  # weight_gb: every weight but the embedding table, as our bytes_per_step
                rows.append({"model": model, "engine": f"peer: {rec['system']}", "decode_ms_run": rec["ms_per_token"],
                             "bytes_per_step": rec["weight_gb"] * 1e9, **rec})
    if r.returncode or not rows:
        rows.append({"model": model, "engine": "peer", "error": (r.stderr or r.stdout)[-600:]})
    return rows


def checkpoint_bench(model: str, out: Path) -> dict:
    """The same shape as a Hugging Face checkpoint (random weights, bf16, several files), compiled through
    model=hf (transformers' own modeling code captured with the static cache, plan auto) and benched as the
    preset is."""
    from transformers import LlamaConfig, LlamaForCausalLM
    path = out / f"ckpt_{model}"
    if not (path / "config.json").is_file():
        cfg = LlamaConfig(**SHAPES[model], max_position_embeddings=8192, tie_word_embeddings=False)
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(path, max_shard_size="5GB")
        del m
        torch.cuda.empty_cache()
    rec = tpcompile_bench("hf", "inductor_cudagraphs", out, extra=(f"model.path={path}",))
    return {**rec, "model": model, "engine": "tpcompile inductor_cudagraphs, model=hf (transformers' code)"}


def generation_artifact(model: str, backend: str, work: Path, device="cuda", dtype="bfloat16", max_seq=256,
                        chunk=32) -> dict:
    """`tpcompile compile kv_cache=true` at batch 1 (by default at the shape the part `ours` benches: max_seq 256,
    chunks of 32), so an artifact built there is reused: {"artifact": DIR, "compile_seconds": s} or {"error": ...}."""
    ran = cli("compile", "kv_cache=true", f"model={model}", "tp=1", f"dtype={dtype}", f"runtime.device={device}",
              f"backend={backend}", f"generation.max_seq={max_seq}", "generation.max_batch=1",
              f"generation.prefill_chunk={chunk}",
              f"out_dir={work / 'engines'}", f"hydra.run.dir={work / 'hydra' / f'compile_{model}_{backend}'}")
    found = re.search(r"^artifact: (.+)$", ran["stdout"], re.M)
    if ran["rc"] != 0 or not found:
        return {"error": f"compile exit {ran['rc']}: {(ran['stderr'] or ran['stdout'])[-600:]}"}
    return {"artifact": found[1].strip(), "compile_seconds": ran["seconds"]}


def generate_once(artifact: str, caches: Path, hydra_dir: Path, device="cuda") -> dict:
    """`tpcompile generate artifact=DIR` (16 new tokens) in a fresh process whose Inductor and Triton caches are
    under `caches`: its wall time and its first-token time (from its generate.json, else from the line it ends
    with; None when neither has one)."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    ran = cli("generate", f"artifact={artifact}", "tp=1", f"runtime.device={device}", "generation.max_new_tokens=16",
              "generation.prompt=Once upon a time", f"hydra.run.dir={hydra_dir}", env=env)
    print(ran["stdout"][-1500:], ran["stderr"][-1500:] if ran["rc"] else "", flush=True)
    record = hydra_dir / "generate.json"
    done = json.loads(record.read_text()) if record.is_file() and ran["rc"] == 0 else {}
    first = done.get("first_token_seconds")
    found = FIRST_TOKEN.search(ran["stdout"])
    row = {"process_seconds": ran["seconds"], "first_token_seconds": first or (float(found[1]) if found else None),
           "first_token_process_seconds": done.get("first_token_process_seconds"),
           "rc": ran["rc"], "last_line": (ran["stdout"].strip().splitlines() or [""])[-1][-300:]}
    if ran["rc"] != 0:
        row["error"] = (ran["stderr"] or ran["stdout"])[-600:]
    return row


def first_token(model: str, backend: str, work: Path, device="cuda", dtype="bfloat16", shape=(256, 32)) -> list[dict]:
    """Time to the first token of a compiled artifact in a fresh process: Inductor and Triton caches empty
    (cold), then the caches that run left (warm)."""
    head = {"model": model, "backend": backend, "engine": f"tpcompile {backend} generate, artifact=DIR",
            "new_tokens": 16}
    built = generation_artifact(model, backend, work, device, dtype, *shape)
    if "error" in built:
        return [{**head, **built}]
    caches = Path(tempfile.mkdtemp(prefix=f"caches_{model}_{backend}_", dir=work))
    rows = []
    for state in ("cold", "warm"):
        ran = generate_once(built["artifact"], caches, work / "hydra" / f"generate_{model}_{backend}_{state}", device)
        rows.append({**head, "caches": state, **built, **ran})
    shutil.rmtree(caches, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------ parts

def bench(args, model: str, backend: str, work: Path, extra=(), tag="", **kw) -> dict:
    """tpcompile_bench with the call's --overrides before the row's own `extra` (rows with overrides carry them and
    get their own folders)."""
    if args.overrides:
        tag = "-".join(filter(None, (tag, f"overrides-{zlib.crc32(' '.join(args.overrides).encode()):08x}")))
    rec = tpcompile_bench(model, backend, work, extra=(*args.overrides, *extra), tag=tag, **kw)
    return {**rec, "overrides": args.overrides} if args.overrides else rec


def part_ours(model, args, work):
    yield {"engine": f"tpcompile {args.backend}", **bench(args, model, args.backend, work, profile_steps=8)}


def part_ablation(model, args, work):
    """ours with one pass left out, then ours under other Inductor settings (TPCOMPILE_INDUCTOR_OPTIONS, part of the
    artifact's key)"""
    for skipped in args.skips:
        yield {"engine": f"tpcompile {args.backend}, skip {skipped}", "skip_passes": [skipped],
               **bench(args, model, args.backend, work, profile_steps=8,
                       extra=(f"backend.skip_passes=[{skipped}]",), tag=f"skip-{skipped}")}
    for i, options in enumerate(args.inductor_options):
        yield {"engine": f"tpcompile {args.backend}, Inductor {options}", "inductor_options": json.loads(options),
               **bench(args, model, args.backend, work, profile_steps=8, tag=f"options-{i}",
                       env={"TPCOMPILE_INDUCTOR_OPTIONS": options})}


def part_aoti(model, args, work):
    yield {"engine": "tpcompile aoti_cudagraphs", **bench(args, model, "aoti_cudagraphs", work, profile_steps=8)}


def part_checkpoint(model, args, work):
    yield checkpoint_bench(model, work)


def part_peer(model, args, work):
    yield from peer(model, args.peer)


def part_eager(model, args, work):
    yield {"engine": "tpcompile eager", **bench(args, model, "eager", work, new=16)}


def part_hf(model, args, work, batch=1, new=128):
    try:
        yield transformers_static(model, new=new, batch=batch)
    except Exception as e:  # keep the other rows
        yield {"model": model, "engine": "transformers", "batch": batch, "error": repr(e)[:500]}


def part_batch(model, args, work):
    for b in args.batches:
        yield {"engine": f"tpcompile {args.backend}",
               **bench(args, model, args.backend, work, batch=b, new=64, max_seq=128)}
        yield from part_hf(model, args, work, batch=b, new=64)


def part_prefill(model, args, work):
    yield {"engine": "tpcompile inductor_cudagraphs",
           **bench(args, model, "inductor_cudagraphs", work, prompt=2048, new=8, max_seq=2560, chunk=512)}


def part_long(model, args, work):
    """one artifact per setting of decode_attention (the prompt length is not part of its key)"""
    for attention in args.long_attention:
        extra = () if attention == "on" else ("backend.skip_passes=[decode_attention]",)
        for prompt in args.long_prompts:
            yield {"engine": f"tpcompile {args.backend}, decode_attention {attention}", "decode_attention": attention,
                   **bench(args, model, args.backend, work, prompt=prompt, new=64, max_seq=args.long_max_seq,
                           chunk=512, extra=extra, tag=f"attention-{attention}")}


def part_first_token(model, args, work):
    for backend in args.first_token_backends:
        yield from first_token(model, backend, work, shape=args.first_token_shape)


PARTS = {  # part -> (record name, rows for one model)
    "ours": ("decode", part_ours), "ablation": ("decode", part_ablation), "eager": ("decode", part_eager),
    "aoti": ("decode", part_aoti), "hf": ("decode", part_hf), "checkpoint": ("decode", part_checkpoint),
    "peer": ("decode", part_peer), "batch": ("decode-batch", part_batch), "prefill": ("decode-prefill", part_prefill),
    "long": ("decode-long", part_long), "first_token": ("first-token", part_first_token),
}


# ------------------------------------------------------------------------------------------ rows and records

def floor(r: dict) -> None:
    """The step's floor from the bench record: (streamed weights + the filled cache slots) / the bench's copy
    bandwidth, the filled cache bytes, and ms per token (whole run) over the floor."""
    if r.get("floor_ms_filled") and r.get("ms_per_token"):
        r["floor_ms"] = r["floor_ms_filled"]
        r["kv_bytes_filled"] = r["bytes_per_step_filled"] - r["bytes_per_step"] + r["cache_bytes_per_rank"]
        r["over_floor"] = r["ms_per_token"] / r["floor_ms"]


def enrich(r: dict, base: dict) -> dict:
    """A row with the call's ceilings, ms per token over a whole run and the fractions of them it reached."""
    r.update({k: v for k, v in base.items() if k not in r})
    if "weight_bytes" in r and "bytes_per_step" not in r:
        r["bytes_per_step"] = r["weight_bytes"]
    # ms per token over a whole run (tokens read back at the end), as transformers' figure is taken
    ms = r.get("decode_ms_run", r.get("decode_ms_p50"))
    rate = base["bf16_matmul_TFLOPs"] * 1e12
    if ms and "bytes_per_step" in r:
        r["ms_per_token"] = ms
        r["hbm_fraction_of_copy_bw"] = r["bytes_per_step"] / (ms / 1e3) / (base["copy_bandwidth_GBps"] * 1e9)
        r["tokens_per_s"] = r.get("batch", 1) / (ms / 1e3)
    if "weight_bytes_per_rank" in r:  # matmul work: 2 flops per streamed weight and token (bf16: 2 bytes each)
        params = (r["bytes_per_step"] - r["cache_bytes_per_rank"]) / 2
        r["prefill_matmul_fraction"] = 2 * params * r["prefill_tokens_per_s"] / rate
        if ms:
            r["decode_matmul_fraction"] = 2 * params * r["batch"] / (ms / 1e3) / rate
        r["peak_over_weights_and_cache"] = r["peak_memory_bytes"] / (r["weight_bytes_per_rank"]
                                                                     + r["cache_bytes_per_rank"])
        floor(r)
    elif ms and "matmul_weight_bytes" in r:  # transformers: the same count from its own weights
        r["decode_matmul_fraction"] = r["matmul_weight_bytes"] * r["batch"] / (ms / 1e3) / rate
    return r


def recorder(models: list[str], out: Path, base: dict):
    """add(record name, row): the row enriched, its record (results/<name>_<models>_<gpu>_<date>.json, named
    at its first row) rewritten, so a call cut short keeps what it ran. records: name -> (path, rows)."""
    records = {}

    def add(what: str, row: dict) -> None:
        if what not in records:
            records[what] = (result_path(what, "+".join(models), device_tag(), results=out), [])
        path, rows = records[what]
        rows.append(enrich(row, base))
        path.write_text(json.dumps(rows, indent=1))

    return add, records


def cell(r: dict, key: str, fmt: str, width: int) -> str:
    return "-".rjust(width) if r.get(key) is None else format(r[key], fmt).rjust(width)


def summary(rows: list[dict]) -> None:
    """One line a row: decode figures, then the first-token rows."""
    columns = [("batch", "d", 3, "b"), ("prompt_len", "d", 6, "prompt"), ("ms_per_token", ".3f", 7, "ms/tok"),
               ("decode_ms_p50", ".3f", 7, "p50"), ("hbm_fraction_of_copy_bw", ".1%", 6, "HBM"),
               ("tokens_per_s", ".0f", 7, "tok/s"), ("decode_matmul_fraction", ".1%", 7, "mm frac"),
               ("kernels_per_step", ".0f", 6, "kern"), ("kernel_busy", ".0%", 5, "busy"),
               ("kv_bytes_filled", ".3g", 9, "KV bytes"),
               ("floor_ms", ".3f", 7, "floor"), ("over_floor", ".2f", 6, "/floor"),
               ("peak_over_weights_and_cache", ".3f", 8, "peak/w+c")]
    timed = [("caches", "", 5, "cache"), ("compile_seconds", ".1f", 9, "compile s"),
             ("process_seconds", ".1f", 9, "process s"), ("first_token_seconds", ".2f", 11, "1st token s")]
    for group, cols in (([r for r in rows if "caches" not in r], columns), ([r for r in rows if "caches" in r], timed)):
        if not group:
            continue
        print(f"\n{'model':9} {'engine':52} " + " ".join(title.rjust(w) for _, _, w, title in cols))
        for r in group:
            line = f"{r.get('model', '?'):9} {r.get('engine', '?')[:52]:52} "
            if "error" in r and "caches" not in r:
                print(line + f"ERROR {r['error'][:200]!r}")
                continue
            print(line + " ".join(cell(r, key, fmt, w) for key, fmt, w, _ in cols)
                  + (f"  ERROR {r['error'][:120]!r}" if "error" in r else ""))


def inductor_options(text: str) -> str:
    """An --inductor-options value, checked as the bench subprocess will read it (TPCOMPILE_INDUCTOR_OPTIONS)."""
    try:
        user_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_1b"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the records go")
    ap.add_argument("--work", default=None, help="engines, checkpoints, temporary files (default: --out)")
    ap.add_argument("--parts", nargs="+", default=["ours", "eager", "hf"], choices=list(PARTS), metavar="PART",
                    help=f"run in the order given: {' '.join(PARTS)}")
    ap.add_argument("--backend", default="inductor_cudagraphs", help="our engine's backend in ours, ablation, "
                                                                     "batch and long")
    ap.add_argument("--first-token-backends", nargs="+", default=["aoti_cudagraphs", "inductor_cudagraphs"],
                    help="the backends the part first_token compiles and starts")
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32], help="the batch sizes of the part batch")
    ap.add_argument("--skips", nargs="*", default=["fold_repeat_kv", "fuse_linears", "decode_attention",
                                                    "share_attention_mask"],
                    help="the passes the part ablation leaves out, one row each")
    ap.add_argument("--inductor-options", nargs="*", default=[], metavar="JSON", type=inductor_options,
                    help="Inductor settings the part ablation also runs, one row each, "
                         "e.g. '{\"combo_kernels\": true}'")
    ap.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for every tpcompile row, e.g. model.graph.n_layers=8 (a cheaper engine "
                         "with the model's layer shapes for A/B rows in one call)")
    ap.add_argument("--long-prompts", nargs="+", type=int, default=[1000, 4000, 16000],
                    help="prompt lengths of the part long")
    ap.add_argument("--first-token-shape", nargs=2, type=int, default=[256, 32], metavar=("MAX_SEQ", "CHUNK"),
                    help="the artifact first_token compiles or reuses (16384 512: the one the part long built)")
    ap.add_argument("--long-max-seq", type=int, default=16384, help="the cache length of the part long")
    ap.add_argument("--long-attention", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="decode_attention settings of the part long (off: backend.skip_passes=[decode_attention])")
    ap.add_argument("--peer", default=str(REPO.parent / "shared" / "peers" / "handwritten_decode.py"),
                    help="the peer decoders' script (part peer)")
    return ap.parse_args()


def main():
    args = parse_args()
    out = Path(args.out).resolve()  # the bench subprocesses run in the repository root
    work = Path(args.work).resolve() if args.work else out
    for folder in (out, work):
        folder.mkdir(parents=True, exist_ok=True)
    base = {**provenance(), **ceilings()}
    print(json.dumps(base), flush=True)
    add, records = recorder(args.models, out, base)
    for model in args.models:
        for part in dict.fromkeys(args.parts):
            what, rows = PARTS[part]
            for row in rows(model, args, work):
                add(what, {"model": model, **row})
    for path, _ in records.values():
        print(f"wrote {path}")
    summary([r for _, rows in records.values() for r in rows])


if __name__ == "__main__":
    main()
