"""decode_attention: attention of one query per row over a KV cache with a boolean mask becomes the op that reads
only the blocks of the cache the mask sees (tpcompile/kernels/decode_attention.py):

    before: y = scaled_dot_product_attention(q, k, v, mask[, scale=s][, enable_gqa=True])
    after:  y = tpcompile.decode_attention(q, k, v, mask, s)

    where q is (B, Hq, 1, D), k and v (B, Hkv, S, D) with Hq a multiple of Hkv (equal unless enable_gqa), the mask
    is bool and the same for every head, (B or 1, 1, 1, S); no dropout, not causal, a floating dtype.

SDPA reads every slot of the static cache every step, whatever the mask; the op reads the slots the mask sees (the
filled prefix, or a sliding window) and only the mask bytes of the rest. Keyed on the node's arguments and shapes
only: any model whose decode graph attends this way gets it.

share_attention_mask: the mask every layer's op reads is made once per step (one contiguous bool buffer), and so
are the cos and sin tables that rope_into_attention gives the op (and fuse_cache_write its write_kv op):

    before: y_i = tpcompile.decode_attention(q_i, k_i, v_i, mask, s)                    for each layer i
    after:  m = prims.inductor_force_stride_order(mask, contiguous strides)             (once)
            y_i = tpcompile.decode_attention(q_i, k_i, v_i, m, s)

Inductor gives each input of a user Triton kernel exactly the strides it was traced with
(config.triton_kernel_default_layout_constraint, `constrain_to_fake_tensors`); a mask that is still a cheap
pointwise computation there is copied per consumer (`ExternKernel.require_strides` -> `copy_input`), the mask's
ops inlined: one extra kernel per layer. The prim is Inductor's own "this layout" (a copy made once and shared,
`nodes.computed_once`); in eager (the `eager` backend on a GPU) it is one small copy per step.

Where it runs: on a GPU, with the engines that compile or call torch ops (`wanted`); onnx and tensorrt export
standard ops only, and on the CPU the op would run its reference (SDPA): the graph stays as it is there unless a
caller applies the pass itself (the tests do). Runs on the rank graph (local head counts), after the partition.
"""
import math

import torch
from torch.fx import GraphModule, Node

from tpcompile.passes.nodes import computed_once, tensor_val as _val

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SIGNATURE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# the arguments made once per step for every layer: decode_attention's mask, cos, sin; write_kv's cos, sin
STEP_INPUTS = {"decode_attention": (3, 5, 6), "write_kv": (5, 6)}
BACKENDS = ("eager", "inductor", "inductor_cudagraphs", "aoti", "aoti_cudagraphs")


def wanted(backend: str, device: str) -> bool:
    """Whether a build for `backend` on `device` should run the pass."""
    return torch.device(device).type == "cuda" and backend in BACKENDS


def decode_attention(gm: GraphModule) -> list[str]:
    """Returns the names of the attention nodes replaced."""
    changed = []
    for node in list(gm.graph.nodes):
        scale = _one_query_attention(node)
        if scale is None:
            continue
        import tpcompile.kernels.decode_attention  # noqa: F401  registers the op (imports torch's compiler)
        a = _arguments(node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.tpcompile.decode_attention.default,
                                         (a["query"], a["key"], a["value"], a["attn_mask"], scale))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed.append(node.name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def share_attention_mask(gm: GraphModule) -> list[str]:
    """Returns "mask -> its one copy (N reads)" for each mask read by two or more decode_attention nodes, and the
    same for the RoPE tables of rope_into_attention and fuse_cache_write: inputs that are the same computation (each
    layer's own view of one mask, say) count as one."""
    if not hasattr(torch.ops.tpcompile, "decode_attention"):  # the op's module never imported: no node calls it
        return []
    same = _same_computation(gm)
    ops = {getattr(torch.ops.tpcompile, name).default: at for name, at in STEP_INPUTS.items()
           if hasattr(torch.ops.tpcompile, name)}
    readers: dict[int, list[tuple[Node, int]]] = {}
    for node in gm.graph.nodes:
        for i in ops.get(node.target, ()) if node.op == "call_function" else ():
            if i < len(node.args) and isinstance(node.args[i], Node):
                readers.setdefault(same[node.args[i]], []).append((node, i))
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = []
    for uses in readers.values():
        first = min((n.args[i] for n, i in uses), key=order.__getitem__)  # the first made: before every reader
        if len(uses) < 2 or _val(first) is None:
            continue
        once = computed_once(gm, first)
        for node, i in uses:
            node.update_arg(i, once)
        changed.append(f"{first.name} -> {once.name} ({len(uses)} reads)")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _same_computation(gm: GraphModule) -> dict[Node, int]:
    """A number per node, equal for nodes that compute the same value: the same pure op on the same inputs
    (hash-consing, in graph order). Inputs, attributes, ops that write or draw random numbers, and everything
    computed from a tensor some op writes in place (a KV cache: its value depends on where it is read) are their
    own. (torch.fx's CSEPass would merge reads on either side of such a write, and rewrites the whole graph.)"""
    written = {a for node in gm.graph.nodes if isinstance(node.target, torch._ops.OpOverload)
               for a, spec in zip(node.args, node.target._schema.arguments)
               if isinstance(a, Node) and spec.alias_info is not None and spec.alias_info.is_write}
    ids: dict = {}
    out: dict[Node, int] = {}
    tainted: set[Node] = set()

    def arg(a):
        if isinstance(a, Node):
            return ("node", out[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        return a if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device)) else ("obj", id(a))

    for node in gm.graph.nodes:
        if node in written or any(i in tainted for i in node.all_input_nodes):
            tainted.add(node)
        pure = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
            and not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags \
            and node not in tainted
        key = (node.target, arg(node.args), arg(tuple(sorted(node.kwargs.items())))) if pure else ("own", node)
        out[node] = ids.setdefault(key, len(ids))
    return out


def _arguments(node: Node) -> dict:
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return defaults | dict(zip(SIGNATURE, node.args)) | dict(node.kwargs)


def _one_query_attention(node: Node) -> float | None:
    """The softmax scale when `node` is attention the op computes the same way, else None."""
    if node.op != "call_function" or node.target != SDPA:
        return None
    a = _arguments(node)
    q, k, v, mask = (_val(a[n]) for n in ("query", "key", "value", "attn_mask"))
    if any(t is None for t in (q, k, v, mask)) or a["dropout_p"] or a["is_causal"]:
        return None
    if q.dim() != 4 or q.shape[2] != 1 or k.shape != v.shape or k.dim() != 4 or not q.dtype.is_floating_point:
        return None
    (b, hq, _, d), (_, hkv, s, dk) = q.shape, k.shape
    if dk != d or k.shape[0] != b or hq % hkv or (hq != hkv and not a["enable_gqa"]) or d > 256:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[1:]) != (1, 1, s) or mask.shape[0] not in (1, b):
        return None
    return float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(d)

