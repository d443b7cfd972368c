"""Run an artifact on processes started by torchrun (one per rank, possibly on several machines):

    torchrun --nnodes=1 --nproc-per-node=2 -m tpcompile.runtime.torchrun ARTIFACT \
        [--inputs in.safetensors] [--out out.safetensors] [--device cpu|cuda]

Inputs come from a safetensors file keyed by the manifest's input names, or are drawn from --seed.
Rank 0 prints a summary and writes the outputs (output0, output1, ...) to --out.
"""
import argparse
import os
import sys

from safetensors.torch import load_file, save_file

from tpcompile.artifact import read_manifest
from tpcompile.capture import example_inputs
from tpcompile.lower import start_again_with_worker_env
from tpcompile.runtime.worker import one_line, serve_standalone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tpcompile.runtime.torchrun", description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--inputs", help="safetensors file with one tensor per input name")
    ap.add_argument("--out", help="where rank 0 writes the outputs (safetensors)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: what the artifact was built for)")
    ap.add_argument("--seed", type=int, default=1, help="seed for random inputs when --inputs is not given")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="bound on rendezvous and every collective")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        print("tpcompile.runtime.torchrun: RANK is not set; start it with torchrun --nproc-per-node=TP", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.artifact)
        if "forward" not in manifest.graphs:
            raise ValueError(f"{args.artifact}: has graphs {sorted(manifest.graphs)}, not 'forward'; compile it with "
                             f"`tpcompile compile` (generation artifacts are served by `tpcompile generate`)")
        device = args.device or manifest.device
        # aoti on CUDA needs its environment set before the process starts: start this rank again with it
        start_again_with_worker_env(manifest.backend, device, ["-m", "tpcompile.runtime.torchrun", *argv])
        specs = manifest.graphs["forward"]["inputs"]
        if args.inputs:
            tensors = load_file(args.inputs)
            inputs = [tensors[s["name"]] for s in specs]
        else:
            inputs = list(example_inputs(specs, device="cpu", seed=args.seed))
        replies = serve_standalone("tpcompile.runtime.engine:make", {"artifact": os.path.abspath(args.artifact)},
                                   [("run", {"args": inputs})], device=device,
                                   timeout_s=args.timeout_s)
    except Exception as e:
        print(f"rank {os.environ.get('RANK')}: error: {one_line(e)}", file=sys.stderr)
        return 2
    if replies is not None:
        outputs = replies[0]["outputs"]
        for i, o in enumerate(outputs):
            print(f"output {i}: shape {list(o.shape)}, mean {o.float().mean().item():.6f}")
        if args.out:
            save_file({f"output{i}": o.contiguous() for i, o in enumerate(outputs)}, args.out)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: with the group already destroyed, tearing down c10d's native threads at exit
    # aborted the process here ("terminate called without an active exception") after correct outputs
    os._exit(code)
