"""The worker-side handler: one rank of an artifact. Checks the manifest and the hashes of the files it
will read, loads the engine and only its own weight file, and runs requests."""
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tpcompile.artifact import check_compatible, check_files, read_manifest
from tpcompile.capture import dtype_of
from tpcompile.lower import backend
from tpcompile.runtime.weights_io import load_rank_weights


class RankEngine:
    def __init__(self, *, rank: int, world_size: int, device, artifact: str):
        self.rank, self.world_size, self.path = rank, world_size, Path(artifact)
        self.generation = None
        self.manifest = m = read_manifest(self.path)
        self.device = torch.device(device)
        check_compatible(m, self.path, world_size=world_size, device=self.device.type,
                         pg_name=dist.group.WORLD.group_name if dist.is_initialized() else None)
        t0 = time.perf_counter()
        check_files(m, self.path, m.engine_files + [m.rank_file(rank)])  # chunks hashed on up to 8 threads
        hash_s = time.perf_counter() - t0
        tensors = load_rank_weights(self.path / m.rank_file(rank), self.device)  # mmap on CPU; overlapped on GPU
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        weights_s = time.perf_counter() - t0
        for fqn, spec in m.state.items():  # KV caches: zeros, one tensor shared by every graph
            tensors[fqn] = torch.zeros(spec["shape"], dtype=dtype_of(spec["dtype"]), device=self.device)
        self.tensors = tensors  # this rank's weights and state, shared by its graphs
        load = backend(m.backend).load
        self.graphs = {name: load(self.path, g["files"], tensors, self.device) for name, g in m.graphs.items()}
        # weights: hash check + weights read (hash: the check alone), then engines bound; backends that compile
        # at load do it on the first call
        self.load_seconds = {"weights": weights_s, "hash": hash_s, "engines": time.perf_counter() - t0 - weights_s}

    def __call__(self, *args: torch.Tensor, graph: str = "forward") -> list[torch.Tensor]:
        if graph not in self.graphs:
            raise ValueError(f"{self.path}: has graphs {sorted(self.graphs)}, not {graph!r}; compile it with "
                             f"`tpcompile compile` for forward or `tpcompile generate` for prefill/decode")
        check_inputs(self.manifest.graphs[graph]["inputs"], args)
        with torch.no_grad():
            out = self.graphs[graph](*(a.to(self.device) for a in args))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def health(self) -> dict:
        """What this rank serves, for op "health" (worker.health adds pid and memory)."""
        return {"artifact": self.manifest.key, "device": str(self.device), "graphs": sorted(getattr(self, "graphs", {})),
                "load_seconds": getattr(self, "load_seconds", None)}

    def handle(self, op: str, payload: dict) -> dict:
        if op == "run":
            out = self(*payload["args"], graph=payload.get("graph", "forward"))
            return {"outputs": [o.cpu() for o in out]} if self.rank == 0 else {}
        if op in ("generate_start", "generate_step"):
            if not self.manifest.generation:
                raise ValueError(f"{self.path}: compiled without a KV cache; use `tpcompile generate` to build one")
            if self.generation is None:
                from tpcompile.runtime.generate import Generation
                self.generation = Generation(self, self.rank, self.world_size)
            if op == "generate_start":
                return self.generation.start(**payload)
            return self.generation.step(payload["n"])
        if op == "rows_step":  # continuous batching: rows join and leave between decode steps
            if not self.manifest.generation:
                raise ValueError(f"{self.path}: compiled without a KV cache; use `tpcompile generate` to build one")
            from tpcompile.runtime.rows import Rows
            self.rows = getattr(self, "rows", None) or Rows(self, self.rank, self.world_size)
            return self.rows.step(**payload)
        if op == "bench":
            from tpcompile.runtime.generate import bench
            return bench(self, self.rank, self.world_size, **payload)
        raise ValueError(f"unknown op {op!r}; this worker serves 'run', 'generate_start', 'generate_step', 'rows_step', "
                         f"'bench'")


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
