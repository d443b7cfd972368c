"""onnx: the rank graph cut at its collectives (lower/split.py); each compute segment an ONNX file run by
onnxruntime, the collectives run by torch.distributed between them.

    files:       <name>.seg0.onnx ... <name>.segN.onnx, <name>.steps.json (the steps, in order)

Weights are inputs of the segments, not initializers: the ONNX files hold no weights and serve every rank;
each rank binds its own tensors at load (io_binding on their memory: no copy).

A state update (seg: (x, cache) -> (y, cache')) is written in place where that is safe: the segment's output
is bound (io_binding) to the state tensor's own memory, so onnxruntime writes cache' where cache was and
nothing is copied. Safe means, in the exported ONNX graph, every node that reads the old cache (or a view of
it) runs before the node that writes cache' (its ancestors), so no read sees the new value; `_may_alias`
checks it per (input, output) pair at export and steps.json lists the pairs (`inplace`). Any other update
is copied back into the state tensor (`copy_`) after the graph has run (split.Steps).
"""
import contextlib
import json
import logging
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from tpcompile.lower.split import Steps, split_program

NUMPY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
                torch.bool: "bool"}
INSTALL = "pip install 'tpcompile[onnx]' (onnx, onnxscript, onnxruntime)"


def lower(program: ExportedProgram, out_dir: Path, name: str = "engine", *, device: str = "cpu") -> list[str]:
    _require("onnx", "onnxscript", "onnxruntime")
    return split_program(program, Path(out_dir), name, ".onnx", export_segment)


def load(out_dir: Path, files: list[str], weights: dict, device) -> "Steps":
    _require("onnxruntime")
    device = torch.device(device)
    spec = json.loads((Path(out_dir) / files[0]).read_text())
    return Steps(spec, weights, device, _Sessions(Path(out_dir), spec, device))


class _Sessions:
    """One onnxruntime session per segment; inputs and outputs bound to torch memory (io_binding, no copy),
    a state update's output to the state tensor it replaces (step "inplace")."""

    def __init__(self, out_dir: Path, spec: dict, device: torch.device):
        import onnxruntime as ort
        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} has no {provider} (it has "
                               f"{ort.get_available_providers()}); pip install onnxruntime-gpu for CUDA")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # ranks share the cores, as torch does
        options.log_severity_level = 3
        self.device = device
        self.sessions = {s["file"]: ort.InferenceSession(str(out_dir / s["file"]), options, providers=[provider])
                         for s in spec["steps"] if s["op"] == "segment"}

    def __call__(self, step: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        import numpy as np
        session = self.sessions[step["file"]]
        binding = session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, t in zip(step["input_names"], inputs):
            binding.bind_input(name, kind, index, np.dtype(NUMPY_DTYPES[t.dtype]), list(t.shape), t.data_ptr())
        inplace = dict(step.get("inplace", []))  # output -> the input (a state tensor) it is written over
        outs = []
        for i, (name, (shape, dtype)) in enumerate(zip(step["output_names"], step["output_specs"])):
            t = inputs[inplace[i]] if i in inplace else torch.empty(shape, dtype=getattr(torch, dtype),
                                                                      device=self.device)
            binding.bind_output(name, kind, index, np.dtype(dtype), shape, t.data_ptr())
            outs.append(t)
        session.run_with_iobinding(binding)
        return outs


def export_segment(sub: GraphModule, file: Path) -> dict:
    """One compute segment -> ONNX (dynamo exporter), inputs and outputs as the example values say."""
    import onnx
    vals = [n.meta["val"] for n in sub.graph.nodes if n.op == "placeholder"]
    for v in vals:
        if v.dtype not in NUMPY_DTYPES:
            raise ValueError(f"backend=onnx: dtype {v.dtype} is not supported (use float32 or float16)")
    args = tuple(torch.zeros(v.shape, dtype=v.dtype) for v in vals)
    (out,) = [n for n in sub.graph.nodes if n.op == "output"]
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    specs = [[list(r.meta["val"].shape), str(r.meta["val"].dtype).removeprefix("torch.")] for r in results]
    input_names = [f"in{i}" for i in range(len(args))]
    output_names = [f"out{i}" for i in range(len(results))]
    with _quiet():
        torch.onnx.export(sub.eval(), args, str(file), dynamo=True, input_names=input_names,
                          output_names=output_names, external_data=False, verbose=False)
    model = onnx.load(str(file))
    found = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if found != (input_names, output_names):
        raise RuntimeError(f"onnx export of {file.name}: inputs/outputs {found}, expected "
                           f"{(input_names, output_names)}")
    in_specs = [[list(v.shape), str(v.dtype).removeprefix("torch.")] for v in vals]
    return {"input_names": input_names, "output_names": output_names, "output_specs": specs,
            "may_alias": _may_alias(model, input_names, output_names, in_specs, specs)}


VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose"}  # may share their input's memory
SCATTERS = {"ScatterND", "ScatterElements"}  # registered MayInplace(0, 0): they handle output == data


def _may_alias(model, input_names: list[str], output_names: list[str], in_specs: list, out_specs: list) -> list:
    """[output, input] pairs of equal shape and dtype that onnxruntime can write over each other: every node
    reading the input, or a view of it (onnxruntime reshapes without copying, and may turn a Transpose of
    unit dims into a Reshape), is an ancestor of the node writing the output (so it has run before that
    write), or is that node itself, a scatter with the input as its data. Graphs with subgraphs or local
    functions get none: their nodes are inlined and reordered by onnxruntime."""
    nodes = list(model.graph.node)
    if model.functions or any(a.g.node or a.graphs for n in nodes for a in n.attribute):
        return []
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    readers = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            readers.setdefault(name, set()).add(i)

    def ancestors(i: int) -> set[int]:
        seen, todo = set(), [i]
        while todo:
            for name in nodes[todo.pop()].input:
                j = producer.get(name)
                if j is not None and j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    pairs = []
    for k, (out, spec) in enumerate(zip(output_names, out_specs)):
        writer = producer.get(out)
        if writer is None:
            continue
        before = ancestors(writer)
        for j, name in enumerate(input_names):
            if in_specs[j] != spec:
                continue
            old, todo = {name}, [name]  # the input and its views
            while todo:
                for r in readers.get(todo.pop(), ()):
                    if nodes[r].op_type in VIEWS and nodes[r].output[0] not in old:
                        old.add(nodes[r].output[0])
                        todo.append(nodes[r].output[0])
            w = nodes[writer]
            scatter = w.op_type in SCATTERS and w.input[0] in old and not set(w.input[1:]) & old
            if all(r in before or (r == writer and scatter) for v in old for r in readers.get(v, ())):
                pairs.append([k, j])
    return pairs


@contextlib.contextmanager
def _quiet():
    """The exporter logs every optimisation step at INFO (Hydra's level): keep the CLI's output readable."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _require(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"backend=onnx needs {', '.join(missing)}, not installed; {INSTALL}")
