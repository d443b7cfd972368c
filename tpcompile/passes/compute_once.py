"""compute_activation_once: the input of a matrix-vector product that is an elementwise computation with a costly
op in it (SiLU, GELU, exp, tanh, ...) is computed once per step into a buffer, not inside the product's kernel:

    before: y = linear(silu(g) * u, W)
    after:  a = prims.inductor_force_stride_order(silu(g) * u, contiguous strides)
            y = linear(a, W)

With coordinate-descent tuning on (as GPU engines build), Inductor decomposes a product of one row (a decode step
at batch 1) into a multiply and a sum, its own reduction kernel, and may inline an elementwise input into it: every
block of output rows then recomputes the input (for a down projection of 4,096 rows, thousands of times the SiLU of
the whole input vector) and reads its operands again. The prim is Inductor's own "this layout":
the input is made once, by one small kernel, and the product reads the buffer. In eager it is one small copy.

Keyed on the graph only: a linear / mm / matmul whose input has MAX_ROWS row and is a pointwise op (or a
view of one) computed, through pointwise ops and views, with one of COSTLY. Where it runs: GPU engines that
compile with Inductor (`wanted`), on the rank graph after the partition; optional (backend.skip_passes).

`computed_once` is the one place that inserts the prim (share_attention_mask uses it too).
"""
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
PRODUCTS = {aten.linear.default: 0, aten.mm.default: 0, aten.matmul.default: 0, aten.addmm.default: 1}
COSTLY = {aten.silu, aten.gelu, aten.sigmoid, aten.exp, aten.exp2, aten.expm1, aten.tanh, aten.erf, aten.log,
          aten.log1p, aten.softplus, aten.mish, aten.sin, aten.cos}
MAX_ROWS = 1  # a product of more rows goes to a matmul kernel that reads a buffer anyway
BACKENDS = ("inductor", "inductor_cudagraphs", "aoti", "aoti_cudagraphs")


def wanted(backend: str, device: str) -> bool:
    """Whether a build for `backend` on `device` should run the pass."""
    return torch.device(device).type == "cuda" and backend in BACKENDS


def compute_activation_once(gm: GraphModule) -> list[str]:
    """Returns "input -> its buffer (costly ops)" for each product input made once."""
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in PRODUCTS or len(node.args) <= PRODUCTS[node.target]:
            continue
        x = node.args[PRODUCTS[node.target]]
        val = tensor_val(x)
        if not isinstance(x, Node) or val is None or val.dim() < 1 or val.numel() > MAX_ROWS * val.shape[-1]:
            continue
        costly = _costly_ops(x)
        if not costly or not _is_pointwise(x, through_views=True):
            continue
        once = computed_once(gm, x)
        node.replace_input_with(x, once)
        changed.append(f"{x.name} -> {once.name} ({', '.join(sorted(costly))})")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def computed_once(gm: GraphModule, node: Node) -> Node:
    """A node after `node` that Inductor realizes as one contiguous buffer (prims.inductor_force_stride_order);
    `node`'s other readers are left as they are."""
    import torch._inductor.inductor_prims  # noqa: F401  registers prims.inductor_force_stride_order
    val = tensor_val(node)
    stride = list(torch.empty(val.shape, device="meta").stride())
    with gm.graph.inserting_after(node):
        once = gm.graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (node, stride))
    once.meta = {**node.meta, "val": val.new_empty_strided(val.shape, stride)}
    return once


def _costly_ops(node: Node) -> set[str]:
    """The COSTLY ops among `node` and what it is computed from through pointwise ops and views."""
    found, seen, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or not _is_pointwise(n, through_views=False) and not _is_view(n):
            continue
        seen.add(n)
        if n.target.overloadpacket in COSTLY:
            found.add(n.target.overloadpacket.__name__)
        todo.extend(n.all_input_nodes)
    return found


def _is_pointwise(node: Node, through_views: bool) -> bool:
    while through_views and _is_view(node):
        node = node.args[0]
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and torch.Tag.pointwise in node.target.tags and not node.target._schema.is_mutable


def _is_view(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not node.args:
        return False
    schema = node.target._schema
    return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.is_mutable \
        and isinstance(node.args[0], Node)


def tensor_val(node) -> torch.Tensor | None:
    """The tensor a node's meta holds (its fake value), or None."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None
