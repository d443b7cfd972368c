"""tensorrt: the rank graph split at its collectives (lower/split.py, as for onnx), each segment compiled by
torch_tensorrt ahead of time and saved as an ExportedProgram with the TensorRT engine inside; the collectives
run by torch.distributed between them (`split.Steps`). CUDA only.

    files: <name>.seg{i}.ep, <name>.steps.json

Weights are inputs of the segments (as for onnx), so one set of files serves every rank. KV-cache graphs
work as for onnx (`split_program` makes each cache update an extra output of its segment), but the saved
programs return new tensors, so `Steps` copies each new cache into the shared cache tensor (`copy_`).
Written against torch_tensorrt 2.x but NOT run here (no GPU, no TensorRT in CI): treat it as a sketch that
fails early and clearly, not as a tested backend.
"""
import importlib.util
from pathlib import Path

import torch
from torch.export import ExportedProgram

from tpcompile.capture import retarget_device
from tpcompile.lower.split import Steps, split_program

INSTALL = "pip install 'tpcompile[tensorrt]' (torch-tensorrt, tensorrt) on a machine with CUDA and a GPU"


def require(device: str = "cuda") -> None:
    """One error naming everything missing: the package, a GPU, and the runtime device."""
    missing = [what for what, ok in (("torch-tensorrt", importlib.util.find_spec("torch_tensorrt") is not None),
                                     ("a CUDA GPU", torch.cuda.is_available()),
                                     ("runtime.device=cuda", device == "cuda")) if not ok]
    if missing:
        raise RuntimeError(f"backend=tensorrt needs {' and '.join(missing)}, not found here: {INSTALL}, and "
                           f"compile with runtime.device=cuda; or use backend=aoti (CPU and CUDA)")


def lower(program: ExportedProgram, out_dir: Path, name: str = "engine", *, device: str = "cpu") -> list[str]:
    require(device)
    return split_program(program, Path(out_dir), name, ".ep", _compile)


def load(out_dir: Path, files: list[str], weights: dict, device):
    require(torch.device(device).type)
    import json

    import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the saved programs call)
    spec = json.loads((Path(out_dir) / files[0]).read_text())
    segments = {s["file"]: torch.export.load(str(Path(out_dir) / s["file"])).module()
                for s in spec["steps"] if s["op"] == "segment"}

    def run_segment(step: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = segments[step["file"]](*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    return Steps(spec, weights, torch.device(device), run_segment)


def _compile(sub: torch.fx.GraphModule, file: Path) -> dict:
    import torch_tensorrt
    vals = [n.meta["val"] for n in sub.graph.nodes if n.op == "placeholder"]
    example = tuple(torch.zeros(v.shape, dtype=v.dtype, device="cuda") for v in vals)
    retarget_device(sub, "cuda")  # the split traced on CPU
    trt = torch_tensorrt.dynamo.compile(torch.export.export(sub, example), arg_inputs=example)
    torch_tensorrt.save(trt, str(file), output_format="exported_program", arg_inputs=example)
    return {}
