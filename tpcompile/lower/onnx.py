"""onnx: the rank graph cut at its collectives; each compute segment an ONNX file run by onnxruntime, the
collectives run by torch.distributed between them.

    rank graph:  seg0 -> all_reduce -> seg1 -> all_reduce -> ... -> segN
    files:       <name>.seg0.onnx ... <name>.segN.onnx, <name>.steps.json (the steps, in order)

ONNX has no collectives, so `torch.fx.passes.split_module` cuts the graph: every `_c10d_functional` op and
its `wait_tensor` form a partition of their own, the nodes between two of them one compute partition.
Weights are inputs of the segments, not initializers: the ONNX files hold no weights and serve every rank;
each rank binds its own tensors at load (io_binding on their memory: no copy).
"""
import contextlib
import json
import logging
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from tpcompile.capture import retarget_device

NUMPY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
                torch.bool: "bool"}
INSTALL = "pip install 'tpcompile[onnx]' (onnx, onnxscript, onnxruntime)"


def lower(program: ExportedProgram, out_dir: Path, name: str = "engine", *, device: str = "cpu") -> list[str]:
    _require("onnx", "onnxscript", "onnxruntime")
    return split_program(program, Path(out_dir), name, ".onnx", _export)


def load(out_dir: Path, files: list[str], weights: dict, device) -> "Steps":
    _require("onnxruntime")
    device = torch.device(device)
    spec = json.loads((Path(out_dir) / files[0]).read_text())
    return Steps(spec, weights, device, _Sessions(Path(out_dir), spec, device))


def split_program(program: ExportedProgram, out_dir: Path, name: str, suffix: str, compile_segment) -> list[str]:
    """Cut the rank graph at its collectives; compile_segment(GraphModule, file) -> dict writes one compute
    segment and returns what its step needs at run time. Writes <name>.steps.json, returns the files."""
    if program.graph_signature.buffers_to_mutate:
        raise ValueError(f"{name}: updates {sorted(program.graph_signature.buffers_to_mutate.values())[:3]} in "
                         f"place (a KV cache); split backends (onnx, tensorrt) run stateless graphs only: use "
                         f"backend=aoti or inductor for generation")
    gm, params = _weights_as_inputs(program.module())
    split = _split_at_collectives(gm)
    steps, files = [], []
    for node in split.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            steps.append({"op": "output", "args": [a.name for a in outputs]})
        elif node.op == "call_function":  # getitem of a segment's tuple of outputs
            src, index = node.args
            steps.append({"op": "getitem", "src": src.name, "index": index, "out": node.name})
        elif node.op == "call_module":
            sub = getattr(split, node.target)
            collective = _collective(sub)
            args = [a.name for a in node.args]
            if collective is not None:
                steps.append({"op": "collective", **collective, "args": args, "out": node.name})
            else:
                (out,) = [n for n in sub.graph.nodes if n.op == "output"]
                file = f"{name}.seg{len(files)}{suffix}"
                steps.append({"op": "segment", "file": file, "args": args, "out": node.name,
                              "tuple": isinstance(out.args[0], (tuple, list)), **compile_segment(sub, out_dir / file)})
                files.append(file)
        else:
            raise NotImplementedError(f"unexpected node in the split graph: {node.format_node()}")
    spec = {"params": params, "inputs": [n.name for n in split.graph.nodes if n.op == "placeholder"
                                         and n.name not in params], "steps": steps}
    (out_dir / f"{name}.steps.json").write_text(json.dumps(spec, indent=1))
    return [f"{name}.steps.json", *files]


class Steps:
    """Runs a split graph: run_segment(step, inputs) -> outputs for compute segments, the graph's own
    functional collectives between them (all_reduce(x, "sum", group), all_gather_into_tensor, ...)."""

    def __init__(self, spec: dict, weights: dict, device: torch.device, run_segment):
        missing = sorted(set(spec["params"].values()) - set(weights))
        if missing:
            raise ValueError(f"no tensor for {missing[:3]} ({len(missing)} in all); recompile the artifact")
        for fqn in set(spec["params"].values()):  # dense tensors on the device, shared with later graphs
            weights[fqn] = weights[fqn].to(device).contiguous()
        self.spec, self.device, self.run_segment = spec, device, run_segment
        self.params = {ph: weights[fqn] for ph, fqn in spec["params"].items()}

    def __call__(self, *args: torch.Tensor):
        c10d = torch.ops._c10d_functional
        env = {**self.params, **{n: a.to(self.device).contiguous() for n, a in zip(self.spec["inputs"], args)}}
        for step in self.spec["steps"]:
            op = step["op"]
            if op == "segment":
                outs = self.run_segment(step, [env[a] for a in step["args"]])
                env[step["out"]] = outs if step["tuple"] else outs[0]
            elif op == "collective":
                (x,) = [env[a] for a in step["args"]]
                env[step["out"]] = c10d.wait_tensor.default(getattr(c10d, step["target"]).default(x, *step["consts"]))
            elif op == "getitem":
                env[step["out"]] = env[step["src"]][step["index"]]
            else:
                outs = [env[a] for a in step["args"]]
                return outs[0] if len(outs) == 1 else tuple(outs)


class _Sessions:
    """One onnxruntime session per segment; inputs and outputs bound to torch memory (io_binding, no copy)."""

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
        outs = []
        for name, (shape, dtype) in zip(step["output_names"], step["output_specs"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            binding.bind_output(name, kind, index, np.dtype(dtype), shape, t.data_ptr())
            outs.append(t)
        session.run_with_iobinding(binding)
        return outs


def _weights_as_inputs(gm: GraphModule) -> tuple[GraphModule, dict]:
    """get_attr weights -> placeholders named like the node (placeholder name -> fqn), so the segments take
    them as inputs. Also drops export's guard call and retargets `device=` arguments to CPU for the export."""
    retarget_device(gm, "cpu")
    g = gm.graph
    params = {}
    first = next(n for n in g.nodes if n.op == "placeholder")
    for node in [n for n in g.nodes if n.op == "get_attr"]:
        value = _get(gm, node.target)
        with g.inserting_before(first):
            ph = g.placeholder(node.name)
        ph.meta["val"] = value
        node.replace_all_uses_with(ph)
        g.erase_node(node)
        params[ph.target] = node.target  # split_module names its inputs by target
    for node in [n for n in g.nodes if n.op == "call_module" and not n.users]:  # _guards_fn
        g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    return GraphModule(torch.nn.Module(), g), params


def _split_at_collectives(gm: GraphModule) -> GraphModule:
    """Partition 2k: the compute after the k-th collective; partition 2k+1: the k-th collective and its wait."""
    from torch.fx.passes.split_module import split_module
    part, segment = {}, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_c10d(node) and node.target != torch.ops._c10d_functional.wait_tensor.default:
            segment += 1
            part[node] = segment
        elif node.target == torch.ops._c10d_functional.wait_tensor.default:
            part[node] = part[node.args[0]]
            segment += 1
        else:
            part[node] = segment
    return split_module(gm, None, lambda n: part[n], keep_original_order=True)


def _collective(sub: GraphModule) -> dict | None:
    ops = [n for n in sub.graph.nodes if n.op == "call_function"]
    if not any(_is_c10d(n) for n in ops):
        return None
    (op,) = [n for n in ops if n.target != torch.ops._c10d_functional.wait_tensor.default]
    if not _is_c10d(op) or len(ops) != 2:
        raise NotImplementedError(f"onnx: a collective partition holds more than the collective: "
                                  f"{[n.format_node() for n in ops]}")
    consts = list(op.args[1:])
    if not all(isinstance(c, (int, float, str)) for c in consts):
        raise NotImplementedError(f"onnx: collective with non-constant arguments: {op.format_node()}")
    return {"target": op.target._overloadpacket.__name__, "consts": consts}


def _export(sub: GraphModule, file: Path) -> dict:
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
    return {"input_names": input_names, "output_names": output_names, "output_specs": specs}


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


def _is_c10d(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "_c10d_functional"


def _get(root: torch.nn.Module, fqn: str):
    *path, name = fqn.split(".")
    return getattr(root.get_submodule(".".join(path)) if path else root, name)


def _require(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"backend=onnx needs {', '.join(missing)}, not installed; {INSTALL}")
