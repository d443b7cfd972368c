"""inductor: the eager engine file, compiled with torch.compile when a worker loads it.
Inductor understands the functional collectives in the graph; each rank compiles the same graph.
inductor_cudagraphs: the same with mode="reduce-overhead", so each graph replays as one CUDA graph
(static shapes, weights and KV cache at fixed addresses: what decode needs on a GPU).

On a GPU, Inductor runs with coordinate-descent tuning: it then lowers a matrix-vector product (batch-1
decode) to a Triton reduction that streams the weight near the bandwidth limit and takes the RMSNorm before
it and the residual add after it into the same kernel, instead of a cuBLAS GEMV plus separate kernels. It also
launches its kernels with programmatic dependent launch (triton.enable_pdl; Hopper and later): each kernel is
launched while the one before it still runs and waits on the device before its first read of what that one
wrote, so the launch gap between the ~11 kernels of a decoder layer is hidden.
TPCOMPILE_INDUCTOR_OPTIONS (a JSON object) overrides these settings; it is part of the artifact's cache key,
since an AOTInductor engine is compiled with them."""
import json
import os
from pathlib import Path

import torch

from tpcompile.lower import eager

lower = eager.lower


OPTIONS_ENV = "TPCOMPILE_INDUCTOR_OPTIONS"  # JSON object of Inductor settings over ours, e.g. for an ablation


def options(device, cudagraphs: bool = False, aoti: bool = False) -> dict:
    """Inductor settings for an engine running on `device` (shared by torch.compile and AOTInductor). Programmatic
    dependent launch by default only under torch.compile: AOTInductor's own C++ wrapper launches every kernel with
    a plain cuLaunchKernel, without the launch attribute; with the setting asked for explicitly, lower/aoti_pdl.py
    adds the attribute there, which measured no faster on an H200 (an aoti_cudagraphs step has no launch gap)."""
    gpu = torch.device(device).type == "cuda"
    pdl = gpu and not aoti and _has_pdl()
    return ({"coordinate_descent_tuning": gpu} | ({"triton.enable_pdl": True} if pdl else {})
            | ({"triton.cudagraphs": True} if cudagraphs else {}) | user_options())


def _has_pdl() -> bool:
    """Whether this torch's Inductor has programmatic dependent launch (it uses it on sm90 and later only)."""
    import torch._inductor.config as config
    return hasattr(config.triton, "enable_pdl")


def user_options(text: str | None = None) -> dict:
    """The Inductor settings of OPTIONS_ENV (or of `text`, written as that variable would be)."""
    text = (os.environ.get(OPTIONS_ENV, "") if text is None else text).strip()
    try:
        extra = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{OPTIONS_ENV}={text!r} is not JSON ({e.msg}); "
                         f"write an object such as '{{\"coordinate_descent_tuning\": false}}'") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{OPTIONS_ENV}={text!r}: need a JSON object of Inductor settings, got {type(extra).__name__}")
    return extra


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    gm = eager.bind(out_dir / files[0], weights, device)
    return torch.compile(gm, fullgraph=True, dynamic=False, options=options(device))


def load_cudagraphs(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    """mode="reduce-overhead" is options {"triton.cudagraphs": True}; torch.compile takes one or the other."""
    gm = eager.bind(out_dir / files[0], weights, device)
    return torch.compile(gm, fullgraph=True, dynamic=False, options=options(device, cudagraphs=True))
