"""stage_collectives_on_host: run every collective on host copies of its input, for gloo on GPU tensors.

gloo crashes the process in all_gather_into_tensor on GPU tensors (SIGSEGV) and only stages all_reduce
through the host itself, so ranks that share one GPU over gloo (runtime.collectives=gloo) need the copies in
the graph:

    before: r = wait_tensor(all_reduce(x, "sum", "0"));                              y = mul(r, 2)
    after:  h = _to_copy(x, device=cpu); r = wait_tensor(all_reduce(h, "sum", "0"));
            b = _to_copy(r, device=cuda:k);                                          y = mul(b, 2)

The values are the same; only where they live changes. Applied at load (lower/eager.bind), since only then
is it known that gloo runs on a GPU.
"""
import torch
from torch.fx import GraphModule

c10d = torch.ops._c10d_functional


def stage_collectives_on_host(gm: GraphModule, device) -> list[str]:
    """Copy every collective's input to the host and its waited result back to `device`.
    Returns the names of the collectives it staged."""
    g, staged = gm.graph, []
    for node in list(g.nodes):
        if (node.op != "call_function" or getattr(node.target, "namespace", "") != "_c10d_functional"
                or node.target == c10d.wait_tensor.default):
            continue
        x = node.args[0]
        with g.inserting_before(node):
            host = g.call_function(torch.ops.aten._to_copy.default, (x,), {"device": torch.device("cpu")})
        node.replace_input_with(x, host)
        for wait in [u for u in node.users if u.target == c10d.wait_tensor.default]:
            with g.inserting_after(wait):
                back = g.call_function(torch.ops.aten._to_copy.default, (wait,), {"device": torch.device(device)})
            wait.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        staged.append(node.name)
    if staged:
        g.lint()
        gm.recompile()
    return staged
