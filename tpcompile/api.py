"""The Python API, mirroring the CLI: compile / load / verify, Artifact.run / session."""
import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

from tpcompile.artifact import read_manifest
from tpcompile.plan import load_rules
from tpcompile.probe import Probe, compare_per_layer
from tpcompile.compare import VerifyReport, compare

DEFAULT_OUT = Path("outputs/engines")


class Artifact:
    """A compiled artifact directory: manifest.json, engine file(s), rank{r}.safetensors."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    @property
    def tp(self) -> int:
        return self.manifest.tp

    def __repr__(self) -> str:
        m = self.manifest
        return f"Artifact({str(self.path)!r}, tp={m.tp}, backend={m.backend!r}, dtype={m.dtype})"

    def session(self, *, start_timeout_s: float = 120.0, call_timeout_s: float = 600.0, log_dir=None,
                max_restarts: int = 0, heartbeat_timeout_s: float = 10.0, collectives: str = "auto",
                env: dict | None = None) -> "Session":
        """max_restarts: after a rank dies or hangs, start the whole group again (at most this many times in
        the session's life) and retry the request in flight once (runtime/restart.py). collectives: auto
        (gloo on cpu, nccl on cuda) or gloo, which lets ranks share a GPU (rank r on GPU r % count). env: extra
        environment for the workers (NCCL_* settings, say)."""
        return Session(self, start_timeout_s=start_timeout_s, call_timeout_s=call_timeout_s, log_dir=log_dir,
                       max_restarts=max_restarts, heartbeat_timeout_s=heartbeat_timeout_s, collectives=collectives,
                       env=env)

    def run(self, *args: torch.Tensor):
        """Start tp local workers, run once, stop them; rank 0's outputs as CPU tensors."""
        with self.session() as session:
            return session(*args)

    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 **options) -> list[list[int]]:
        """New tokens for each prompt (see Session.generate), on workers started for this call."""
        from tpcompile.runtime.generate import check_request
        if self.manifest.generation:  # a request that cannot fit is refused before any worker starts
            check_request(self.manifest.generation, [list(p) for p in prompt_token_ids], max_new_tokens)
        with self.session() as session:
            return session.generate(prompt_token_ids, max_new_tokens, temperature, **options)


    def generate_text(self, prompt: str, max_new_tokens: int, *, chat: bool = False, stop=(), **options) -> str:
        """The text after `prompt` (chat: the prompt as a user message through the tokenizer's chat template),
        through the artifact's tokenizer (a checkpoint's own; bytes for the random-weight presets), ending at the
        checkpoint's eos ids or before the first stop string. options: as for generate (temperature, top_k,
        top_p, seed, eos_token_id)."""
        from tpcompile.text import TextStream
        from tpcompile.tokenizer import eos_ids, prompt_ids, tokenizer_for
        tok = tokenizer_for(self.path)
        eos = eos_ids(self.path, options.pop("eos_token_id", None))
        text = TextStream(tok, list(stop), frozenset(eos))
        for token in self.generate([prompt_ids(tok, prompt, chat)], max_new_tokens, eos_token_id=eos, **options)[0]:
            text.add(token)
        text.finish()
        return text.text


class Session:
    """Workers kept alive between calls: `with artifact.session() as s: y = s(x)`."""

    def __init__(self, artifact: Artifact, **options):
        self.artifact, self.options, self.group = artifact, options, None

    def __enter__(self) -> "Session":
        from tpcompile.runtime.launcher import WorkerGroup
        from tpcompile.runtime.restart import RestartingGroup
        from tpcompile.lower import worker_env
        m = self.artifact.manifest
        options = dict(self.options)
        max_restarts = options.pop("max_restarts", 0)
        options["env"] = {**worker_env(m.backend, m.device), **(options.get("env") or {})}

        def make_group():
            return WorkerGroup(tp=m.tp, handler="tpcompile.runtime.engine:make",
                               handler_args={"artifact": str(self.artifact.path.resolve())},
                               device=m.device, **options)
        self.group = RestartingGroup(make_group, max_restarts=max_restarts)
        self.group.start()
        return self

    def health(self, timeout_s: float = 30.0) -> list[dict]:
        """Per rank: alive, status, pid, RSS, CUDA memory on GPU, the artifact it serves (launcher.health)."""
        return self.group.health(timeout_s=timeout_s)

    def __call__(self, *args: torch.Tensor):
        from tpcompile.runtime.engine import check_inputs
        bad = [f"{i}: {type(a).__name__}" for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        if bad:
            raise TypeError(f"inputs must be torch.Tensor, got {bad}; convert them with torch.as_tensor")
        forward = self.artifact.manifest.graphs.get("forward")
        if forward is not None:  # checked here too, so a bad input leaves the workers running
            check_inputs(forward["inputs"], args)
        replies = self.group.call("run", {"args": [a.detach().cpu().contiguous() for a in args]})
        outputs = replies[0]["outputs"]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None,
                 on_tokens=None, step_tokens: int = 1, return_logits: bool = False):
        """Generate up to max_new_tokens for each prompt; a row stops after eos_token_id (one id or several, as
        generation_config.json lists them: tokenizer.eos_ids). on_tokens(step) is
        called with each step's new token per row as they arrive. Returns the new tokens per prompt (and the
        logits of every step, (steps, rows, vocab), with return_logits=True)."""
        from tpcompile.runtime.generate import check_request, step_or_resume
        spec = self.artifact.manifest.generation
        if not spec:
            raise ValueError(f"{self.artifact.path}: compiled without a KV cache; compile it with "
                             f"compile_pretrained(DIR, tp=N) (generate=True) or `tpcompile compile kv_cache=true`")
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        stops = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        check_request(spec, prompts, max_new_tokens)  # refuse here: a failed request ends the worker group
        start = {"prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": float(temperature),
                 "top_k": int(top_k), "top_p": float(top_p), "seed": int(seed), "return_logits": return_logits}
        reply = self.group.call("generate_start", start)[0]
        out, logits = [[] for _ in prompts], []
        finished = [False] * len(prompts)
        bar = None
        if on_tokens is None and sys.stderr.isatty():  # a progress bar only for a person watching
            from tqdm import tqdm
            bar = tqdm(total=max_new_tokens, unit="tok", leave=False)
        while True:
            for step in reply["tokens"]:
                for row, token in enumerate(step):
                    if not finished[row]:
                        out[row].append(token)
                        finished[row] = token in stops
                if on_tokens:
                    on_tokens(step)
                if bar is not None:
                    bar.update(1)
            logits.extend(reply.get("logits", []))
            if reply["done"] or all(finished):
                break
            reply = step_or_resume(self.group, step_tokens, start, out, finished)  # resumes after a restart
        if bar is not None:
            bar.close()
        return (out, torch.stack(logits)) if return_logits else out

    def __exit__(self, *exc) -> None:
        if self.group is not None:
            self.group.close()


def load(path) -> Artifact:
    return Artifact(path)


def compile(model: nn.Module, example_args: tuple = (), *, tp: int, plan, backend: str = "eager",
            out_dir=None, device: str = "cpu", generate: bool = False, max_seq: int = 128, max_batch: int = 4,
            prefill_chunk: int = 16) -> Artifact:
    """Shard a model that holds its weights. plan: a name from conf/plan, a YAML path, or {pattern: style}.
    generate: a transformers causal LM compiled to prefill + decode graphs with a KV cache of max_batch rows of
    max_seq tokens (Artifact.generate; example_args are not needed); else the forward graph of example_args."""
    from tpcompile.pipeline import build_module
    example_args = tuple(example_args)
    state = model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):
        raise ValueError("the model has weights on the meta device; give it real weights, or compile a config "
                         "with `tpcompile compile model=...` (random weights from a seed)")
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    generation = dict(max_batch=max_batch, max_seq=max_seq, prefill_chunk=prefill_chunk) if generate else None
    path = build_module(model, example_args, tp=tp, rules=load_rules(plan), backend=backend,
                        out_root=Path(out_dir or DEFAULT_OUT), device=device, key_parts={"weights": digest.hexdigest()},
                        generation=generation)
    return Artifact(path)


def compile_pretrained(path, *, tp: int, plan="auto", backend: str = "eager", dtype: torch.dtype | None = None,
                       generate: bool = True, max_seq: int = 128, max_batch: int = 4, prefill_chunk: int = 16,
                       input_shape: tuple[int, int] = (1, 32), out_dir=None, device: str = "cpu") -> Artifact:
    """Compile a Hugging Face checkpoint directory (config.json + safetensors, one file or indexed) with
    transformers' own class for it: every tensor is checked against the file headers, then streamed once into
    per-rank files. generate: the prefill + decode graphs with a KV cache of max_batch rows of max_seq tokens
    (Artifact.generate); False: one forward graph of input_shape (batch, tokens) (Artifact.run). dtype: the
    checkpoint's when None."""
    from tpcompile.pipeline import build_artifact, build_generation
    job = pretrained_job(path, tp=tp, plan=plan, backend=backend, dtype=dtype, input_shape=input_shape,
                         out_dir=out_dir, device=device)
    if not generate:
        return Artifact(build_artifact(job, log=lambda *_: None).path)
    from tpcompile.config import GenerationConfig
    job.generation = GenerationConfig(max_seq=max_seq, max_batch=max_batch, prefill_chunk=prefill_chunk)
    return Artifact(build_generation(job, log=lambda *_: None).path)


def pretrained_job(path, *, tp: int, plan, backend: str, dtype: torch.dtype | None, input_shape, out_dir,
                   device: str):
    """The JobConfig the CLI would compose for `model=hf model.path=DIR`, from Python arguments."""
    from tpcompile.checkpoint import Pretrained
    from tpcompile.config import (BackendConfig, InputSpec, JobConfig, ModelConfig, PlanConfig, RuleConfig,
                                  RuntimeConfig)
    dtype = dtype or Pretrained(path).dtype
    rules = [RuleConfig(match=r.match, style=r.style, parts=list(r.parts) if r.parts else None)
             for r in load_rules(plan)]
    model = ModelConfig(name="hf", graph=None, path=str(path),
                        inputs=[InputSpec(name="input_ids", shape=list(input_shape), dtype="int64")])
    return JobConfig(model=model, plan=PlanConfig(name=str(plan), rules=rules), backend=BackendConfig(backend),
                     runtime=RuntimeConfig(device=device), tp=tp, dtype=str(dtype).removeprefix("torch."),
                     out_dir=str(out_dir or DEFAULT_OUT))


def verify(model: nn.Module, example_args: tuple, *, tp: int, plan, backend: str = "eager", out_dir=None,
           tolerance: float | None = None, per_layer: bool = False) -> VerifyReport:
    """Compile, run on tp workers, and compare with the model's own forward in this process. per_layer: also
    compare every block's output (children of the first nn.ModuleList): report.per_layer, .first_divergent."""
    target = Probe(model) if per_layer else model
    artifact = compile(target, example_args, tp=tp, plan=plan, backend=backend, out_dir=out_dir)
    with torch.no_grad():
        ref = target(*example_args)
    out = artifact.run(*example_args)
    if per_layer:
        return compare_per_layer(out, ref, [name for name, _ in target.blocks], artifact.manifest.dtype, tolerance,
                                 log=lambda *_: None)
    return compare(out, ref, artifact.manifest.dtype, tolerance)
