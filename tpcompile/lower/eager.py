"""eager: the rank graph saved with torch.export.save (weights left out: they are meta) and run as is."""
from pathlib import Path

import torch
import torch.distributed as dist
from torch.export import ExportedProgram

from tpcompile.kernels import gpu_ops  # the package registers torch.ops.tpcompile.*, which a rank graph may call
from tpcompile.artifact import check_no_pickle
from tpcompile.capture import retarget_device, set_tensor
from tpcompile.passes.stage_collectives_on_host import stage_collectives_on_host


def lower(program: ExportedProgram, out_dir: Path, name: str = "engine", *, device: str = "cpu") -> list[str]:
    torch.export.save(program, out_dir / f"{name}.pt2")
    return [f"{name}.pt2"]


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    return bind(out_dir / files[0], weights, device)


def bind(path: Path, weights: dict, device) -> torch.nn.Module:
    """The saved rank graph as a module holding this rank's tensors on `device`. The same tensor objects
    may be bound into several graphs (prefill and decode share weights and the KV cache)."""
    check_no_pickle(path)  # torch.export.load can unpickle; ours never need to (artifact.check_no_pickle)
    gpu_ops(device)  # GPU graphs may call ops that only GPU builds put in (passes/decode_attention.py)
    gm = torch.export.load(path).module()
    retarget_device(gm, str(device))
    if gloo_on_gpu(device):
        stage_collectives_on_host(gm, device)  # ranks sharing one GPU (runtime.collectives=gloo)
    for fqn, t in weights.items():
        set_tensor(gm, fqn, t)
    missing = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:3]} ({len(missing)} in all); recompile the artifact")
    return gm


def gloo_on_gpu(device) -> bool:
    """Ranks sharing a GPU (runtime.collectives=gloo): gloo's collectives then see GPU tensors."""
    return torch.device(device).type != "cpu" and dist.is_initialized() and dist.get_backend() == "gloo"
