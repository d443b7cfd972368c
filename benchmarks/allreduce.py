"""Small-message all-reduce latency on the GPUs of one host: what every layer of a batch-1 decode waits on
(two all-reduces of hidden * 2 bytes, 8 KiB for llama_8b, per layer).

    torchrun --nproc-per-node 4 benchmarks/allreduce.py --out benchmarks/results

Per message size (bf16, 8 KiB to 1 MiB), the latency of one all-reduce
- with NCCL, launched eagerly (host launch cost included),
- with NCCL captured in a CUDA graph (how the decode step runs it: inductor_cudagraphs),
- with PyTorch's symmetric-memory one-shot and two-shot all-reduce (P2P over NVLink, no multicast), where
  they run on this torch and machine; an error is recorded otherwise.
Rank 0 writes one JSON record (device, torch, commit, date). NVLink multicast stays off (common.NO_MULTICAST).
"""
import argparse
import json
import os
import sys
from datetime import timedelta

from common import NO_MULTICAST, write_collective_record

os.environ.update(NO_MULTICAST)  # before torch.distributed starts NCCL

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]


def per_call(fn, repeat: int = 200) -> float:
    """Microseconds per call, the slowest rank's figure (every rank times the same loop)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    us = torch.tensor([start.elapsed_time(end) * 1e3 / repeat], device="cuda")
    dist.all_reduce(us, op=dist.ReduceOp.MAX)
    return us.item()


def in_graph(fn, inner: int = 20):
    """fn captured `inner` times in one CUDA graph; returns a callable that replays it once per `inner` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return graph.replay, inner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timedelta(seconds=120))
    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    rows = []
    for size in SIZES:
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        row = {"bytes": size, "nccl_eager_us": per_call(lambda: dist.all_reduce(x))}
        replay, inner = in_graph(lambda: dist.all_reduce(x))
        row["nccl_cuda_graph_us"] = per_call(replay, 20) / inner
        for name, op in (("symm_mem_one_shot_us", "one_shot_all_reduce"), ("symm_mem_two_shot_us", "two_shot_all_reduce_")):
            try:
                import torch.distributed._symmetric_memory as symm_mem
                buf = symm_mem.empty(size // 2, dtype=torch.bfloat16, device="cuda")
                symm_mem.rendezvous(buf, group)
                buf.fill_(1)
                fn = getattr(torch.ops.symm_mem, op)
                out = fn(buf, "sum", group)  # one-shot returns a new tensor; two-shot reduces buf in place
                if not torch.allclose(out.float(), torch.full_like(out.float(), float(world))):
                    raise RuntimeError(f"{op} gave {out.float().mean().item()}, expected {world}")
                row[name] = per_call(lambda: fn(buf, "sum", group))  # in place: values grow, timing does not
            except Exception as e:  # not every torch build / machine runs these
                row[name] = None
                row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        if local_rank == 0:
            print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        write_collective_record("all_reduce latency, bf16, one host", "allreduce", world, rows, args.out)
    sys.stdout.flush()
    os._exit(0)  # no teardown: a symmetric-memory group's destroy has hung here (2-GPU H200 run)


if __name__ == "__main__":
    main()
