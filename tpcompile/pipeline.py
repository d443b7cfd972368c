"""The one pipeline entry point: a JobConfig in, an artifact out. The CLI and the Python API both call it.

    load_model(job)         the model on the meta device and where its weights come from (preset or checkpoint)
    build_artifact(job)     capture the forward graph -> plan -> passes -> lower -> outputs/engines/<key>/
    build_generation(job)   the same for the prefill + decode graphs that share weights and a KV cache
    inspect(job)            capture, plan and passes only: no weights, no engine

Each step calls the stage below it (capture.py, build.py: plan -> passes -> lower -> package); nothing here
formats output for a person or knows about Hydra.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tpcompile.build import GraphSpec, Preflight, build, preflight
from tpcompile.capture import capture, dtype_of
from tpcompile.plan import Rule, load_rules
from tpcompile.progress import progress
from tpcompile.weights import Source, random_source


@dataclass
class Model:
    """A model ready to capture: built on the meta device, with the source of its global weights."""
    module: nn.Module
    source: Source
    dtype: torch.dtype
    key_parts: dict                                   # what identifies its weights in the artifact's cache key
    extra_files: dict = field(default_factory=dict)   # files that travel with the artifact (config, tokenizer)
    checkpoint: object = None                         # the Pretrained checkpoint, when it came from one


@dataclass
class Built:
    """An artifact and what produced it: verify compares against `model` with the same weights."""
    path: Path
    model: Model
    input_specs: list[dict]


def rules_of(job) -> list[Rule]:
    return load_rules([{"match": r.match, "style": r.style, "parts": r.parts} for r in job.plan.rules])


def load_model(job, seq_len: int) -> Model:
    """The job's model on the meta device: a preset (graphs/, random weights from model.seed) or a checkpoint
    directory (model.path), checked against its file headers before any work. seq_len: the longest input."""
    dtype = dtype_of(job.dtype)
    if job.model.path:
        from tpcompile.checkpoint import Pretrained
        ckpt = Pretrained(job.model.path)
        module = ckpt.model(dtype)
        ckpt.check(module, seq_len=seq_len)
        return Model(module, ckpt.source, dtype, {"checkpoint": ckpt.fingerprint()}, ckpt.artifact_files(), ckpt)
    from hydra.utils import instantiate
    with torch.device("meta"):
        module = instantiate(job.model.graph, _convert_="all").to(dtype)
    return Model(module, random_source(module, job.model.seed), dtype,
                 {"model": job.model.graph, "seed": job.model.seed})


def input_specs(job, model: Model) -> list[dict]:
    """The forward graph's inputs: the config's, token ids drawn below a checkpoint's vocabulary."""
    specs = [dict(name=s.name, shape=list(s.shape), dtype=s.dtype, high=s.high) for s in job.model.inputs]
    if model.checkpoint is not None:
        for s in specs:
            s["high"] = s["high"] or model.checkpoint.vocab_size
    return specs


def forward_graph(job, model: Model, probe: bool = False) -> GraphSpec:
    """The forward graph on the meta device. probe: every block's output is an extra output (verify
    per_layer=true)."""
    from tpcompile.capture import example_inputs
    specs = input_specs(job, model)
    args = example_inputs(specs, device="meta")
    target = model.module
    if probe:
        from tpcompile.probe import Probe
        target = Probe(model.module)
    for _ in progress(range(1), "capture"):
        gm = capture(target, args)
    return GraphSpec(gm, args, specs)


def existing(job, graph: str) -> Built | None:
    """artifact=DIR: that artifact as it is (nothing captured or compiled); None when the job names none."""
    if not job.artifact:
        return None
    from tpcompile.artifact import read_manifest
    m = read_manifest(Path(job.artifact))
    if graph not in m.graphs:
        raise ValueError(f"artifact={job.artifact} has graphs {sorted(m.graphs)}, not {graph!r}; compile it with "
                         f"`tpcompile compile` (forward) or `tpcompile compile kv_cache=true` (prefill + decode)")
    return Built(Path(job.artifact), None, m.graphs[graph]["inputs"])


def build_artifact(job, probe: bool = False, log=print) -> Built:
    """The forward artifact of the job (reused when its key exists)."""
    if job.artifact and not probe:
        return existing(job, "forward")
    model = load_model(job, seq_len=max(s.shape[-1] for s in job.model.inputs))
    graph = forward_graph(job, model, probe)
    path = _build(job, model, {"forward": graph}, log=log)
    return Built(path, model, graph.input_specs)


def generation_graphs(job, model: Model) -> dict[str, GraphSpec]:
    """prefill (prefill_chunk tokens per row) and decode (one token per row), captured from the model's cached
    forward after setup_cache(max_batch, max_seq); both take (input_ids, positions) (runtime/generate.py)."""
    g = job.generation
    if not hasattr(model.module, "setup_cache"):
        raise ValueError(f"model {job.model.name} ({type(model.module).__name__}) has no setup_cache(max_batch, "
                         f"max_seq): it cannot decode with a KV cache; use a decoder such as model=llama_tiny")
    with torch.device("meta"):
        model.module.setup_cache(g.max_batch, g.max_seq, model.dtype)
    return _cached_graphs(model.module, g.max_batch, g.max_seq, g.prefill_chunk)


def _cached_graphs(module: nn.Module, B: int, max_seq: int, chunk: int, device: str = "meta") -> dict[str, GraphSpec]:
    """Both generation graphs of a module after its setup_cache; example inputs on `device` (cpu for a module
    that holds its weights)."""
    from tpcompile.runtime.generate import generation_inputs
    graphs = {}
    for name, T in progress((("prefill", chunk), ("decode", 1)), "capture"):
        specs, args = generation_inputs(B, T, max_seq, vocab=None)  # the vocabulary is read from the graph
        args = tuple(torch.zeros_like(a, device=device) for a in args)
        graphs[name] = GraphSpec(capture(module, args), args, specs)
    vocab = _output_size(graphs["decode"].gm)
    for graph in graphs.values():
        graph.input_specs[0]["high"] = vocab
    return graphs


def build_generation(job, log=print) -> Built:
    """An artifact with a KV cache: prefill and decode graphs sharing weights and cache (generate, bench)."""
    if job.artifact:
        return existing(job, "decode")
    g = job.generation
    model = load_model(job, seq_len=g.max_seq)
    graphs = generation_graphs(job, model)
    generation = {"max_batch": g.max_batch, "max_seq": g.max_seq, "prefill_chunk": g.prefill_chunk,
                  "vocab_size": graphs["decode"].input_specs[0]["high"]}
    path = _build(job, model, graphs, generation=generation, log=log)
    return Built(path, model, graphs["decode"].input_specs)


def inspect(job) -> tuple[Preflight, float]:
    """Capture, plan and passes only (no weights, no engine): the pre-flight report and the capture time."""
    t0 = time.perf_counter()
    model = load_model(job, seq_len=max(s.shape[-1] for s in job.model.inputs))
    graph = forward_graph(job, model)
    capture_s = time.perf_counter() - t0
    return (preflight(graph.gm, rules_of(job), job.tp, torch.finfo(model.dtype).bits // 8,
                      job.backend.passes(job.runtime.device)), capture_s)


def build_module(model: nn.Module, example_args: tuple, *, tp: int, rules: list[Rule], backend: str,
                 out_root: Path, device: str, key_parts: dict, generation: dict | None = None) -> Path:
    """An artifact from a module that holds its own weights (tpcompile.compile). generation {max_batch, max_seq,
    prefill_chunk}: a transformers causal LM's prefill + decode graphs (hf_model.CausalLM), not the forward."""
    from tpcompile.weights import module_source
    state = model.state_dict()
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    if generation is None:
        gm = capture(model, example_args)
        specs = [{"name": f"arg{i}", "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch."),
                  "high": None} for i, a in enumerate(example_args)]
        graphs = {"forward": GraphSpec(gm, example_args, specs)}
    else:
        from tpcompile.hf_model import CausalLM
        model = CausalLM(model)
        model.setup_cache(generation["max_batch"], generation["max_seq"], dtype)
        graphs = _cached_graphs(model, generation["max_batch"], generation["max_seq"], generation["prefill_chunk"],
                                device="cpu")
        generation = {**generation, "vocab_size": graphs["decode"].input_specs[0]["high"]}
    return build(graphs, rules=rules, tp=tp, backend=backend, source=module_source(model), dtype=dtype,
                 device=device, out_root=out_root, key_parts=key_parts, trace_device="cpu", generation=generation,
                 log=lambda *_: None)


def _build(job, model: Model, graphs: dict[str, GraphSpec], generation: dict | None = None, log=print) -> Path:
    return build(graphs, rules=rules_of(job), tp=job.tp, backend=job.backend.name, source=model.source,
                 dtype=model.dtype, device=job.runtime.device, out_root=Path(job.out_dir), generation=generation,
                 key_parts=model.key_parts, extra_files=model.extra_files or None,
                 passes=job.backend.passes(job.runtime.device), log=log)


def _output_size(gm) -> int:
    """The last dim of the graph's (first) output: the vocabulary of a decoder's logits."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.meta["val"].shape[-1]


def verify_outputs(built: Built, outputs, args: tuple, *, per_layer: bool = False, tolerance: float | None = None,
                   log=print):
    """The artifact's outputs against the unsharded model with the same weights, run here on `args`.
    per_layer: the artifact was built with probe=True; also compare every block's output."""
    from tpcompile.compare import compare
    from tpcompile.probe import Probe, compare_per_layer
    from tpcompile.weights import materialize
    m = built.model
    if m is None:
        raise ValueError(f"verify compares with the model the artifact was compiled from; drop artifact="
                         f"{built.path} and name the model (model=..., model.path=...)")
    reference = materialize(m.module, m.source, m.dtype)
    if per_layer:
        reference = Probe(reference)
    with torch.no_grad():
        ref = reference(*args)
    dtype = str(m.dtype).removeprefix("torch.")
    if per_layer:  # output 0 is the model's; then one per block
        return compare_per_layer(outputs, ref, [name for name, _ in reference.blocks], dtype, tolerance, log=log)
    return compare(outputs, ref, dtype, tolerance)
