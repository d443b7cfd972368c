"""one_row_linear: a linear of one row (a decode step of batch 1) becomes the op that reads the weight once near
the copy rate, with a gated MLP's activation made inside it (tpcompile/kernels/row_linear.py):

    before: y = linear(x, W)                              x (..., K) holding one row, W (N, K) a weight, no bias
    after:  y = tpcompile.row_linear(x, W, None, config)

    before: y = linear(mul(silu(g), u), W)                g, u (..., K): the down projection of a gated MLP
    after:  y = tpcompile.row_linear(g, W, u, config)

Inductor turns such a product into a reduction whose launch settings its search picks per kernel; on an H200 the
down projection of llama_8b ran at 85% of the copy rate in the engine, 57% compiled alone, and the kernel here at
89% (benchmarks/results/gemv_llama-8b_h200_2026-11-29.json). config, the kernel's launch settings, is measured
per weight shape on the GPU the engine is built for (`kernels.gemv.tune`) and written into the graph; elsewhere
it is the kernel's default. Keyed on the node's arguments and shapes only.

Where it runs: as decode_attention (`passes.decode_attention.wanted`), after fuse_linears, so that fused weights
(q/k/v, gate/up) are one product; on the CPU the op would run its reference, so the graph stays as it is there
unless a caller applies the pass itself (the tests do).
"""
import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.nodes import tensor_val

aten = torch.ops.aten
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def one_row_linear(gm: GraphModule, device: str = "cpu") -> list[str]:
    """Returns "node: N x K[, silu(g) * u], config" for each linear replaced; configs tuned on `device` when it is a
    CUDA device."""
    changed = []
    for node in list(gm.graph.nodes):
        weight = _one_row_weight(node)
        if weight is None:
            continue
        import tpcompile.kernels.row_linear  # noqa: F401  registers the op (imports torch's compiler)
        x, w = node.args[0], node.args[1]
        gate = _gated(x)
        args = (gate[0], w, gate[1]) if gate else (x, w, None)
        n, k = weight.shape
        config = _config(n, k, gate is not None, weight.dtype, device)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.tpcompile.row_linear.default, (*args, list(config)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed.append(f"{node.name}: {n} x {k}{', silu(g) * u' if gate else ''}, config {list(config)}")
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _config(n: int, k: int, gated: bool, dtype: torch.dtype, device: str) -> tuple:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        from tpcompile.kernels.gemv import tune
        return tune(n, k, gated, dtype, str(torch.device(device)))
    from tpcompile.kernels.row_linear import DEFAULT
    return DEFAULT


def _one_row_weight(node: Node) -> torch.Tensor | None:
    """The weight's value when `node` is a linear of one row the op computes, else None."""
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2:
        return None
    if len(node.args) > 2 and node.args[2] is not None or node.kwargs.get("bias") is not None:
        return None
    x, w = tensor_val(node.args[0]), tensor_val(node.args[1])
    if x is None or w is None or node.args[1].op != "get_attr" or w.dim() != 2 or x.dim() < 1:
        return None
    if x.shape[-1] != w.shape[1] or x.numel() != x.shape[-1] or x.dtype != w.dtype or x.dtype not in FLOATS:
        return None
    return w


def _gated(x: Node) -> tuple[Node, Node] | None:
    """(g, u) when x is silu(g) * u (either order) of one shape, else None."""
    if x.op != "call_function" or x.target != aten.mul.Tensor or len(x.args) != 2:
        return None
    for a, b in (x.args, x.args[::-1]):
        if isinstance(a, Node) and a.op == "call_function" and a.target == aten.silu.default and isinstance(b, Node):
            g, vals = a.args[0], [tensor_val(n) for n in (a.args[0], b, x)]
            if all(v is not None for v in vals) and len({tuple(v.shape) for v in vals}) == 1 \
                    and len({v.dtype for v in vals}) == 1:
                return g, b
    return None
