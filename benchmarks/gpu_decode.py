"""Decode at the memory-bandwidth limit on one GPU: tpcompile vs transformers (static cache, compiled) vs a
plain eager run of our own graph, in one process tree.

    python benchmarks/gpu_decode.py --models llama_1b llama_8b     # -> results/decode_llama-1b+llama-8b_<gpu>_<date>.json

For each model: our engine (`tpcompile bench`, bf16, tp=1, batch 1, 32-token prompt, 128 new tokens) with the
inductor_cudagraphs backend and with the eager backend; transformers' generate with a static cache under
torch.compile(mode="reduce-overhead") on the same config with random weights; optionally decode at batch 16
and 64 and a 2048-token prefill. The device's copy bandwidth and bf16 matmul rate are measured first.
Every record carries device, torch version, commit and date.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import REPO, ceilings, device_tag, provenance, result_path, tpcompile_bench  # benchmarks/common.py

SHAPES = {  # the presets in conf/model, for transformers' LlamaConfig
    "llama_1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, intermediate_size=5632, rope_theta=10000.0),
    "llama_8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}


def transformers_static(model: str, new=128, prompt=32) -> dict:
    """transformers' generate with a static cache, forward compiled (mode="reduce-overhead")."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[model], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    m.generation_config.cache_implementation = "static"  # generate compiles the decode step itself
    m.generation_config.pad_token_id = 0
    ids = torch.randint(1, cfg.vocab_size, (1, prompt), device="cuda")

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
    del m
    torch.cuda.empty_cache()
    return {"model": model, "engine": f"transformers {transformers.__version__} generate, static cache, compiled",
            "decode_ms_run": per_token * 1e3, "weight_bytes": weight_bytes, "batch": 1, "prompt_len": prompt,
            "new_tokens": new}


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


def enrich(r: dict, base: dict) -> dict:
    """A row with the call's ceilings, ms per token over a whole run and the fractions of them it reached."""
    r.update({k: v for k, v in base.items() if k not in r})
    if "weight_bytes" in r and "bytes_per_step" not in r:
        r["bytes_per_step"] = r["weight_bytes"]
    # ms per token over a whole run (tokens read back at the end), as transformers' figure is taken
    ms = r.get("decode_ms_run", r.get("decode_ms_p50"))
    if ms and "bytes_per_step" in r:
        r["ms_per_token"] = ms
        r["hbm_fraction_of_copy_bw"] = r["bytes_per_step"] / (ms / 1e3) / (base["copy_bandwidth_GBps"] * 1e9)
    if "weight_bytes_per_rank" in r:  # matmul work: 2 flops per streamed weight and token (bf16: 2 bytes each)
        params = (r["bytes_per_step"] - r["cache_bytes_per_rank"]) / 2
        rate = base["bf16_matmul_TFLOPs"] * 1e12
        r["prefill_matmul_fraction"] = 2 * params * r["prefill_tokens_per_s"] / rate
        if ms:
            r["decode_matmul_fraction"] = 2 * params * r["batch"] / (ms / 1e3) / rate
        r["peak_over_weights_and_cache"] = r["peak_memory_bytes"] / (r["weight_bytes_per_rank"]
                                                                     + r["cache_bytes_per_rank"])
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama_1b"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--parts", nargs="+", default=["ours", "eager", "hf"],
                    help="ours eager hf batch prefill peer checkpoint aoti")
    ap.add_argument("--peer", default=str(REPO.parent / "shared" / "peers" / "handwritten_decode.py"),
                    help="the peer decoders' script (part peer)")
    args = ap.parse_args()
    out = Path(args.out).resolve()  # the bench subprocesses run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    base = {**provenance(), **ceilings()}
    print(json.dumps(base), flush=True)
    what = "-".join(["decode"] + [p for p in args.parts if p in ("batch", "prefill")])
    path = result_path(what, "+".join(args.models), device_tag(), results=out)
    rows = []

    def add(*found: dict) -> None:  # the record is rewritten after every row: a call cut short keeps what it ran
        rows.extend(enrich(r, base) for r in found)
        path.write_text(json.dumps(rows, indent=1))

    for model in args.models:
        if "ours" in args.parts:
            add({"engine": "tpcompile inductor_cudagraphs",
                 **tpcompile_bench(model, "inductor_cudagraphs", out, profile_steps=8)})
        if "aoti" in args.parts:
            add({"engine": "tpcompile aoti_cudagraphs", **tpcompile_bench(model, "aoti_cudagraphs", out)})
        if "checkpoint" in args.parts:
            add(checkpoint_bench(model, out))
        if "peer" in args.parts:
            add(*peer(model, args.peer))
        if "eager" in args.parts:
            add({"engine": "tpcompile eager", **tpcompile_bench(model, "eager", out, new=16)})
        if "hf" in args.parts:
            try:
                add(transformers_static(model))
            except Exception as e:  # keep the other rows
                add({"model": model, "engine": "transformers", "error": repr(e)[:500]})
        if "batch" in args.parts:
            for b in (16, 64):
                add({"engine": "tpcompile inductor_cudagraphs", **tpcompile_bench(model, "inductor_cudagraphs", out,
                                                                                  batch=b, new=32, max_seq=128)})
        if "prefill" in args.parts:
            add({"engine": "tpcompile inductor_cudagraphs", **tpcompile_bench(model, "inductor_cudagraphs", out,
                                                                              prompt=2048, new=8, max_seq=2560,
                                                                              chunk=512)})
    print(f"wrote {path}")
    print(f"\n{'model':9} {'engine':40} {'b':>3} {'prompt':>6} {'ms/tok':>7} {'p50':>7} {'HBM':>6} {'prefill/s':>9} "
          f"{'mm frac':>7} {'peak/w+c':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r.get('model', '?'):9} {r.get('engine', '?')[:40]:40} ERROR {r['error'][:200]}")
            continue
        print(f"{r['model']:9} {r['engine'][:40]:40} {r.get('batch', 1):3} {r.get('prompt_len', 0):6} "
              f"{r.get('ms_per_token', 0):7.3f} {r.get('decode_ms_p50', 0):7.3f} {r.get('hbm_fraction_of_copy_bw', 0):6.1%} "
              f"{r.get('prefill_tokens_per_s', 0):9.0f} {r.get('decode_matmul_fraction', 0):7.1%} "
              f"{r.get('peak_over_weights_and_cache', 0):8.3f}")


if __name__ == "__main__":
    main()
