"""Backends: one Backend record each, in one dict.

    lower(program: ExportedProgram, out_dir: Path, name="engine", *, device="cpu") -> list[str]
        engine files for one graph, written into out_dir, their names starting with `name`; `device` is the
        manifest's (where the engine runs); program is the rank graph traced with meta (or empty CPU) weights
    load(out_dir: Path, files: list[str], weights: dict, device) -> callable(*args) -> Tensor | list[Tensor]
        files as lower returned them; weights: fqn -> this rank's tensor, shared by all graphs of the
        artifact (a backend may replace an entry in place by an equal tensor, e.g. a contiguous copy)

Optional packages are imported inside lower/load.
"""
import os
import sys
from dataclasses import dataclass
from typing import Callable

from tpcompile.lower import aoti, eager, inductor, onnx, tensorrt


@dataclass(frozen=True)
class Backend:
    lower: Callable
    load: Callable
    worker_env: Callable[[str], dict] | None = None  # device -> env its worker processes need before they start
    runtime_packages: tuple[str, ...] = ()  # needed at load: versions recorded at compile, must match at load
    native_code: bool = False        # engines hold machine code for the compile machine's CPU ISA or GPU sm
    concurrent_lower: bool = False   # lower() waits on a compiler subprocess: an artifact's graphs lower side by side
    inductor_options: Callable[[str], dict] | None = None  # device -> the Inductor settings its engines compile with


BACKENDS = {
    "eager": Backend(eager.lower, eager.load),           # torch.export.save; run the graph as is
    "inductor": Backend(inductor.lower, inductor.load,   # same file; torch.compile at load time
                        inductor_options=inductor.options),
    "inductor_cudagraphs": Backend(inductor.lower, inductor.load_cudagraphs,  # + CUDA graphs (reduce-overhead)
                                   inductor_options=inductor.options),
    "aoti": Backend(aoti.lower, aoti.load, worker_env=aoti.worker_env,  # AOTInductor .pt2 package, compiled
                    native_code=True, concurrent_lower=True,            # once; weights bound at load
                    inductor_options=aoti.inductor_options),
    "aoti_cudagraphs": Backend(aoti.lower, aoti.load_cudagraphs, worker_env=aoti.worker_env,  # the same package,
                               native_code=True, concurrent_lower=True,  # replayed as a CUDA graph on a GPU
                               inductor_options=aoti.inductor_options),
    "onnx": Backend(onnx.lower, onnx.load,               # ONNX segments between collectives; onnxruntime
                    runtime_packages=("onnxruntime",)),  # + torch.distributed
    "tensorrt": Backend(tensorrt.lower, tensorrt.load,   # TensorRT segments between collectives (CUDA only)
                        runtime_packages=("torch-tensorrt", "tensorrt"), native_code=True),
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not known; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def worker_env(name: str, device: str) -> dict:
    """Environment a backend's worker processes need before they start (on top of the session's env)."""
    env = backend(name).worker_env
    return env(device) if env is not None else {}


def start_again_with_worker_env(name: str, device: str, argv: list[str]) -> None:
    """For a process that loads `name`'s engines itself (a torchrun rank, a diagnostic): when it lacks the
    environment worker_env gives workers, replace it by `python argv...` with that environment; return when it
    has it (worker_env is empty once set)."""
    extra = worker_env(name, device)
    if extra:
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **extra})


def inductor_options(name: str, device: str) -> dict:
    """The Inductor settings `name`'s engines for `device` compile with (part of the artifact's key); {} for a
    backend without Inductor."""
    options = backend(name).inductor_options
    return options(device) if options is not None else {}


def build_info(name: str, device: str) -> dict:
    """Manifest fields that say what a backend's engine needs at load (see artifact.check_compatible)."""
    from tpcompile.artifact import device_capability, package_versions
    b = backend(name)
    return {"backend_versions": package_versions(list(b.runtime_packages)),
            "device_capability": device_capability(device) if b.native_code else None}
