"""Ops that passes put into rank graphs, registered as torch ops (namespace "tpcompile") when their module is
imported: an engine file that calls one can be loaded (torch.export.load) only after that import. This package
imports allreduce_norm; decode_attention, write_kv and row_linear are imported where a graph may call them (their
passes, and `gpu_ops` from the eager and inductor loaders and the aoti compile on a GPU), because registering one as a
triton_op imports torch's compiler, which an aoti or onnx worker never needs.

    decode_attention.py  attention of one query per row over the part of a static KV cache its mask sees: the
                       reference (SDPA) on any device; split-KV Triton kernels (flash_decode.py) on GPUs
    write_kv.py        a decode step's k and v written into their caches, k rotated (RoPE) first: the reference
                       (index_put_) on any device; one Triton kernel for both (kv_store.py) on GPUs
    row_linear.py      one row times a weight (a gated MLP's activation inside): the reference (linear) on any
                       device; a matrix-vector Triton kernel with launch settings tuned per shape (gemv.py) on GPUs
    allreduce_norm.py  all-reduce + residual add (+ RMSNorm) as one op: the reference (functional collective,
                       add, norm) on any device; a one-shot peer-memory kernel (lamport.py) on GPUs with P2P
"""
from tpcompile.kernels import allreduce_norm  # noqa: F401  registers torch.ops.tpcompile.*


def gpu_ops(device) -> None:
    """Register the ops that only GPU graphs call (decode_attention, write_kv, row_linear, the prim of
    share_attention_mask) before a graph on `device` is loaded or compiled; nothing on other devices."""
    import torch
    if torch.device(device).type == "cuda":
        import tpcompile.kernels.decode_attention  # noqa: F401  registers torch.ops.tpcompile.decode_attention
        import tpcompile.kernels.row_linear  # noqa: F401  registers torch.ops.tpcompile.row_linear
        import tpcompile.kernels.write_kv  # noqa: F401  registers torch.ops.tpcompile.write_kv
        import torch._inductor.inductor_prims  # noqa: F401  prims.inductor_force_stride_order (share_attention_mask)
