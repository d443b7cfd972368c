"""one_row_linear: a linear of one row (a decode step of batch 1) becomes the op that reads the weight once near
the copy rate, with a gated MLP's activation made inside it (tpcompile/kernels/row_linear.py):

    before: y = linear(x, W)                              x (..., K) holding one row, W (N, K) a weight, no bias
    after:  y = tpcompile.row_linear(x, W, None, None, 0.0, None, config)

    before: y = linear(mul(silu(g), u), W)                g, u (..., K): the down projection of a gated MLP
    after:  y = tpcompile.row_linear(g, W, u, None, 0.0, None, config)

Inductor turns such a product into a reduction whose launch settings its search picks per kernel; on an H200 the
down projection of llama_8b ran at 85% of the copy rate in the engine, 57% compiled alone, and the kernel here at
89% (benchmarks/results/gemv_llama-8b_h200_2026-11-29.json). config, the kernel's launch settings, is measured
per weight shape on the GPU the engine is built for (`kernels.gemv.tune`) and written into the graph; elsewhere
it is the kernel's default. Keyed on the node's arguments and shapes only.

fuse_norm_residual (opt-in, `backend.fuse_norm_residual=true`, until its GPU tests pass) then takes the RMSNorm
before such a product and the residual add after it into the op (its docstring shows the rewrite): a decode step
of one row then has no kernel of its own for either.

Where they run: as decode_attention (`passes.decode_attention.wanted`), after fuse_linears, so that fused weights
(q/k/v, gate/up) are one product; on the CPU the op would run its reference, so the graph stays as it is there
unless a caller applies the pass itself (the tests do).
"""
import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.nodes import rms_norm_of, tensor_val, users_of

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
            new = gm.graph.call_function(torch.ops.tpcompile.row_linear.default,
                                         (*args, None, 0.0, None, list(config)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed.append(f"{node.name}: {n} x {k}{', silu(g) * u' if gate else ''}, config {list(config)}")
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def fuse_norm_residual(gm: GraphModule, device: str = "cpu") -> list[str]:
    """After one_row_linear: the RMSNorm that makes a row_linear's row, and the residual add its product feeds, go
    into the op, whose launch settings are tuned again for what it now does. Returns "node: what went in" per op.

        before: n = rms_norm(s, [K], g, eps);   y = tpcompile.row_linear(n, W, None, None, 0.0, None, c)
                r = add(y, h)                                                  # or add(h, y)
        after:  r = tpcompile.row_linear(s, W, None, g, eps, h, c')

    The norm goes in when every use of its result is such an op (else it would be computed twice); the add when it
    is the product's only use and h, of the product's shape and dtype, is computed before the op. So a decode step
    of one row keeps no kernel for a norm or a residual add: each goes into the product before or after it."""
    op = getattr(torch.ops.tpcompile, "row_linear", None)
    if op is None:  # the op's module never imported: no node calls it
        return []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    norms = _norms(gm)
    changed, took, dropped = [], {}, []  # took: an add taken into an op -> that op, which now makes its value
    for node in [n for n in gm.graph.nodes if n.target == op.default]:
        x, w, up, norm, eps, residual, config = node.args
        parts = []
        base = _through_identity_slices(x)
        if up is None and norm is None and base in norms and _read_only_by(base, op.default):
            s, found = norms[base]
            s = took.get(s, s)
            if order[found.weight] < order[node] and tensor_val(s).dtype == tensor_val(x).dtype:
                x, norm = s, found.weight
                eps = found.eps if found.eps is not None else torch.finfo(tensor_val(s).dtype).eps
                parts.append(f"rms_norm({s.name})")
                dropped.append(found)
        add = _residual_add(node, order) if residual is None else None
        if add is not None:
            residual = add.args[1] if add.args[0] is node else add.args[0]
            parts.append(f"+ {residual.name}")
        if not parts:
            continue
        n, k = tensor_val(w).shape
        config = _config(n, k, up is not None, tensor_val(w).dtype, device, norm is not None, residual is not None)
        node.args = (x, w, up, norm, eps, residual, list(config))
        if add is not None:
            add.replace_all_uses_with(node)
            gm.graph.erase_node(add)
            took[add] = node
        changed.append(f"{node.name}: {', '.join(parts)}, config {list(config)}")
    if changed:
        _drop_norms(gm, dropped)
        gm.graph.lint()
        gm.recompile()
    return changed


def _norms(gm: GraphModule) -> dict:
    """{the node whose value is a normed row: (the normed node, its nodes.Norm)} for each RMSNorm with a weight."""
    norms = {}
    for s in gm.graph.nodes:
        if tensor_val(s) is not None and tensor_val(s).dim() >= 1:
            for user in list(s.users):
                found = rms_norm_of(user, s)
                if found is not None and found.weight is not None:
                    norms[found.end] = (s, found)
    return norms


def _residual_add(node: Node, order: dict) -> Node | None:
    """The add(node, h) or add(h, node) that is node's only use, h of its shape and dtype and made before it."""
    add = next(iter(node.users)) if len(node.users) == 1 else None
    if add is None or add.target != aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    h = add.args[1] if add.args[0] is node else add.args[0]
    hv, yv = tensor_val(h) if isinstance(h, Node) else None, tensor_val(node)
    if h is node or hv is None or yv is None or hv.shape != yv.shape or hv.dtype != yv.dtype:
        return None
    return add if order.get(h, len(order)) < order[node] else None


def _drop_norms(gm: GraphModule, dropped: list) -> None:
    """The norms taken in go, with export's dtype checks on them (which dead-code removal keeps)."""
    gm.graph.eliminate_dead_code()
    live = set(gm.graph.nodes)
    for found in dropped:
        for n in found.chain + ([found.head] if found.head is not None else []):
            if n in live and not users_of(n):
                for check in list(n.users):
                    gm.graph.erase_node(check)
                gm.graph.erase_node(n)
                live.discard(n)
    gm.graph.eliminate_dead_code()


def _through_identity_slices(x: Node) -> Node:
    """x's source through slices that keep its shape (transformers' head reads hidden[:, -1:], one token of one)."""
    while x.op == "call_function" and x.target == aten.slice.Tensor and tensor_val(x) is not None \
            and tensor_val(x.args[0]) is not None and tensor_val(x).shape == tensor_val(x.args[0]).shape:
        x = x.args[0]
    return x


def _read_only_by(node: Node, target) -> bool:
    """Every use of node is `target`, directly or through a slice that keeps its shape."""
    return all(u.target == target or (_through_identity_slices(u) is node and u.target == aten.slice.Tensor
                                      and _read_only_by(u, target)) for u in node.users)


def _config(n: int, k: int, gated: bool, dtype: torch.dtype, device: str, normed: bool = False,
            residual: bool = False) -> tuple:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        from tpcompile.kernels.gemv import tune
        return tune(n, k, gated, dtype, str(torch.device(device)), normed, residual)
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
