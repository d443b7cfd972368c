"""Collectives staged through the host for gloo on GPU tensors (ranks sharing one GPU): the rewrite puts
every collective's input on the host and its result back on the device, and computes the same values."""
import torch
import torch.distributed as dist
from torch.fx import Graph, GraphModule

from tpcompile.passes.stage_collectives_on_host import stage_collectives_on_host

c10d = torch.ops._c10d_functional
aten = torch.ops.aten


def two_collectives(group: str) -> GraphModule:
    """y = gather(reduce(x) * 2) + 1, written as the insert_collectives pass writes collectives."""
    g = Graph()
    x = g.placeholder("x")
    reduced = g.call_function(c10d.wait_tensor.default, (g.call_function(c10d.all_reduce.default, (x, "sum", group)),))
    doubled = g.call_function(aten.mul.Tensor, (reduced, 2))
    gathered = g.call_function(c10d.wait_tensor.default,
                               (g.call_function(c10d.all_gather_into_tensor.default, (doubled, 1, group)),))
    g.output(g.call_function(aten.add.Tensor, (gathered, 1)))
    return GraphModule(torch.nn.Module(), g)


def test_inputs_go_to_the_host_and_results_come_back():
    gm = two_collectives("0")
    staged = stage_collectives_on_host(gm, "cuda:1")  # a graph rewrite only: no GPU needed
    assert staged == ["all_reduce_default", "all_gather_into_tensor_default"]
    for node in gm.graph.nodes:
        if node.target in (c10d.all_reduce.default, c10d.all_gather_into_tensor.default):
            src = node.args[0]
            assert src.target == aten._to_copy.default and src.kwargs["device"] == torch.device("cpu")
            (wait,) = node.users
            (back,) = wait.users
            assert back.target == aten._to_copy.default and back.kwargs["device"] == torch.device("cuda:1")
    consumers = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert consumers.count(aten._to_copy.default) == 4


def test_staged_graph_computes_the_same(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD.group_name
        x = torch.randn(3, 5)
        expected = two_collectives(group)(x)
        gm = two_collectives(group)
        assert len(stage_collectives_on_host(gm, "cpu")) == 2
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(expected, (x * 2 + 1).unsqueeze(0).reshape(expected.shape), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
