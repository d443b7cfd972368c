"""The worker-side handler: one rank of an artifact. Checks the manifest and the hashes of the files it
will read, loads the engine and only its own weight file, and runs requests."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from tpcompile.artifact import check_compatible, check_files, read_manifest
from tpcompile.capture import dtype_of
from tpcompile.lower import backend


class RankEngine:
    def __init__(self, *, rank: int, world_size: int, device, artifact: str):
        self.rank, self.path = rank, Path(artifact)
        self.manifest = m = read_manifest(self.path)
        self.device = torch.device(device)
        check_compatible(m, self.path, world_size=world_size, device=self.device.type)
        check_files(m, self.path, m.engine_files + [m.rank_file(rank)])
        tensors = load_file(self.path / m.rank_file(rank), device=str(self.device))
        for fqn, spec in m.state.items():  # KV caches: zeros, one tensor shared by every graph
            tensors[fqn] = torch.zeros(spec["shape"], dtype=dtype_of(spec["dtype"]), device=self.device)
        _, load = backend(m.backend)
        self.graphs = {name: load(self.path, g["files"], tensors, self.device) for name, g in m.graphs.items()}

    def __call__(self, *args: torch.Tensor, graph: str = "forward") -> list[torch.Tensor]:
        if graph not in self.graphs:
            raise ValueError(f"{self.path}: has graphs {sorted(self.graphs)}, not {graph!r}; compile it with "
                             f"`tpcompile compile` for forward or `tpcompile generate` for prefill/decode")
        check_inputs(self.manifest.graphs[graph]["inputs"], args)
        with torch.no_grad():
            out = self.graphs[graph](*(a.to(self.device) for a in args))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def handle(self, op: str, payload: dict) -> dict:
        if op == "run":
            out = self(*payload["args"])
            return {"outputs": [o.cpu() for o in out]} if self.rank == 0 else {}
        raise ValueError(f"unknown op {op!r}; this worker serves 'run'")


def make(*, rank: int, world_size: int, device, artifact: str) -> RankEngine:
    """The factory the launcher names: tpcompile.runtime.engine:make."""
    return RankEngine(rank=rank, world_size=world_size, device=device, artifact=artifact)


def check_inputs(specs: list[dict], args) -> None:
    if len(args) != len(specs):
        raise ValueError(f"expected {len(specs)} inputs ({[s['name'] for s in specs]}), got {len(args)}")
    for spec, a in zip(specs, args):
        if list(a.shape) != list(spec["shape"]) or a.dtype != dtype_of(spec["dtype"]):
            raise ValueError(f"input {spec['name']}: expected shape {list(spec['shape'])} {spec['dtype']}, got "
                             f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}; recompile with that shape")
        if spec.get("high") is not None and a.numel() and (int(a.min()) < 0 or int(a.max()) >= spec["high"]):
            raise ValueError(f"input {spec['name']}: values must be in [0, {spec['high']}), got "
                             f"[{int(a.min())}, {int(a.max())}]")
