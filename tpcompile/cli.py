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
  export-checkpoint ARTIFACT OUT_DIR [max_shard_size=5GB]: merge the rank shards of an artifact compiled
            from a checkpoint (model=hf model.path=DIR) back into a Hugging Face checkpoint
  health    tpcompile health ARTIFACT: check every file's sha256, start the workers, report each rank's
            state and memory (RSS; CUDA memory on GPU)
  report    tpcompile report SWEEP_DIR [--no-plots]: one table (report.md, report.csv) and plots (PNG) from
            the bench.json / verify.json of every job of a sweep (tpcompile bench -m tp=1,2 ...)

overrides: model=llama_tiny|llama_1b|llama_8b|mlp plan=megatron|mlp|replicate backend=eager|inductor|aoti|onnx|tensorrt
           tp=2 dtype=float32 runtime.device=cpu|cuda   (tpcompile verify -m tp=1,2,4 sweeps)"""


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = argv.pop(0)
    if command == "health":  # takes a path, not a config: no Hydra
        from tpcompile.runtime.health import main as health_main
        sys.exit(health_main(argv, debug))
    if command == "export-checkpoint":  # takes paths, not a config: no Hydra
        sys.exit(_export_checkpoint(argv, debug))
    if command == "report":  # takes a sweep dir, not a config: no Hydra
        from tpcompile.report import main as report_main
        sys.exit(report_main(argv, debug))
    if command not in COMMANDS:
        print(f"tpcompile: unknown command {command!r}; use one of {sorted(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
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
        print(f"tpcompile {command}: error: {_hydra_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _hydra_one_line(e: Exception) -> str:
    """Hydra's multi-line composition errors as one line: what was wrong, then the choices or the reason."""
    import re
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
    return text or _one_line(e)


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


def _worker_logs() -> str | None:
    """Per-rank logs (rank{r}.log) next to the job's record, kept after the run; outside Hydra (the cmd_*
    functions called from Python) None: the launcher's temp dir, removed after a healthy run."""
    from hydra.core.hydra_config import HydraConfig
    return str(_run_dir() / "workers") if HydraConfig.initialized() else None


def _one_line(e: Exception) -> str:
    cause = e
    while cause.__cause__ is not None and not str(cause):  # config errors wrap the real one
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, ValueError) else f"{type(cause).__name__}: {text}"


def provenance() -> dict:
    """torch version, commit (TPC_COMMIT when set: a copied tree may carry a stale .git) and date of a record."""
    import subprocess

    import torch
    commit = os.environ.get("TPC_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=5, cwd=Path(__file__).parent).stdout.strip()
        except Exception:
            commit = ""
    return {"torch": torch.__version__, "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ----------------------------------------------------------------------------------------------

def _prepare(job, probe: bool = False):
    """The model on the meta device, its captured graph, inputs and the random-weight source. probe: capture
    the model with every block's output as an extra output (verify per_layer=true)."""
    import torch
    from hydra.utils import instantiate

    from tpcompile.capture import capture, dtype_of, example_inputs
    from tpcompile.progress import progress
    from tpcompile.weights import random_source
    dtype = dtype_of(job.dtype)
    with torch.device("meta"):
        model = instantiate(job.model.graph, _convert_="all").to(dtype)
    specs = [dict(name=s.name, shape=list(s.shape), dtype=s.dtype, high=s.high) for s in job.model.inputs]
    meta_args = example_inputs(specs, device="meta")
    for _ in progress(range(1), "capture"):
        if probe:
            from tpcompile.probe import Probe
            gm = capture(Probe(model), meta_args)
        else:
            gm = capture(model, meta_args)
    return model, gm, specs, meta_args, random_source(model, job.model.seed), dtype


def _build(job, probe: bool = False):
    from tpcompile.build import GraphSpec, build
    from tpcompile.plan import load_rules
    if job.model.path:  # model=hf: a checkpoint directory
        return _build_pretrained(job, probe)
    model, gm, specs, meta_args, source, dtype = _prepare(job, probe)
    rules = load_rules([{"match": r.match, "style": r.style, "parts": r.parts} for r in job.plan.rules])
    path = build({"forward": GraphSpec(gm, meta_args, specs)}, rules=rules, tp=job.tp, backend=job.backend.name,
                 source=source, dtype=dtype, device=job.runtime.device, out_root=Path(job.out_dir),
                 key_parts={"model": job.model.graph, "seed": job.model.seed})
    return path, model, specs, source, dtype


def _build_pretrained(job, probe: bool = False):
    from tpcompile.api import build_pretrained
    from tpcompile.capture import dtype_of
    from tpcompile.plan import load_rules
    dtype = dtype_of(job.dtype)
    rules = load_rules([{"match": r.match, "style": r.style, "parts": r.parts} for r in job.plan.rules])
    path, ckpt, model, specs = build_pretrained(job.model.path, tp=job.tp, rules=rules, backend=job.backend.name,
                                                dtype=dtype, input_shape=tuple(job.model.inputs[0].shape),
                                                out_root=Path(job.out_dir), device=job.runtime.device,
                                                probe=probe)
    return path, model, specs, ckpt.source, dtype


def _export_checkpoint(argv: list[str], debug: bool) -> int:
    from tpcompile.checkpoint import export_checkpoint
    paths = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(paths) != 2 or set(options) - {"max_shard_size"}:
        print("usage: tpcompile export-checkpoint ARTIFACT OUT_DIR [max_shard_size=5GB]", file=sys.stderr)
        return 2
    try:
        files = export_checkpoint(paths[0], paths[1], options.get("max_shard_size", "5GB"))
    except Exception as e:
        if debug:
            raise
        print(f"tpcompile export-checkpoint: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {paths[1]}: {len(files)} safetensors file(s)")
    return 0


def cmd_compile(job) -> dict:
    path = build_generation(job) if job.kv_cache else _build(job)[0]
    print(f"artifact: {path}")
    print((path / "report.txt").read_text().split("\npasses:")[0].splitlines()[-1])
    return {"artifact": str(path)}


def _session(job, path):
    """Workers for the artifact at path, with the job's runtime settings."""
    from tpcompile.api import Artifact
    r = job.runtime
    return Artifact(path).session(start_timeout_s=r.start_timeout_s, call_timeout_s=r.call_timeout_s,
                                  heartbeat_timeout_s=r.heartbeat_timeout_s, log_dir=_worker_logs(),
                                  max_restarts=r.max_restarts, collectives=r.collectives)


def _run_on_workers(job, path, args):
    with _session(job, path) as session:
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
    path, model, specs, source, dtype = _build(job, probe=job.per_layer)
    args = example_inputs(specs, device="cpu", seed=job.input_seed)
    out = _run_on_workers(job, path, args)
    reference = materialize(model, source, dtype)
    if job.per_layer:
        from tpcompile.probe import Probe, compare_per_layer
        reference = Probe(reference)
    with torch.no_grad():
        ref = reference(*args)
    if job.per_layer:  # output 0 is the model's; then one per block
        report = compare_per_layer(out, ref, [name for name, _ in reference.blocks], job.dtype, job.tolerance)
    else:
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
    rules = load_rules([{"match": r.match, "style": r.style, "parts": r.parts} for r in job.plan.rules])
    pre = preflight(gm, rules, job.tp, torch.finfo(dtype).bits // 8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(pre.report())
    from hydra.core.hydra_config import HydraConfig
    if any(r.style == "auto" for r in rules) and HydraConfig.initialized():  # reusable: plan=<run dir>/plan.yaml
        from tpcompile.plan import rules_yaml
        (_run_dir() / "plan.yaml").write_text(rules_yaml(pre.partition.plan.rules, pre.partition.plan.notes))
    print(f"\ncapture {capture_s:.2f} s, plan + passes {pre.seconds:.2f} s, peak RSS {peak / 2**20:.0f} MiB "
          f"(no weights allocated)")
    counts = {k: len(v) if isinstance(v, list) else v for k, v in pre.partition.changes.items()}
    if job.render:  # a picture of one layer; the text plan above stands without it
        from tpcompile.render import render
        pic = render(pre.partition, job.render_layer, _run_dir())
        print(f"\n{pic.layer or 'whole graph'} (render_layer={job.render_layer}):\n{pic.text}\n{pic.message}")
        counts["render"] = str(pic.svg_path or pic.dot_path)  # the picture's path, in inspect.json
    return {"capture_seconds": capture_s, "pass_seconds": pre.seconds, "peak_rss_bytes": peak, "changes": counts}


def build_generation(job):
    """An artifact with a KV cache: a prefill graph (prefill_chunk tokens at a time) and a decode graph
    (one token per row), both from the model's cached forward, sharing weights and cache."""
    import torch

    from tpcompile.build import GraphSpec, build
    from tpcompile.capture import capture, dtype_of
    from tpcompile.plan import load_rules
    from tpcompile.progress import progress
    from tpcompile.weights import random_source
    from hydra.utils import instantiate
    dtype = dtype_of(job.dtype)
    extra_files = None
    if job.model.path:  # model=hf: a checkpoint directory
        from tpcompile.checkpoint import Pretrained
        ckpt = Pretrained(job.model.path)
        model = ckpt.model(dtype)
        ckpt.check(model, seq_len=job.max_seq)
        source, key_parts, extra_files = ckpt.source, {"checkpoint": ckpt.fingerprint()}, ckpt.artifact_files()
    else:
        with torch.device("meta"):
            model = instantiate(job.model.graph, _convert_="all").to(dtype)
        source, key_parts = random_source(model, job.model.seed), {"model": job.model.graph, "seed": job.model.seed}
    if not hasattr(model, "setup_cache"):
        raise ValueError(f"model {job.model.name} ({type(model).__name__}) has no setup_cache(max_batch, max_seq): "
                         f"it cannot decode with a KV cache; use a decoder such as model=llama_tiny")
    with torch.device("meta"):
        model.setup_cache(job.max_batch, job.max_seq, dtype)
    B, C = job.max_batch, job.prefill_chunk
    graphs = {}
    for name, T in progress((("prefill", C), ("decode", 1)), "capture"):
        specs = [dict(name="input_ids", shape=[B, T], dtype="int64", high=None),
                 dict(name="input_pos", shape=[T], dtype="int64", high=job.max_seq),
                 dict(name="pad", shape=[B], dtype="int64", high=job.max_seq)]
        args = (torch.zeros(B, T, dtype=torch.long, device="meta"), torch.zeros(T, dtype=torch.long, device="meta"),
                torch.zeros(B, dtype=torch.long, device="meta"))
        graphs[name] = GraphSpec(capture(model, args), args, specs)
    out = next(n for n in graphs["decode"].gm.graph.nodes if n.op == "output")
    vocab = out.args[0][0].meta["val"].shape[-1] if isinstance(out.args[0], (tuple, list)) else out.args[0].meta["val"].shape[-1]
    for g in graphs.values():
        g.input_specs[0]["high"] = vocab
    rules = load_rules([{"match": r.match, "style": r.style, "parts": r.parts} for r in job.plan.rules])
    generation = {"max_batch": B, "max_seq": job.max_seq, "prefill_chunk": C, "vocab_size": vocab}
    path = build(graphs, rules=rules, tp=job.tp, backend=job.backend.name, source=source, dtype=dtype,
                 device=job.runtime.device, out_root=Path(job.out_dir), generation=generation, key_parts=key_parts,
                 extra_files=extra_files)
    return path


def _checkpoint_eos(path: Path):
    """The end token of a checkpoint's generation_config.json (the first, if it lists several)."""
    file = Path(path) / "generation_config.json"
    eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    return eos[0] if isinstance(eos, list) and eos else eos


def cmd_generate(job) -> dict:
    from tpcompile.tokenizer import tokenizer_for
    path = build_generation(job)
    tok = tokenizer_for(path)
    eos = job.eos_token_id if job.eos_token_id is not None else _checkpoint_eos(path)
    prompt = tok.encode(job.prompt)
    new: list[int] = []
    printed = 0
    print(job.prompt, end="", flush=True)

    def stream(step):
        nonlocal printed
        new.append(step[0])
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[printed:], end="", flush=True)
            printed = len(text)

    t0 = time.perf_counter()
    with _session(job, path) as s:
        started = time.perf_counter()
        tokens = s.generate([prompt], job.max_new_tokens, job.temperature, top_k=job.top_k, top_p=job.top_p,
                            seed=job.seed, eos_token_id=eos, on_tokens=stream)[0]
        seconds = time.perf_counter() - started
    print(tok.decode(new)[printed:])
    print(f"[{len(tokens)} tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tokens/s) on {job.tp} worker(s); "
          f"with start-up {time.perf_counter() - t0:.2f} s; artifact {path}]")
    return {"artifact": str(path), "prompt_tokens": prompt, "tokens": tokens, "text": tok.decode(tokens),
            "generate_seconds": seconds}


def cmd_bench(job) -> dict:
    from tpcompile.bench import summarize, table
    b = job.bench
    needed = -(-b.prompt_len // job.prefill_chunk) * job.prefill_chunk + b.new_tokens + b.profile_steps
    if needed > job.max_seq:
        raise ValueError(f"bench.prompt_len={b.prompt_len} (padded to prefill_chunk={job.prefill_chunk}) + "
                         f"bench.new_tokens={b.new_tokens} + bench.profile_steps={b.profile_steps} = {needed} "
                         f"passes max_seq={job.max_seq}; raise max_seq or lower them")
    path = build_generation(job)
    t0 = time.perf_counter()
    with _session(job, path) as s:
        ready = time.perf_counter() - t0
        replies = s.group.call("bench", {"prompt_len": b.prompt_len, "new_tokens": b.new_tokens,
                                         "batch": job.max_batch, "profile_steps": b.profile_steps})
    record = summarize(replies[0], batch=job.max_batch, prompt_len=b.prompt_len, new_tokens=b.new_tokens)
    record.update(start_seconds=ready, load_seconds_per_rank=[r["load_seconds"] for r in replies])
    record.update(artifact=str(path), model=job.model.name, tp=job.tp, backend=job.backend.name, dtype=job.dtype,
                  max_seq=job.max_seq, **provenance())
    print(table(record))
    if b.results_dir:
        out = Path(b.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench_{job.model.name}_tp{job.tp}_{job.backend.name}_{job.dtype}_b{job.max_batch}_{record['date']}.json"
        (out / name.replace(":", "")).write_text(json.dumps(record, indent=1))
    return record


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "verify": cmd_verify, "inspect": cmd_inspect,
            "generate": cmd_generate, "bench": cmd_bench}

if __name__ == "__main__":
    main()
