"""Which part of an AOTInductor CUDA package crashes at load: a toy module (Linear + buffer) compiled four ways,
each compile and each load in its own process, then a native backtrace of the first crash under cuda-gdb.

    python benchmarks/tools/aoti_bisect.py --device cuda --out bisect.json [--package P.pt2 ...]

Cases:
  in_so      torch's defaults: weights inside the .so, aoti_load_package;
  external   aot_inductor.package_constants_in_so=False, weights bound with load_constants (copied);
  managed    the same package, weights bound user-managed (no copy), as tpcompile.lower.aoti.load does;
  ours       the toy through tpcompile.lower.aoti.lower (subprocess, fake process group, device retarget)
             and tpcompile.lower.aoti.load;
  matmul     a module with no Triton kernel (one matmul), torch's defaults;
  embed      in_so with aot_inductor.embed_kernel_binary (kernels inside the .so, not cubin files);
  multi_arch in_so with aot_inductor.emit_multi_arch_kernel (fatbin with PTX).
--package adds existing packages (e.g. a tpcompile engine's forward.pt2) to the cuda-gdb step only.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import REPO, child  # noqa: E402

TOY = r"""
import faulthandler, sys
faulthandler.enable()
from pathlib import Path
import torch
import json
case, dev, pkg, phase, cfg = sys.argv[1:6]
cfg = json.loads(cfg)
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.register_buffer("b", torch.ones(64))
    def forward(self, x):
        return torch.relu(self.lin(x)) + self.b
class MatmulOnly(torch.nn.Module):  # no Triton kernel: the package holds no kernel binary
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 64))
    def forward(self, x):
        return x @ self.w
torch.manual_seed(0)
m = (MatmulOnly() if case == "matmul" else Toy()).eval()
x = torch.randn(4, 64)
ref = m(x)
weights = {k: v.detach().to(dev).contiguous().clone() for k, v in m.state_dict().items()}
index = 0 if dev == "cuda" else -1
if phase == "compile":
    if case == "ours":
        from tpcompile.lower import aoti
        ep = torch.export.export(m, (x,))
        aoti.lower(ep, Path(pkg).parent, Path(pkg).stem, device=dev)
    else:
        ep = torch.export.export(m.to(dev), (x.to(dev),))
        torch._inductor.aoti_compile_and_package(ep, package_path=pkg, inductor_configs=cfg)
    print("step: compiled", flush=True)
    sys.exit(0)
print("step: open", flush=True)
if case == "ours":
    from tpcompile.lower import aoti
    engine = aoti.load(Path(pkg).parent, [Path(pkg).name], weights, dev)
    print("step: bound", flush=True)
    y = engine(x.to(dev))
else:
    if "aot_inductor.package_constants_in_so" not in cfg:
        loader = torch._inductor.aoti_load_package(pkg, device_index=index).loader
    else:
        loader = torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, index)
    print("step: constructed", flush=True)
    if "aot_inductor.package_constants_in_so" in cfg:
        bound = {f: weights[f] for f in loader.get_constant_fqns()}
        if case == "managed":
            loader.load_constants(bound, use_inactive=False, check_full_update=True, user_managed=True)
        else:
            loader.load_constants(bound, False, True)
        print("step: bound", flush=True)
    y = loader.boxed_run([x.to(dev)])
y = y[0] if isinstance(y, (list, tuple)) else y
torch.cuda.synchronize() if dev == "cuda" else None
err = (y.cpu() - ref).abs().max().item()
print("step: ok max abs err", err, flush=True)
"""

EXTERNAL = {"aot_inductor.package_constants_in_so": False}
CASES = {"in_so": {}, "external": EXTERNAL, "managed": EXTERNAL, "ours": EXTERNAL, "matmul": {},
         "embed": {"aot_inductor.embed_kernel_binary": True},
         "multi_arch": {"aot_inductor.emit_multi_arch_kernel": True}}

GDB_CHILD = r"""
import faulthandler, sys
faulthandler.enable()
import torch
pkg = sys.argv[1]
torch.zeros(1, device="cuda")
print("step: open", flush=True)
loader = torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, 0)
print("step: constructed", flush=True)
"""


def backtrace(package: str) -> str:
    """A native backtrace of the loader's constructor on `package` (cuda-gdb also debugs host code)."""
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if not gdb:
        return "no cuda-gdb or gdb on PATH"
    cmd = [gdb, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 24",
           "--args", sys.executable, "-c", GDB_CHILD, package]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        text = r.stdout + r.stderr
        return text[text.find("signal SIGSEGV") - 200:][:9000] if "signal SIGSEGV" in text else text[-6000:]
    except subprocess.TimeoutExpired as e:
        return "timeout: " + str(e.stdout or "")[-3000:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--package", nargs="*", default=[], help="more packages for the cuda-gdb backtrace")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, crashed = [], []
    with tempfile.TemporaryDirectory(prefix="tpc-aoti-bisect-") as tmp:
        for case in args.cases:
            built = "external" if case == "managed" else case  # managed binds the external package
            pkg = str(Path(tmp) / built / "toy.pt2")
            Path(pkg).parent.mkdir(exist_ok=True)
            row = {"case": case}
            if not Path(pkg).is_file():
                row["compile"] = child(TOY, built, args.device, pkg, "compile", json.dumps(CASES[case]), timeout=600)
            row["load"] = child(TOY, case, args.device, pkg, "load", json.dumps(CASES[case]))
            if row["load"]["rc"] != 0 and Path(pkg).is_file():
                crashed.append(pkg)
            rows.append(row)
            print(json.dumps({"case": case, "compile": row.get("compile", {}).get("reached"),
                              "load": [row["load"]["rc"], row["load"]["reached"]]}), flush=True)
        gdb = {p: backtrace(p) for p in (crashed[:1] + args.package)} if args.device == "cuda" else {}
        for p, text in gdb.items():
            print(f"#### cuda-gdb on {p}\n{text[:4000]}", flush=True)
    if args.out:
        import torch
        from tpcompile.util import provenance
        Path(args.out).write_text(json.dumps({**provenance(), "torch": torch.__version__,
                                              "device_name": torch.cuda.get_device_name() if args.device == "cuda"
                                              else "cpu", "rows": rows, "backtraces": gdb}, indent=1))


if __name__ == "__main__":
    main()
