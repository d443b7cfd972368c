"""fuse_allreduce_norm: the all-reduce of a row-parallel output, the residual add after it and the RMSNorm of the
sum become one op (tpcompile/kernels/allreduce_norm.py), which returns both the normed activations and the sum
(the next residual):

    before: r = wait_tensor(all_reduce(x, "sum", g))
            s = add(residual, r)                     # or add(r, residual)
            y = rms_norm(s, [D], w, eps)             # or transformers' RMSNorm, written out (below)
    after:  f = tpcompile.all_reduce_add_rms_norm(x, residual, w, eps, upcast, g)
            y = f[0];  s = f[1]                      # every use of s reads f[1]

    where no norm of s follows (the last block: the head reads one token of s first):
    after:  s = tpcompile.all_reduce_add(x, residual, g)

Keyed on the graph's structure only: r feeds the add alone, residual has r's shape and dtype, the norm is over
the last dim. transformers' RMSNorm appears as
    h = to(s, float32); y = mul(w, to(mul(h, rsqrt(add(mean(pow(h, 2), [-1], True), eps))), s.dtype))
(either `to` may be missing where it changes nothing; the operands of a mul in either order); it becomes the op
with upcast=True, which rounds as that chain rounds. Uses of h outside the chain read to(f[1], float32).

Where it runs: on a GPU with the backends that call Python ops (eager, inductor, inductor_cudagraphs), where the
op's peer-memory kernel saves a launch and NCCL's fixed cost per small all-reduce (`wanted`). aoti, onnx and
tensorrt engines cannot call a Python op, and on the CPU there is nothing to gain: the graph stays as it is there
unless a caller applies the pass itself (the tests do, to check the op against the unfused graph under gloo).
Runs on the rank graph, after insert_collectives.
"""
import operator

import torch
from torch.fx import GraphModule, Node

import tpcompile.kernels  # noqa: F401  registers torch.ops.tpcompile.*
from tpcompile.passes.nodes import ASSERT, rms_norm_of, tensor_val as _val, users_of as _users

aten, c10d, ops = torch.ops.aten, torch.ops._c10d_functional, torch.ops.tpcompile
BACKENDS = ("eager", "inductor", "inductor_cudagraphs")  # engines that call torch ops registered from Python


def wanted(backend: str, device: str) -> bool:
    """Whether a build for `backend` on `device` should run the pass."""
    return torch.device(device).type == "cuda" and backend in BACKENDS


def fuse_allreduce_norm(gm: GraphModule) -> list[tuple[str, str, str]]:
    """Returns (op, all_reduce node, norm node or "") per fusion, op "all_reduce_add_rms_norm" or "all_reduce_add"."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    changed = []
    for wait in list(g.nodes):
        found = _reduced_sum(wait)
        if found is None:
            continue
        reduce, add, residual = found
        x, group = reduce.args[0], reduce.args[2]
        norm = next((m for m in (rms_norm_of(u, add) for u in list(add.users)) if m is not None and
                     (m.weight is None or order.get(m.weight, len(order)) < order[add])), None)
        with g.inserting_before(add):
            if norm is None:
                fused = g.call_function(ops.all_reduce_add.default, (x, residual, group))
                fused.meta.update(add.meta)
                new_sum = fused
            else:
                fused = g.call_function(ops.all_reduce_add_rms_norm.default,
                                        (x, residual, norm.weight, norm.eps, norm.upcast, group))
                normed = g.call_function(operator.getitem, (fused, 0))
                new_sum = g.call_function(operator.getitem, (fused, 1))
                fused.meta["val"] = (norm.end.meta.get("val"), add.meta.get("val"))
                normed.meta.update(norm.end.meta)
                new_sum.meta.update(add.meta)
                norm.end.replace_all_uses_with(normed)
        add.replace_all_uses_with(new_sum)
        for node in (norm.chain if norm else []) + [add, wait, reduce]:
            for user in [u for u in node.users if u.target == ASSERT]:
                g.erase_node(user)
            g.erase_node(node)
        if norm is not None and norm.head is not None and not norm.head.users:
            g.erase_node(norm.head)
        changed.append(("all_reduce_add_rms_norm", reduce.name, norm.end.name) if norm else
                       ("all_reduce_add", reduce.name, ""))
    if changed:
        g.lint()
        gm.recompile()
    return changed


def _reduced_sum(wait: Node) -> tuple[Node, Node, Node] | None:
    """(all_reduce, add, residual) when `wait` is a summed all-reduce whose only use is add(residual, it)."""
    if wait.op != "call_function" or wait.target != c10d.wait_tensor.default:
        return None
    reduce = wait.args[0]
    if (not isinstance(reduce, Node) or reduce.target != c10d.all_reduce.default or reduce.args[1] != "sum"
            or len(reduce.users) != 1):
        return None
    users = _users(wait)
    if len(users) != 1 or users[0].target != aten.add.Tensor or users[0].kwargs or len(users[0].args) != 2:
        return None
    add = users[0]
    residual = add.args[1] if add.args[0] is wait else add.args[0]
    if not isinstance(residual, Node) or residual is wait:
        return None
    r, w, s = _val(residual), _val(reduce.args[0]), _val(add)  # the collective's own nodes carry no value
    if r is None or w is None or s is None or r.shape != w.shape or r.dtype != w.dtype or s.shape != w.shape:
        return None
    return reduce, add, residual
