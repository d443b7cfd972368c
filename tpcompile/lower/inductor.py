"""inductor: the eager engine file, compiled with torch.compile when a worker loads it.
Inductor understands the functional collectives in the graph; each rank compiles the same graph.
inductor_cudagraphs: the same with mode="reduce-overhead", so each graph replays as one CUDA graph
(static shapes, weights and KV cache at fixed addresses: what decode needs on a GPU)."""
from pathlib import Path

import torch

from tpcompile.lower import eager

lower = eager.lower


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / files[0], weights, device)
    return torch.compile(gm, fullgraph=True, dynamic=False)


def load_cudagraphs(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / files[0], weights, device)
    return torch.compile(gm, fullgraph=True, dynamic=False, mode="reduce-overhead")
