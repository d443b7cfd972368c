"""Backends: each is one small function pair.

    lower(program: ExportedProgram, out_dir: Path, name="engine", *, device="cpu") -> list[str]
        engine files for one graph, written into out_dir, their names starting with `name`; `device` is the
        manifest's (where the engine runs); program is the rank graph traced with meta (or empty CPU) weights
    load(out_dir: Path, files: list[str], weights: dict, device) -> callable(*args) -> Tensor | list[Tensor]
        files as lower returned them; weights: fqn -> this rank's tensor, shared by all graphs of the
        artifact (a backend may replace an entry in place by an equal tensor, e.g. a contiguous copy)

A plain dict is the registry, one entry per backend. Optional packages are imported inside lower/load.
"""
from tpcompile.lower import aoti, eager, inductor, onnx, tensorrt

BACKENDS = {
    "eager": (eager.lower, eager.load),          # torch.export.save; run the graph as is
    "inductor": (inductor.lower, inductor.load),  # same file; torch.compile at load time
    "inductor_cudagraphs": (inductor.lower, inductor.load_cudagraphs),  # + CUDA graphs (mode="reduce-overhead")
    "aoti": (aoti.lower, aoti.load),              # AOTInductor .pt2 package, compiled once; weights bound at load
    "onnx": (onnx.lower, onnx.load),              # ONNX segments between collectives; onnxruntime + torch.distributed
    "tensorrt": (tensorrt.lower, tensorrt.load),  # TensorRT segments between collectives (CUDA only)
}


def backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not known; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


# backends whose lower() waits on a compiler subprocess: an artifact's graphs are lowered side by side
CONCURRENT_LOWER = {"aoti"}


# environment a backend's worker processes need before they start (on top of the session's env)
WORKER_ENV = {"aoti": aoti.worker_env}


def worker_env(name: str, device: str) -> dict:
    return WORKER_ENV[name](device) if name in WORKER_ENV else {}


# packages an engine needs at load: their versions are recorded at compile and must match at load
RUNTIME_PACKAGES = {"onnx": ["onnxruntime"], "tensorrt": ["torch-tensorrt", "tensorrt"]}
NATIVE_CODE = {"aoti", "tensorrt"}  # engines holding machine code for the compile machine's CPU ISA or GPU sm


def build_info(name: str, device: str) -> dict:
    """Manifest fields that say what a backend's engine needs at load (see artifact.check_compatible)."""
    from tpcompile.artifact import device_capability, package_versions
    return {"backend_versions": package_versions(RUNTIME_PACKAGES.get(name, [])),
            "device_capability": device_capability(device) if name in NATIVE_CODE else None}
