"""`tpcompile <command> [hydra overrides]`: parse, dispatch to the pipeline (tpcompile/pipeline.py), print.

Hydra composes the config in this (parent) process only; workers get the artifact path, never a DictConfig.
Errors print one line on stderr and exit non-zero; `--debug` (or HYDRA_FULL_ERROR=1) shows the traceback.
"""
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

from tpcompile.serve import serve
from tpcompile.util import one_line, process_age, provenance

STARTED = time.perf_counter()  # this module's import: the command's start, before torch is imported


# ------------------------------------------------------------------------------------------ commands

def cmd_compile(job) -> dict:
    """capture, plan, passes, lower; write the artifact (outputs/engines/<key>); kv_cache=true: the prefill +
    decode artifact that generate, bench and serve use"""
    from tpcompile import pipeline
    built = pipeline.build_generation(job) if job.kv_cache else pipeline.build_artifact(job)
    print(f"artifact: {built.path}")
    print((built.path / "report.txt").read_text().split("\npasses:")[0].splitlines()[-1])
    return {"artifact": str(built.path)}


def cmd_run(job) -> dict:
    """compile (or reuse) and run once on tp workers"""
    from tpcompile import pipeline
    from tpcompile.capture import example_inputs
    from tpcompile.compare import flat
    built = pipeline.build_artifact(job)
    args = example_inputs(built.input_specs, device="cpu", seed=job.input_seed)
    t0 = time.perf_counter()
    with _session(job, built.path) as session:
        outputs = flat(session(*args))
    seconds = time.perf_counter() - t0
    for i, o in enumerate(outputs):
        print(f"output {i}: shape {list(o.shape)} {str(o.dtype).removeprefix('torch.')}, "
              f"mean {o.float().mean().item():.6f}, std {o.float().std().item():.6f}")
    print(f"ran on {job.tp} worker(s) in {seconds:.2f} s (start, load, one call, stop)")
    return {"artifact": str(built.path), "outputs": [list(o.shape) for o in outputs], "run_seconds": seconds}


def cmd_verify(job) -> dict:
    """compile, run on tp workers, compare with the unsharded model (verify.per_layer=true: every block)"""
    from tpcompile import pipeline
    from tpcompile.capture import example_inputs
    v = job.verify
    if job.artifact:
        raise ValueError(f"verify compiles from the model to compare with it; drop artifact={job.artifact} and name "
                         f"the model (model=..., model.path=...)")
    built = pipeline.build_artifact(job, probe=v.per_layer)
    args = example_inputs(built.input_specs, device="cpu", seed=job.input_seed)
    with _session(job, built.path) as session:
        out = session(*args)
    report = pipeline.verify_outputs(built, out, args, per_layer=v.per_layer, tolerance=v.tolerance)
    print(f"artifact: {built.path}")
    print(f"{job.model.name} tp={job.tp} backend={job.backend.name} {job.dtype}: {report.line()}")
    return {"artifact": str(built.path), **report.as_dict()}


def cmd_inspect(job) -> dict:
    """capture, plan and passes only: the plan table and what each pass changed (no weights)"""
    from tpcompile import pipeline
    pre, capture_s = pipeline.inspect(job)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(pre.report())
    from hydra.core.hydra_config import HydraConfig
    if any(r.style == "auto" for r in pipeline.rules_of(job)) and HydraConfig.initialized():
        from tpcompile.plan import rules_yaml  # reusable: plan=<run dir>/plan.yaml
        (_run_dir() / "plan.yaml").write_text(rules_yaml(pre.partition.plan.rules, pre.partition.plan.notes))
    print(f"\ncapture {capture_s:.2f} s, plan + passes {pre.seconds:.2f} s, peak RSS {peak / 2**20:.0f} MiB "
          f"(no weights allocated)")
    counts = {k: len(v) if isinstance(v, list) else v for k, v in pre.partition.changes.items()}
    if job.inspect.render:  # a picture of one layer; the text plan above stands without it
        from tpcompile.render import render
        pic = render(pre.partition, job.inspect.render_layer, _run_dir())
        print(f"\n{pic.layer or 'whole graph'} (inspect.render_layer={job.inspect.render_layer}):\n{pic.text}\n"
              f"{pic.message}")
        counts["render"] = str(pic.svg_path or pic.dot_path)  # the picture's path, in inspect.json
    return {"capture_seconds": capture_s, "pass_seconds": pre.seconds, "peak_rss_bytes": peak, "changes": counts}


def cmd_generate(job) -> dict:
    """compile prefill + decode graphs with a sharded KV cache and stream generated text
    (generation.chat=true: through the tokenizer's chat template; generation.stop: stop strings)"""
    from tpcompile import pipeline
    from tpcompile.text import TextStream
    from tpcompile.tokenizer import eos_ids, prompt_ids, tokenizer_for
    g = job.generation
    built = pipeline.build_generation(job)
    tok = tokenizer_for(built.path)
    eos = eos_ids(built.path, g.eos_token_id)
    prompt = prompt_ids(tok, g.prompt, g.chat)
    text = TextStream(tok, list(g.stop), frozenset(eos))
    print(g.prompt, end="", flush=True)

    first = []

    def stream(step):
        if not first:
            first.extend([time.perf_counter() - STARTED, process_age()])
        print(text.add(step[0]), end="", flush=True)

    t0 = time.perf_counter()
    with _session(job, built.path) as s:
        started = time.perf_counter()
        tokens = s.generate([prompt], g.max_new_tokens, g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed,
                            eos_token_id=eos, on_tokens=stream)[0]
        seconds = time.perf_counter() - started
    print(text.finish())
    print(f"[{len(tokens)} tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tokens/s) on {job.tp} worker(s); "
          f"with start-up {time.perf_counter() - t0:.2f} s; first token after {first[0]:.2f} s from the command's "
          f"start{'' if first[1] is None else f' ({first[1]:.2f} s from the process start)'}; artifact {built.path}]")
    return {"artifact": str(built.path), "prompt_tokens": prompt, "tokens": tokens, "text": text.text,
            "generate_seconds": seconds, "first_token_seconds": first[0], "first_token_process_seconds": first[1]}


def cmd_bench(job) -> dict:
    """prefill / decode latency percentiles, tokens/s, memory, collective share; bench.json"""
    from tpcompile import pipeline
    from tpcompile.bench import summarize, table
    from tpcompile.lower import inductor_options
    b, g = job.bench, job.generation
    needed = b.prompt_len + max(b.new_tokens, b.profile_steps + 1) - 1  # slots a run fills (pads use the scratch)
    if needed > g.max_seq:
        raise ValueError(f"bench.prompt_len={b.prompt_len} + max(bench.new_tokens={b.new_tokens}, "
                         f"bench.profile_steps={b.profile_steps} + 1) - 1 = {needed} passes generation.max_seq="
                         f"{g.max_seq}; raise generation.max_seq or lower them")
    built = pipeline.build_generation(job)
    t0 = time.perf_counter()
    with _session(job, built.path) as s:
        ready = time.perf_counter() - t0
        replies = s.group.call("bench", {"prompt_len": b.prompt_len, "new_tokens": b.new_tokens,
                                         "batch": g.max_batch, "profile_steps": b.profile_steps})
    record = summarize(replies[0], batch=g.max_batch, prompt_len=b.prompt_len, new_tokens=b.new_tokens)
    record.update(start_seconds=ready, load_seconds_per_rank=[r["load_seconds"] for r in replies])
    record.update(artifact=str(built.path), model=job.model.name, tp=job.tp, backend=job.backend.name,
                  dtype=job.dtype, max_seq=g.max_seq, passes=sorted(job.backend.passes(job.runtime.device)),
                  inductor_options=inductor_options(job.backend.name, job.runtime.device),
                  pass_changes=_optional_pass_changes(built.path), **provenance())
    print(table(record))
    if b.results_dir:
        out = Path(b.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench_{job.model.name}_tp{job.tp}_{job.backend.name}_{job.dtype}_b{g.max_batch}_{record['date']}.json"
        (out / name.replace(":", "")).write_text(json.dumps(record, indent=1))
    return record


def _optional_pass_changes(path: Path) -> dict:
    """{graph: {optional pass: what it changed}} from an artifact's manifest (the launch settings one_row_linear
    tuned, say), for the passes that changed something."""
    from tpcompile.artifact import read_manifest
    from tpcompile.passes import OPTIONAL
    changes = read_manifest(Path(path)).changes
    return {graph: {p: c for p, c in passes.items() if p in OPTIONAL and c} for graph, passes in changes.items()}


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "verify": cmd_verify, "inspect": cmd_inspect,
            "generate": cmd_generate, "bench": cmd_bench, "serve": serve}
# commands that take paths, not a config (no Hydra): name -> (module:function, usage line)
PATH_COMMANDS = {
    "health": ("tpcompile.runtime.health:main", "ARTIFACT: check every file's sha256, start the workers, report each "
                                                "rank's state and memory"),
    "export-checkpoint": ("tpcompile.cli:export_checkpoint", "ARTIFACT OUT_DIR [max_shard_size=5GB]: merge the rank "
                                                             "shards of a checkpoint artifact into a Hugging Face one"),
    "report": ("tpcompile.report:main", "SWEEP_DIR [--no-plots]: one table and plots from the records of a sweep"),
}


# ------------------------------------------------------------------------------------------ glue

def usage() -> str:
    """Made from the command table and conf/, so it cannot go stale."""
    from tpcompile.config import CONF_DIR
    lines = ["usage: tpcompile <command> [overrides] [-m] [--debug] [--cfg job] [--info]", "", "commands:"]
    lines += [f"  {name:18} {' '.join(fn.__doc__.split())}" for name, fn in COMMANDS.items()]
    lines += [f"  {name:18} {text}" for name, (_, text) in PATH_COMMANDS.items()]
    lines += ["", "config groups (conf/):"]
    for group in ("model", "plan", "backend"):
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}={'|'.join(names)}")
    lines += ["", "keys: tp=2 dtype=float32|bfloat16 runtime.device=cpu|cuda model.path=DIR (model=hf) artifact=DIR (as it is)",
              "      generation.{prompt,chat,stop,max_new_tokens,temperature,top_k,top_p,seed,max_seq,max_batch,"
              "prefill_chunk}",
              "      verify.{tolerance,per_layer} inspect.{render,render_layer} server.{host,port,...} bench.* runtime.*",
              "      (tpcompile <command> --cfg job lists them all)",
              "sweep: tpcompile verify -m tp=1,2,4 backend=eager,inductor"]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command = argv.pop(0)
    if command in PATH_COMMANDS:
        import importlib
        module, _, function = PATH_COMMANDS[command][0].partition(":")
        sys.exit(getattr(importlib.import_module(module), function)(argv, debug))
    if command not in COMMANDS:
        print(f"tpcompile: unknown command {command!r}; use one of {sorted(COMMANDS) + sorted(PATH_COMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    _run_hydra(command, argv, debug)


def _run_hydra(command: str, argv: list[str], debug: bool) -> None:
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    import hydra

    from tpcompile.config import CONF_DIR, register
    register()
    sys.argv = [f"tpcompile {command}"] + argv
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its own errors (bad override, unknown option) to us
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task(command, debug))()
    except Exception as e:
        if debug:
            raise
        print(f"tpcompile {command}: error: {hydra_one_line(e, argv)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def hydra_one_line(e: Exception, argv: list[str] = ()) -> str:
    """Hydra's multi-line composition errors as one line: what was wrong, then the choices or the fix."""
    from tpcompile.config import MOVED
    lines: list[str] = []
    for text in (str(e), str(e.__cause__ or "")):
        for line in text.splitlines():
            line = line.strip()
            skip = line.startswith(("full_key:", "object_type=", "reference_type=", "provider=", "To append",
                                    "Config search path", "Set the environment variable"))
            if line and not skip and line not in lines:
                lines.append(line)
    text = " ".join(lines)
    # "In 'config': Could not find 'model/nope' Available options in 'model': a b c" -> model=nope ...
    m = re.match(r"In '[^']*': Could not find '([^/']+)/([^']+)' Available options in '[^']*': (.*)", text)
    if m:
        return f"{m[1]}={m[2]}: no such option; use one of {', '.join(m[3].split())}"
    m = re.search(r"Could not override '([\w.]+)'", text)
    if m and m[1] in MOVED:
        value = next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == m[1]), "...")
        return f"{m[1]}={value}: this key is now {MOVED[m[1]]}; write {MOVED[m[1]]}={value}"
    return text or one_line(e)


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
            print(f"tpcompile {command}: error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        record.update(command=command, model=job.model.name, tp=job.tp, backend=job.backend.name, dtype=job.dtype,
                      seconds=round(time.perf_counter() - start, 3), **provenance())
        out = Path(HydraConfig.get().runtime.output_dir) / f"{command}.json"
        out.write_text(json.dumps(record, indent=1, default=str))
        if record.get("ok") is False:
            sys.exit(1)
    return task


def _run_dir() -> Path:
    """This job's Hydra output dir (outputs/runs/<time>, or the sweep's job dir); "." outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")


def _session(job, path):
    """Workers for the artifact at path, with the job's runtime settings. Per-rank logs (rank{r}.log) go next to
    the job's record under Hydra; called from Python, to the launcher's temp dir (removed after a healthy run)."""
    from hydra.core.hydra_config import HydraConfig

    from tpcompile.api import Artifact
    r = job.runtime
    logs = str(_run_dir() / "workers") if HydraConfig.initialized() else None
    return Artifact(path).session(start_timeout_s=r.start_timeout_s, call_timeout_s=r.call_timeout_s,
                                  heartbeat_timeout_s=r.heartbeat_timeout_s, log_dir=logs,
                                  max_restarts=r.max_restarts, collectives=r.collectives)


def export_checkpoint(argv: list[str], debug: bool) -> int:
    """`tpcompile export-checkpoint ARTIFACT OUT_DIR [max_shard_size=5GB]`"""
    from tpcompile.checkpoint import export_checkpoint as export
    paths = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(paths) != 2 or set(options) - {"max_shard_size"}:
        print("usage: tpcompile export-checkpoint ARTIFACT OUT_DIR [max_shard_size=5GB]", file=sys.stderr)
        return 2
    try:
        files = export(paths[0], paths[1], options.get("max_shard_size", "5GB"))
    except Exception as e:
        if debug:
            raise
        print(f"tpcompile export-checkpoint: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {paths[1]}: {len(files)} safetensors file(s)")
    return 0


if __name__ == "__main__":
    main()
