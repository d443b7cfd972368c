"""inductor: the eager engine file, compiled with torch.compile when a worker loads it.
Inductor understands the functional collectives in the graph; each rank compiles the same graph."""
from pathlib import Path

import torch

from tpcompile.lower import eager

lower = eager.lower


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / eager.ENGINE, weights, device)
    return torch.compile(gm, fullgraph=True, dynamic=False)
