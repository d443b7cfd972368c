"""`tpcompile <command> [hydra overrides]`: compile, run, verify, inspect.

Hydra composes the config in this (parent) process only; workers get the artifact path, never a DictConfig.
Errors print one line on stderr and exit non-zero; `--debug` (or HYDRA_FULL_ERROR=1) shows the traceback.
"""
import json
import os
import resource
import sys
import time
from pathlib import Path

USAGE = """usage: tpcompile <command> [overrides] [-m] [--debug] [--cfg job] [--info]

commands:
  compile   capture, plan, passes, lower; write the artifact (outputs/engines/<key>)
  run       compile (or reuse) and run once on tp workers
  verify    compile, run on tp workers, compare with the unsharded model
  inspect   capture, plan and passes only: the plan table and what each pass changed

overrides: model=llama_tiny|llama_1b|llama_8b|mlp plan=megatron|mlp|replicate backend=eager|inductor
           tp=2 dtype=float32 runtime.device=cpu|cuda   (tpcompile verify -m tp=1,2,4 sweeps)"""


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = argv.pop(0)
    if command not in COMMANDS:
        print(f"tpcompile: unknown command {command!r}; use one of {sorted(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    import hydra

    from tpcompile.config import CONF_DIR, register
    register()
    sys.argv = [f"tpcompile {command}"] + argv
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task(command, debug))()


def _task(command: str, debug: bool):
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
        start = time.perf_counter()
        try:
            job = OmegaConf.to_object(cfg)
            record = COMMANDS[command](job)
        except Exception as e:  # one line for the user; --debug shows where
            if debug:
                raise
            print(f"tpcompile {command}: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        record.update(command=command, model=job.model.name, tp=job.tp, backend=job.backend.name, dtype=job.dtype,
                      seconds=round(time.perf_counter() - start, 3), **_provenance())
        out = Path(HydraConfig.get().runtime.output_dir) / f"{command}.json"
        out.write_text(json.dumps(record, indent=1, default=str))
        if record.get("ok") is False:
            sys.exit(1)
    return task


def _one_line(e: Exception) -> str:
    cause = e
    while cause.__cause__ is not None and not str(cause):  # config errors wrap the real one
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, ValueError) else f"{type(cause).__name__}: {text}"


def _provenance() -> dict:
    import subprocess

    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        commit = ""
    return {"torch": torch.__version__, "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ----------------------------------------------------------------------------------------------

def _prepare(job):
    """The model on the meta device, its captured graph, inputs and the random-weight source."""
    import torch
    from hydra.utils import instantiate

    from tpcompile.capture import capture, dtype_of, example_inputs
    from tpcompile.weights import random_source
    dtype = dtype_of(job.dtype)
    with torch.device("meta"):
        model = instantiate(job.model.graph, _convert_="all").to(dtype)
    specs = [dict(name=s.name, shape=list(s.shape), dtype=s.dtype, high=s.high) for s in job.model.inputs]
    meta_args = example_inputs(specs, device="meta")
    gm = capture(model, meta_args)
    return model, gm, specs, meta_args, random_source(model, job.model.seed), dtype


def _build(job):
    from tpcompile.build import GraphSpec, build
    from tpcompile.plan import load_rules
    model, gm, specs, meta_args, source, dtype = _prepare(job)
    rules = load_rules([{"match": r.match, "style": r.style} for r in job.plan.rules])
    path = build({"forward": GraphSpec(gm, meta_args, specs)}, rules=rules, tp=job.tp, backend=job.backend.name,
                 source=source, dtype=dtype, device=job.runtime.device, out_root=Path(job.out_dir),
                 key_parts={"model": job.model.graph, "seed": job.model.seed})
    return path, model, specs, source, dtype


def cmd_compile(job) -> dict:
    path, *_ = _build(job)
    print(f"artifact: {path}")
    print((path / "report.txt").read_text().split("\npasses:")[0].splitlines()[-1])
    return {"artifact": str(path)}


def _run_on_workers(job, path, args):
    from tpcompile.api import Artifact
    artifact = Artifact(path)
    with artifact.session(start_timeout_s=job.runtime.start_timeout_s,
                          call_timeout_s=job.runtime.call_timeout_s) as session:
        return session(*args)


def cmd_run(job) -> dict:
    from tpcompile.capture import example_inputs
    from tpcompile.compare import flat
    path, model, specs, *_ = _build(job)
    args = example_inputs(specs, device="cpu", seed=job.input_seed)
    t0 = time.perf_counter()
    outputs = flat(_run_on_workers(job, path, args))
    seconds = time.perf_counter() - t0
    for i, o in enumerate(outputs):
        print(f"output {i}: shape {list(o.shape)} {str(o.dtype).removeprefix('torch.')}, "
              f"mean {o.float().mean().item():.6f}, std {o.float().std().item():.6f}")
    print(f"ran on {job.tp} worker(s) in {seconds:.2f} s (start, load, one call, stop)")
    return {"artifact": str(path), "outputs": [list(o.shape) for o in outputs], "run_seconds": seconds}


def cmd_verify(job) -> dict:
    import torch

    from tpcompile.capture import example_inputs
    from tpcompile.compare import compare
    from tpcompile.weights import materialize
    path, model, specs, source, dtype = _build(job)
    args = example_inputs(specs, device="cpu", seed=job.input_seed)
    out = _run_on_workers(job, path, args)
    reference = materialize(model, source, dtype)
    with torch.no_grad():
        ref = reference(*args)
    report = compare(out, ref, job.dtype, job.tolerance)
    print(f"artifact: {path}")
    print(f"{job.model.name} tp={job.tp} backend={job.backend.name} {job.dtype}: {report.line()}")
    return {"artifact": str(path), **report.as_dict()}


def cmd_inspect(job) -> dict:
    import torch

    from tpcompile.build import preflight
    from tpcompile.plan import load_rules
    t0 = time.perf_counter()
    model, gm, specs, *_ , dtype = _prepare(job)
    capture_s = time.perf_counter() - t0
    rules = load_rules([{"match": r.match, "style": r.style} for r in job.plan.rules])
    pre = preflight(gm, rules, job.tp, torch.finfo(dtype).bits // 8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(pre.report())
    print(f"\ncapture {capture_s:.2f} s, plan + passes {pre.seconds:.2f} s, peak RSS {peak / 2**20:.0f} MiB "
          f"(no weights allocated)")
    counts = {k: len(v) if isinstance(v, list) else v for k, v in pre.partition.changes.items()}
    return {"capture_seconds": capture_s, "pass_seconds": pre.seconds, "peak_rss_bytes": peak, "changes": counts}


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "verify": cmd_verify, "inspect": cmd_inspect}

if __name__ == "__main__":
    main()
