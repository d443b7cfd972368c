"""All-reduce + residual add + RMSNorm fused in one peer-memory kernel, against its unfused parts, on the GPUs of
one host, at the message sizes of decode: 8 KiB (one token of an 8B model's hidden state) to 1 MiB (128 tokens).

    torchrun --nproc-per-node N benchmarks/allreduce_norm.py [--out benchmarks/results]
    python benchmarks/allreduce_norm.py          # one GPU, no torchrun

Rows of D = 4096 bf16 values (8 KiB each), 1 to 128 rows. Per size, microseconds per call inside a CUDA graph
(20 calls per graph, the slowest rank's figure):
- fused: torch.ops.tpcompile.all_reduce_add_rms_norm, the one-shot peer-memory kernel (tpcompile/kernels/lamport.py);
  fused_add: torch.ops.tpcompile.all_reduce_add (the same without the norm);
- nccl: NCCL all-reduce (functional) + add + aten.rms_norm, three kernels: what the unfused graph runs;
- one_shot / two_shot: PyTorch's symmetric-memory all-reduce (input already in its symmetric buffer, no copy
  counted) + add + norm.
Before timing, the kernel is checked against an fp32 sum in rank order (allreduce_norm.rank_order): the sum
bit-identical, the norm within one bf16 rounding, the same bits on every rank; after the timed replays once more
from a CUDA graph with new inputs. On one GPU all of it runs at tp=1: the kernel's rounds and resets run, nothing is
exchanged. Rank 0 prints a table and writes results/allreduce-norm_none_<n>x<gpu>_<date>.json.
NVLink multicast stays off (common.NO_MULTICAST).
"""
import argparse
import json
import os
import sys
from datetime import timedelta

from allreduce import SIZES, in_graph, per_call
from common import NO_MULTICAST, write_collective_record

os.environ.update(NO_MULTICAST)  # before torch.distributed starts NCCL or symmetric memory

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tpcompile.kernels import lamport  # noqa: E402
from tpcompile.kernels.allreduce_norm import rank_order, reference  # noqa: E402

D, EPS = 4096, 1e-5
aten = torch.ops.aten


def inputs(rows: int, seed: int) -> tuple:
    """This rank's partial sums; the residual and weight every rank holds alike."""
    def randn(*shape, s):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16).cuda()
    rank = dist.get_rank()
    return randn(rows, D, s=1000 * seed + rank + 1), randn(rows, D, s=1000 * seed), randn(D, s=1000 * seed + 999)


def check(got, want) -> dict:
    """The kernel's (normed, s) against rank_order's: exact sum, norm error in bf16 roundings, same on every rank."""
    world, same = dist.get_world_size(), True
    for mine in got:
        everyone = torch.empty((world, *mine.shape), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(everyone, mine.contiguous(), group=dist.group.WORLD)
        same &= all(torch.equal(e, everyone[0]) for e in everyone)
    err = (got[0].float() - want[0].float()).abs().max().item() / want[0].float().abs().max().item()
    return {"sum_bit_identical": torch.equal(got[1], want[1]), "normed_max_rel_err": err,
            "same_on_every_rank": bool(same)}


def replayed_check(rows: int) -> dict:
    """One fused call captured in a CUDA graph, replayed with new inputs after all the timed replays."""
    group = dist.group.WORLD.group_name
    x, residual, weight = inputs(rows, 7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lamport.fused(x, residual, weight, EPS, False, group)
    for t, new in zip((x, residual, weight), inputs(rows, 8)):
        t.copy_(new)
    graph.replay()
    return check(out, rank_order(x, residual, weight, EPS, False, group))


def timings(rows: int) -> dict:
    group = dist.group.WORLD.group_name
    x, residual, weight = inputs(rows, 1)
    row = {"bytes": rows * D * 2, "rows": rows}
    got = lamport.fused(x, residual, weight, EPS, False, group)
    if isinstance(got, str):
        row["fused_skipped"] = got
    else:
        row["check"] = check(got, rank_order(x, residual, weight, EPS, False, group))
        fns = {"fused_us": lambda: torch.ops.tpcompile.all_reduce_add_rms_norm(x, residual, weight, EPS, False, group),
               "fused_add_us": lambda: torch.ops.tpcompile.all_reduce_add(x, residual, group)}
        for name, fn in fns.items():
            replay, inner = in_graph(fn)
            row[name] = per_call(replay, 20) / inner
    replay, inner = in_graph(lambda: reference(x, residual, weight, EPS, False, group))
    row["nccl_add_norm_us"] = per_call(replay, 20) / inner
    row.update(symm_mem_timings(x, residual, weight))
    return row


def symm_mem_timings(x, residual, weight) -> dict:
    import torch.distributed._symmetric_memory as symm_mem
    group, out = dist.group.WORLD.group_name, {}
    try:
        buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group)
        buf.copy_(x.flatten())
    except Exception as e:  # not every torch build / machine has symmetric memory
        return {"symm_mem_error": f"{type(e).__name__}: {str(e)[:200]}"}

    def one_shot():
        s = residual + torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group).view(x.shape)
        return aten.rms_norm(s, [D], weight, EPS), s

    def two_shot():  # in place: the values grow, the timing does not
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        s = residual + buf.view(x.shape)
        return aten.rms_norm(s, [D], weight, EPS), s
    for name, fn in (("one_shot_add_norm_us", one_shot), ("two_shot_add_norm_us", two_shot)):
        try:
            replay, inner = in_graph(fn)
            out[name] = per_call(replay, 20) / inner
        except Exception as e:  # not capturable here: timed uncaptured instead, under another name
            torch.cuda.synchronize()
            out[name] = None
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
            out[name.replace("_us", "_uncaptured_us")] = per_call(fn)
    return out


def table(rows: list[dict]) -> str:
    cols = ["fused_us", "fused_add_us", "nccl_add_norm_us", "one_shot_add_norm_us", "two_shot_add_norm_us"]
    lines = ["bytes    " + " ".join(f"{c.removesuffix('_us'):>18}" for c in cols) + "   (us per call, CUDA graph)"]
    for r in rows:
        cells = [f"{r[c]:18.2f}" if isinstance(r.get(c), float) else f"{'-':>18}" for c in cols]
        lines.append(f"{r['bytes']:<8} " + " ".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29512")):
        os.environ.setdefault(key, value)  # plain `python` on one GPU
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timedelta(seconds=120))
    world = dist.get_world_size()
    rows = []
    for size in SIZES:
        rows.append(timings(size // (2 * D)))
        if dist.get_rank() == 0:
            print(json.dumps(rows[-1]), flush=True)
    after = replayed_check(1)
    space = lamport.workspace(dist.group.WORLD.group_name, torch.bfloat16, torch.device("cuda", local_rank))
    late = space.late_rows() if not isinstance(space, str) else None
    if dist.get_rank() == 0:
        print(table(rows), flush=True)
        print(f"after the timed replays: {json.dumps(after)}; rows that gave up waiting: {late}", flush=True)
        write_collective_record("all-reduce + residual add + RMSNorm, bf16, rows of 4096, one host", "allreduce-norm",
                                world, rows, args.out, check_after_replays=after, late_rows=late,
                                command=f"torchrun --nproc-per-node {world} benchmarks/allreduce_norm.py")
    sys.stdout.flush()
    os._exit(0)  # no teardown: a symmetric-memory group's destroy has hung (benchmarks/allreduce.py)


if __name__ == "__main__":
    main()
