"""Checkpoint I/O: compile-time re-shard throughput vs a plain sequential read of the same files, peak RSS
while re-sharding, the publish step (hash every file, write the manifest), and cold per-rank load time at
tp = 1, 2, 4: the file alone (mmap + touch every page), and as a worker does it (hash check, then mmap + touch).

    python benchmarks/checkpoint_io.py [--layers 6] [--dir /tmp/tpc_ckpt_bench]

The checkpoint (HF Llama layout, random fp32 weights, several files + index) is written on the fly, tensor by
tensor. The page cache of every file is evicted (posix_fadvise DONTNEED) before each timed read, so reads
come from disk, and dirty pages are written back first (os.sync), so no step pays for the one before. Each
measurement runs in a fresh process. Results: benchmarks/results/checkpoint-io_llama-1b-<layers>layers_cpu_<date>.json.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import result_path  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
              intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
              hidden_act="silu", rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
              tie_word_embeddings=False, dtype="float32")


def settle() -> None:
    """Before a timed step: write back what earlier steps left dirty (and let ext4 commit the deletes), so it
    does not compete with the step for the disk."""
    os.sync()


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_checkpoint(path: Path, layers: int, file_bytes: int = 500_000_000) -> int:
    from tpcompile.safetensors_io import StreamWriter
    c = {**CONFIG, "num_hidden_layers": layers}
    d, f, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_key_value_heads"] * 64
    specs = {"model.embed_tokens.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        specs.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (d, d),
                      p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
                      p + "self_attn.o_proj.weight": (d, d), p + "post_attention_layernorm.weight": (d,),
                      p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                      p + "mlp.down_proj.weight": (d, f)})
    specs.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    groups, size = [[]], 0
    for name, shape in specs.items():
        n = torch.Size(shape).numel() * 4
        if groups[-1] and size + n > file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    path.mkdir(parents=True, exist_ok=True)
    weight_map, gen = {}, torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with StreamWriter(path / file, {n: (specs[n], torch.float32) for n in names}, {"format": "pt"}) as w:
            for n in names:
                w.write(n, torch.randn(specs[n], generator=gen) * 0.02)
                weight_map[n] = file
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(c))
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def child(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


SEQUENTIAL = r"""
import json, sys, time, torch
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
buf = memoryview(bytearray(64 << 20)); n = 0; t0 = time.perf_counter()
for f in files:
    with open(f, "rb", buffering=0) as fh:
        while (k := fh.readinto(buf)):
            n += k
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}))
"""

RESHARD = r"""
import json, resource, sys, time
import tpcompile, tpcompile.build as build
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
timing = {}
inner, inner_publish = build.write_rank_weights, build.publish
def timed(*a, **k):
    timing["rss_before"] = rss(); t0 = time.perf_counter(); inner(*a, **k); timing["seconds"] = time.perf_counter() - t0
def timed_publish(*a, **k):  # hashes every file of the artifact, writes the manifest, renames
    t0 = time.perf_counter(); out = inner_publish(*a, **k); timing["publish"] = time.perf_counter() - t0; return out
build.write_rank_weights, build.publish = timed, timed_publish
t0 = time.perf_counter()
art = tpcompile.compile_pretrained(sys.argv[1], tp=int(sys.argv[2]), generate=False, out_dir=sys.argv[3])
print(json.dumps({"artifact": str(art.path), "compile_seconds": time.perf_counter() - t0, "reshard_seconds": timing["seconds"],
                  "publish_seconds": timing["publish"], "rss_before_reshard": timing["rss_before"],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

LOAD = r"""
import json, sys, time, torch
from tpcompile.runtime.weights_io import load_rank_weights
def read_bytes():
    return int(next(l for l in open("/proc/self/io") if l.startswith("read_bytes")).split()[1])
b0 = read_bytes(); t0 = time.perf_counter()
w = load_rank_weights(sys.argv[1], "cpu")
t1 = time.perf_counter()
s = sum(float(t[..., ::1024].sum()) for t in w.values())  # touch every page (4 KiB = 1024 fp32)
t2 = time.perf_counter()
print(json.dumps({"map_seconds": t1 - t0, "load_touch_seconds": t2 - t0, "read_bytes": read_bytes() - b0}))
"""

WORKER_LOAD = r"""
import json, sys, time, torch
from pathlib import Path
from tpcompile.artifact import check_files, read_manifest
from tpcompile.runtime.weights_io import load_rank_weights
art, rank = Path(sys.argv[1]), int(sys.argv[2])
m = read_manifest(art)
t0 = time.perf_counter()
check_files(m, art, [m.rank_file(rank)])  # what RankEngine does first: the hash reads the file (cold)
t1 = time.perf_counter()
w = load_rank_weights(art / m.rank_file(rank), "cpu")
s = sum(float(t[..., ::1024].sum()) for t in w.values())
t2 = time.perf_counter()
print(json.dumps({"hash_seconds": t1 - t0, "hash_load_touch_seconds": t2 - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dir", default="/tmp/tpc_ckpt_bench")
    ap.add_argument("--tp", default="1,2,4")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    ckpt = root / "ckpt"
    t0 = time.perf_counter()
    total = make_checkpoint(ckpt, a.layers)
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(list(ckpt.glob('*.safetensors')))} files, "
          f"written in {time.perf_counter() - t0:.1f} s")
    files = sorted(ckpt.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in files)
    from tpcompile.checkpoint import find_tensors
    largest_tensor = max(i.nbytes for i in find_tensors(ckpt).values())
    base = _provenance()
    records = []
    settle()
    for f in files:
        evict(f)
    seq = child(SEQUENTIAL, ckpt)
    seq_gbs = seq["bytes"] / seq["seconds"] / 1e9
    records.append({**base, "what": "sequential_read", "bytes": seq["bytes"], "seconds": seq["seconds"], "gb_per_s": seq_gbs})
    print(f"sequential read (cold): {seq_gbs:.2f} GB/s ({seq['seconds']:.2f} s)")
    for tp in map(int, a.tp.split(",")):
        settle()
        for f in files:
            evict(f)
        r = child(RESHARD, ckpt, tp, root / "engines")
        art = Path(r["artifact"])
        rank_bytes = [(art / f"rank{k}.safetensors").stat().st_size for k in range(tp)]
        rec = {**base, "what": "reshard", "tp": tp, "checkpoint_bytes": total, "reshard_seconds": r["reshard_seconds"],
               "gb_per_s": total / r["reshard_seconds"] / 1e9, "vs_sequential_read": total / r["reshard_seconds"] / 1e9 / seq_gbs,
               "compile_seconds": r["compile_seconds"], "publish_seconds": r["publish_seconds"], "peak_rss_bytes": r["peak_rss"],
               "rss_before_reshard_bytes": r["rss_before_reshard"], "largest_tensor_bytes": largest_tensor,
               "rank_file_bytes": rank_bytes}
        records.append(rec)
        print(f"tp={tp}: re-shard {rec['gb_per_s']:.2f} GB/s ({r['reshard_seconds']:.2f} s, "
              f"{rec['vs_sequential_read']:.2f}x sequential read), compile {r['compile_seconds']:.1f} s "
              f"(publish: hash + manifest {r['publish_seconds']:.2f} s), "
              f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (before re-shard {r['rss_before_reshard'] / 2**20:.0f} MiB; "
              f"largest tensor {largest_tensor / 2**20:.0f} MiB, checkpoint {total / 2**20:.0f} MiB)")
        settle()
        for k in range(tp):
            f = art / f"rank{k}.safetensors"
            evict(f)
            ld = child(LOAD, f)
            evict(f)
            ld.update(child(WORKER_LOAD, art, k))
            records.append({**base, "what": "rank_load", "tp": tp, "rank": k, "file_bytes": rank_bytes[k], **ld,
                            "gb_per_s": rank_bytes[k] / ld["load_touch_seconds"] / 1e9})
            print(f"  rank {k}: {rank_bytes[k] / 2**20:.0f} MiB, mmap {ld['map_seconds'] * 1e3:.1f} ms, "
                  f"mmap + touch every page (cold) {ld['load_touch_seconds']:.2f} s, read {ld['read_bytes'] / 2**20:.0f} MiB; "
                  f"as a worker (cold): hash {ld['hash_seconds']:.2f} s, hash + mmap + touch {ld['hash_load_touch_seconds']:.2f} s")
        shutil.rmtree(art)
    out = result_path("checkpoint-io", f"llama-1b-{a.layers}layers", "cpu")  # llama_1b's shape, fewer layers
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out}")


def _provenance() -> dict:
    from tpcompile.util import provenance
    return {"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", **provenance()}


if __name__ == "__main__":
    main()
