"""Where an AOTInductor engine of tpcompile fails on a device: each way of loading and running it in its own
process, so a crash (SIGSEGV) is a result, not the end of the probe.

    python benchmarks/tools/aoti_probe.py ARTIFACT_DIR [--device cuda] [--out probe.json]

Ways: `ours` (tpcompile.lower.aoti.load), `managed` (the loader built directly, user-managed constants),
`copy` (the same, load_constants copies), `package` (torch._inductor.aoti_load_package, copies). Each prints the step it reached; the record keeps the last.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import child, provenance  # noqa: E402
from tpcompile.util import provenance as cli_provenance
from tpcompile.lower import aoti

CHILD = r"""
import faulthandler, sys
faulthandler.enable()
from pathlib import Path
import torch
from tpcompile.artifact import read_manifest
from tpcompile.capture import dtype_of, example_inputs
from tpcompile.lower import aoti
from tpcompile.runtime.weights_io import load_rank_weights
path, way, device = Path(sys.argv[1]), sys.argv[2], torch.device(sys.argv[3])
index = -1 if device.type == "cpu" else (device.index or 0)
if device.type == "cuda":  # as a worker does (runtime/engine.py): its device, and the overlapped load finished
    torch.cuda.set_device(device)
m = read_manifest(path)
w = load_rank_weights(path / m.rank_file(0), device)
if device.type == "cuda":
    torch.cuda.synchronize(device)
for fqn, spec in m.state.items():
    w[fqn] = torch.zeros(spec["shape"], dtype=dtype_of(spec["dtype"]), device=device)
g = m.graphs["forward"]
file = path / g["files"][0]
x = list(example_inputs(g["inputs"], device=str(device), seed=1))
print("step: open", flush=True)
if way == "ours":
    engine = aoti.load(path, g["files"], w, device)
    print("step: run", flush=True)
    out = engine(*x)
else:
    if way == "package":
        loader = torch._inductor.aoti_load_package(str(file), device_index=index).loader
    else:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(file), "model", False, 1, index)
    fqns = loader.get_constant_fqns()
    bound = {f: w[f].to(device).contiguous().clone() for f in fqns}
    print("step: bind", len(fqns), "constants on", sorted({str(t.device) for t in bound.values()}), flush=True)
    if way == "managed":
        loader.load_constants(bound, use_inactive=False, check_full_update=True, user_managed=True)
    else:
        loader.load_constants(bound, False, True)
    print("step: run", flush=True)
    out = loader.boxed_run(x)
if device.type == "cuda":
    torch.cuda.synchronize()
print("step: ok", [tuple(o.shape) for o in (out if isinstance(out, (list, tuple)) else [out])], flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ways", nargs="+", default=["ours", "managed", "copy", "package"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-preload", action="store_true", help="start the loaders without worker_env's LD_PRELOAD")
    args = ap.parse_args()
    rows = []
    # as tpcompile's workers start (lower/aoti.worker_env); --no-preload shows the crash without it
    env = {**os.environ, **({} if args.no_preload else aoti.worker_env(args.device))}
    for way in args.ways:
        rows.append({"way": way, **child(CHILD, args.artifact, way, args.device, env=env)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}), flush=True)
    record = {**(provenance() if torch.cuda.is_available() else cli_provenance()),
              "what": "aoti engine load/run probe", "artifact": args.artifact, "env": {k: env[k] for k in ("LD_PRELOAD",) if k in env}, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
