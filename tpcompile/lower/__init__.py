"""Backends: each is one small function pair.

    lower(program: ExportedProgram, out_dir: Path) -> list[str]         engine files written into out_dir
    load(out_dir: Path, files: list[str], weights: dict, device) -> callable(*args) -> list[Tensor]

A plain dict is the registry; later backends (aoti, onnx, tensorrt) add one entry each.
"""
from tpcompile.lower import eager, inductor

BACKENDS = {
    "eager": (eager.lower, eager.load),          # torch.export.save; run the graph as is
    "inductor": (inductor.lower, inductor.load),  # same file; torch.compile at load time
}


def backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not known; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]
