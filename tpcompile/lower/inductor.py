"""inductor: the eager engine file, compiled with torch.compile when a worker loads it.
Inductor understands the functional collectives in the graph; each rank compiles the same graph.
inductor_cudagraphs: the same with mode="reduce-overhead", so each graph replays as one CUDA graph
(static shapes, weights and KV cache at fixed addresses: what decode needs on a GPU).

On CUDA with several NCCL ranks, small all-reduces (<= 128 KiB, a decode step's) are lowered to PyTorch's
symmetric-memory one-shot kernel: every rank reads its peers' buffers over NVLink in one kernel, no NCCL
launch, no multicast. runtime.one_shot_all_reduce=false (env TPC_ONE_SHOT_ALL_REDUCE=0) keeps NCCL."""
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from tpcompile.lower import eager

ENV_ONE_SHOT = "TPC_ONE_SHOT_ALL_REDUCE"
log = logging.getLogger(__name__)
lower = eager.lower


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / files[0], weights, device)
    one_shot_all_reduce(torch.device(device))
    return torch.compile(gm, fullgraph=True, dynamic=False)


def load_cudagraphs(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / files[0], weights, device)
    one_shot_all_reduce(torch.device(device))
    return torch.compile(gm, fullgraph=True, dynamic=False, mode="reduce-overhead")


def one_shot_all_reduce(device: torch.device) -> bool:
    """Let Inductor lower small sum all-reduces of the default group to symm_mem.one_shot_all_reduce.
    Returns whether it is on (off on CPU, gloo, one rank, or when the env switch says 0)."""
    if (device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1
            or dist.get_backend() != "nccl" or os.environ.get(ENV_ONE_SHOT, "1") == "0"):
        return False
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
        with warnings.catch_warnings():  # deprecated (a no-op) on newer torch, needed on 2.11
            warnings.simplefilter("ignore")
            enable_symm_mem_for_group(dist.group.WORLD.group_name)
        torch._inductor.config._collective.auto_select = True
        return True
    except Exception as e:  # an older or CPU-only build: NCCL all-reduces, as before
        log.warning("one-shot all-reduce unavailable (%s); small all-reduces stay on NCCL", e)
        return False
