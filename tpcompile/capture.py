"""capture: model -> ExportedProgram -> the unlifted GraphModule the passes rewrite.

Models from configs are built on the meta device, so capturing llama_8b allocates no weights.
`rank_program` re-exports the rewritten graph with local (meta) weights: that is the engine's input.
"""
import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def example_inputs(specs: list[dict], device="meta", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tensors for input specs {name, shape, dtype, high}: random ints below `high`, or normal floats."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = dtype_of(spec["dtype"])
        if device == "meta":
            out.append(torch.empty(spec["shape"], dtype=dtype, device="meta"))
        elif dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=gen).to(dtype))
        else:
            out.append(torch.randint(0, spec["high"], spec["shape"], generator=gen, dtype=dtype))
    return tuple(out)


def capture(model: nn.Module, example_args: tuple) -> GraphModule:
    """torch.export the model (meta or real) and return its unlifted graph: parameters are get_attr nodes
    named by fqn, every node carries the FakeTensor of its global shape in meta['val']."""
    model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_args))
    gm = ep.module()
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if fqn not in used:  # held by the model but never read (a spare RoPE table): no weight, no engine input
            owner, _, name = fqn.rpartition(".")
            mod = gm.get_submodule(owner)
            mod._parameters.pop(name, None)
            mod._buffers.pop(name, None)
    gm.recompile()
    return gm


def rank_program(gm: GraphModule, local_shapes: dict[str, tuple], dtypes: dict[str, torch.dtype],
                 example_args: tuple, device: str = "meta") -> ExportedProgram:
    """Re-export the rewritten graph with uninitialised weights of local shape: the rank-agnostic engine graph.
    Meta for models built on meta; models that came with real weights may create tensors without a device
    (torch.ones(T, T)), so they are traced with empty CPU tensors instead."""
    held = {n for n, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
    for fqn, shape in local_shapes.items():
        if fqn in held:  # passes may have replaced some (fused weights)
            set_tensor(gm, fqn, torch.empty(shape, dtype=dtypes[fqn], device=device))
    args = tuple(torch.empty(a.shape, dtype=a.dtype, device=device) for a in example_args)
    with torch.no_grad():
        return torch.export.export(gm, args)


def set_tensor(root: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Put `value` at `fqn` as the parameter or buffer that is there (no copy, no grad)."""
    *path, name = fqn.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if name in mod._parameters:
        mod._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = value.data
    elif value.is_floating_point():  # a new weight (e.g. a fused one): a parameter, never a lifted constant
        mod.register_parameter(name, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(name, value)


def retarget_device(gm: GraphModule, device: str) -> int:
    """Engines are traced on meta (or CPU): point every `device=` argument at the runtime device and drop
    the metadata asserts that name the trace device. Returns how many nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            changed += 1
        elif isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != torch.device(device):
            node.kwargs = {**node.kwargs, "device": torch.device(device)}
            changed += 1
        elif any(isinstance(a, torch.device) and a != torch.device(device) for a in node.args):  # aten.to.device
            node.args = tuple(torch.device(device) if isinstance(a, torch.device) else a for a in node.args)
            changed += 1
    gm.recompile()
    return changed
