"""Ops that passes put into rank graphs, registered as torch ops (namespace "tpcompile") when this package is
imported: an engine file that calls one can be loaded (torch.export.load) only after that import.

    decode_attention.py  attention of one query per row over the part of a static KV cache its mask sees: the
                       reference (SDPA) on any device; split-KV Triton kernels (flash_decode.py) on GPUs
    allreduce_norm.py  all-reduce + residual add (+ RMSNorm) as one op: the reference (functional collective,
                       add, norm) on any device; a one-shot peer-memory kernel (lamport.py) on GPUs with P2P
"""
from tpcompile.kernels import allreduce_norm, decode_attention  # noqa: F401  registers torch.ops.tpcompile.*
