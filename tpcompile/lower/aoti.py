"""aoti: the rank graph compiled ahead of time by AOTInductor into one `.pt2` package, collectives inside.

    lower: rank program (meta weights) -> retarget to the runtime device -> AOTInductor -> <name>.pt2
    load:  AOTIModelPackageLoader -> bind this rank's tensors with load_constants (user-managed) -> callable

One package serves every rank: it holds no weights (`package_constants_in_so=False`); each rank binds its own
at load, before the first call (calling it unbound crashes). Loading runs the compiled library: no compiler.

AOTInductor resolves the collectives' process group by name while compiling ("0", the default group). A real
group must never be created in the Hydra parent, so the compile runs in a short-lived subprocess
(`python -m tpcompile.lower.aoti`) that registers a fake group of that name.
"""
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.export import ExportedProgram

from tpcompile.capture import retarget_device
from tpcompile.kernels import gpu_ops
from tpcompile.lower import aoti_pdl, eager, inductor

_SAVE_LOCK = threading.Lock()
COMPILE_TIMEOUT_S = 3600.0  # AOTInductor on a large model on few cores takes minutes, not hours


def lower(program: ExportedProgram, out_dir: Path, name: str = "engine", *, device: str = "cpu") -> list[str]:
    package = Path(out_dir) / f"{name}.pt2"
    if _launch_with_pdl(device):
        aoti_pdl.check()  # a torch whose wrapper it does not know: one clear error before the compile starts
    with tempfile.TemporaryDirectory(prefix="tpc-aoti-") as tmp:
        source = Path(tmp) / "program.pt2"
        with _SAVE_LOCK:  # graphs lower on threads (Backend.concurrent_lower); export.save is not thread-safe
            torch.export.save(program, source)
        cmd = [sys.executable, "-m", "tpcompile.lower.aoti", str(source), str(package), device, _group_name(program)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                                  env={**os.environ, "PYTHONPATH": _pythonpath()})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"AOTInductor compile of {name} did not finish in {COMPILE_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0 or not package.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"AOTInductor compile of {name} failed (exit {proc.returncode}):\n{tail}")
    return [package.name]


def load(out_dir: Path, files: list[str], weights: dict, device) -> "Engine":
    """Open the package and bind this rank's tensors. The loader is built directly rather than through
    torch._inductor.aoti_load_package, which probes the CPU's vector ISA by compiling test programs."""
    device = torch.device(device)
    path = Path(out_dir) / files[0]
    if eager.gloo_on_gpu(device) and dist.get_world_size() > 1:
        raise ValueError(f"{path}: an aoti engine runs its collectives inside the compiled package, and gloo crashes "
                         f"on GPU tensors (all_gather); give each rank its own GPU with runtime.collectives=nccl, "
                         f"or use backend=eager or inductor to share one GPU over gloo")
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1,
                                                   device.index if device.index is not None else -1)
    needed = loader.get_constant_fqns()
    missing = sorted(set(needed) - set(weights))
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:3]} ({len(missing)} in all); recompile the artifact")
    for fqn in needed:  # made contiguous and storage-aligned once, in place, so later graphs share them
        t = weights[fqn].to(device).contiguous()
        weights[fqn] = t.clone() if _is_view(t) else t
    bound = {fqn: weights[fqn] for fqn in needed}
    try:  # user_managed: the engine reads and writes our tensors (no copy; KV caches shared across graphs)
        loader.load_constants(bound, use_inactive=False, check_full_update=True, user_managed=True)
    except TypeError:  # older torch without user_managed: the loader copies
        loader.load_constants(bound, False, True)
    return Engine(loader, bound)


def load_cudagraphs(out_dir: Path, files: list[str], weights: dict, device):
    """aoti_cudagraphs: the package as `load` binds it; on a GPU each graph is captured in a CUDA graph at its first
    call and replayed after (lower/cudagraph.py). Nothing is compiled at load."""
    engine = load(out_dir, files, weights, device)
    if torch.device(device).type != "cuda":
        return engine
    from tpcompile.lower.cudagraph import Replay
    return Replay(engine, device)


class Engine:
    """Calls the compiled model with flat tensors; holds the bound tensors as long as it lives."""

    def __init__(self, loader, tensors: dict):
        from torch.utils import _pytree
        self.loader, self.tensors = loader, tensors
        self.out_spec = _pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *args: torch.Tensor):
        from torch.utils import _pytree
        return _pytree.tree_unflatten(self.loader.boxed_run([a.contiguous() for a in args]), self.out_spec)


def worker_env(device) -> dict:
    """Environment for the processes that load a CUDA package. Without it the package's loader crashes
    (SIGSEGV) in its constructor, inside std::regex code of the package's wrapper library, for every package,
    torch's own defaults included (torch 2.11+cu130, g++ 13, libstdc++ 6.0.33; H100 and H200;
    benchmarks/tools/aoti_bisect.py). Preloading the libstdc++ that torch already maps makes the same load work, as
    measured there; which object otherwise serves those symbols to the wrapper was not established."""
    if torch.device(device).type != "cuda":
        return {}
    lib = _mapped_library("libstdc++.so")
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload.replace(":", " ").split():
        return {}
    return {"LD_PRELOAD": f"{lib} {preload}".strip()}


def _mapped_library(name: str) -> str | None:
    """Path of a shared library this process has loaded (Linux), e.g. the libstdc++ under torch."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return next((line.split()[-1] for line in lines if name in line.rsplit("/", 1)[-1]), None)


def _is_view(t: torch.Tensor) -> bool:
    """load_constants reads raw storage: a view with an offset (e.g. from one safetensors buffer, or
    narrow) gives wrong numbers, even NaN."""
    return t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _group_name(program: ExportedProgram) -> str:
    """The process-group name the collectives use (all the same: partition inserts them with one name)."""
    names = {str(n.args[-1]) for n in program.graph.nodes
             if n.op == "call_function" and getattr(n.target, "namespace", "") == "_c10d_functional"
             and n.args and isinstance(n.args[-1], str)}
    if len(names) > 1:
        raise ValueError(f"the rank graph uses several process groups {sorted(names)}; aoti supports one")
    return names.pop() if names else "0"


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, os.environ["PYTHONPATH"]]) if os.environ.get("PYTHONPATH") else root


def _compile(source: str, package: str, device: str, group_name: str) -> None:
    """In the subprocess: fake process group named like the engine's, weights as empty tensors on `device`
    (their values are never read), the graph retargeted from its trace device, then AOTInductor."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    if dist.group.WORLD.group_name != group_name:
        raise RuntimeError(f"the engine's collectives name process group {group_name!r}, but the compile-time "
                           f"group is {dist.group.WORLD.group_name!r}")
    gpu_ops(device)  # GPU graphs may call ops that only GPU builds put in (passes/decode_attention.py)
    program = torch.export.load(source)
    inputs = [n.meta["val"] for n in program.graph.nodes
              if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    gm = program.module()
    retarget_device(gm, device)
    for fqn, p in list(gm.named_parameters()):
        _set(gm, fqn, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False))
    for fqn, b in list(gm.named_buffers()):
        _set(gm, fqn, torch.empty(b.shape, dtype=b.dtype, device=device))
    args = tuple(torch.zeros(v.shape, dtype=v.dtype, device=device) for v in inputs)
    with torch.no_grad():
        ep = torch.export.export(gm, args)
    if _launch_with_pdl(device):
        aoti_pdl.install()
    torch._inductor.aoti_compile_and_package(
        ep, package_path=package,
        inductor_configs={"aot_inductor.package_constants_in_so": False, **inductor_options(device)})
    dist.destroy_process_group()


def inductor_options(device) -> dict:
    """The Inductor settings the package compiles with: inductor.options for AOTInductor."""
    return inductor.options(device, aoti=True)


def _launch_with_pdl(device) -> bool:
    """Whether the package's kernels launch with programmatic dependent launch (lower/aoti_pdl.py): when the
    settings ask for it on a GPU."""
    return torch.device(device).type == "cuda" and bool(inductor_options(device).get("triton.enable_pdl"))


def _set(root: torch.nn.Module, fqn: str, value) -> None:
    *path, name = fqn.split(".")
    mod = root.get_submodule(".".join(path)) if path else root
    if name in mod._parameters:
        mod._parameters[name] = value
    else:
        mod._buffers[name] = value


if __name__ == "__main__":
    _compile(*sys.argv[1:5])
