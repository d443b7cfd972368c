"""fuse_linears: linears that read the same input become one matmul over weights concatenated at compile
time (q/k/v into one GEMM, gate/up into one), then a split. Fewer, larger GEMMs: at batch 1 each GEMV pays a
fixed launch and tail cost, so three small ones cost far more than one of their total size.

    before: q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
    after:  qkv = linear(x, W_fused); q, k, v = split_with_sizes(qkv, [nq, nk, nv], -1)
            W_fused = cat([Wq, Wk, Wv], 0) per rank, of the rank's local pieces

Runs on the rank graph (local shapes): every rank fuses its own pieces, so the graph stays rank-agnostic.
"""
import operator

import torch
from torch.fx import GraphModule

from tpcompile.capture import set_tensor

aten = torch.ops.aten


def fuse_linears(gm: GraphModule, local_shapes: dict[str, tuple]) -> dict[str, list[str]]:
    """Returns {fused fqn: [the fqns concatenated, in order]}; local_shapes gains the fused entries."""
    groups: dict = {}
    for node in gm.graph.nodes:
        if node.target == aten.linear.default and (len(node.args) < 3 or node.args[2] is None) \
                and node.args[1].op == "get_attr" and node.args[1].target in local_shapes:
            groups.setdefault(node.args[0], []).append(node)
    fused = {}
    for x, linears in groups.items():
        weights = [n.args[1].target for n in linears]
        shapes = [local_shapes[w] for w in weights]
        if len(linears) < 2 or len({s[1:] for s in shapes}) != 1 or len(set(weights)) != len(weights):
            continue
        name = _fused_name(weights)
        local_shapes[name] = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        fused[name] = weights
        held = gm.get_parameter(weights[0]) if weights[0] in dict(gm.named_parameters()) else gm.get_buffer(weights[0])
        set_tensor(gm, name, torch.empty(local_shapes[name], dtype=held.dtype, device="meta"))
        first = min(linears, key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_before(first):
            w = gm.graph.get_attr(name)
            out = gm.graph.call_function(aten.linear.default, (x, w))
            parts = gm.graph.call_function(aten.split_with_sizes.default, (out, [s[0] for s in shapes], -1))
            pieces = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
        _fused_meta(w, out, parts, pieces, linears, local_shapes[name])
        for lin, piece in zip(linears, pieces):
            lin.replace_all_uses_with(piece)
        for lin in linears:
            weight = lin.args[1]
            gm.graph.erase_node(lin)
            if not weight.users:
                gm.graph.erase_node(weight)
                *path, attr = weight.target.split(".")
                delattr(gm.get_submodule(".".join(path)), attr)  # the engine holds only the fused weight
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _fused_meta(w, out, parts, pieces, linears, shape) -> None:
    """The new nodes' values (meta "val", as capture leaves them), for the passes after this one."""
    vals = [lin.meta.get("val") for lin in linears]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return
    for piece, lin in zip(pieces, linears):
        piece.meta = dict(lin.meta)
    w.meta["val"] = vals[0].new_empty(shape)
    out.meta = {**linears[0].meta, "val": vals[0].new_empty(*vals[0].shape[:-1], shape[0])}
    parts.meta = {**linears[0].meta, "val": vals}


def _fused_name(fqns: list[str]) -> str:
    """'a.b.wq.weight', 'a.b.wk.weight' -> 'a.b.fused_wq_wk': beside the first, named after the parts."""
    paths = [f.split(".") for f in fqns]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    parts = ["_".join(p[common:-1]) or p[-1] for p in paths]
    return ".".join(paths[0][:common] + ["fused_" + "_".join(parts)])
