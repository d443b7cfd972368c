"""The compile pipeline end to end: captured graph -> plan -> passes -> rank program -> engine + weights.

    build(...)   -> artifact directory (reused when the key exists)
    preflight(...) -> the same up to the passes, no weights and no engine (`tpcompile inspect`)
"""
import time
from concurrent.futures import ThreadPoolExecutor
from math import prod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule

from tpcompile.artifact import MANIFEST, Manifest, cache_key, publish, staging_dir
from tpcompile.autoplan import resolve_rules
from tpcompile.capture import rank_program
from tpcompile.lower import backend as get_backend, build_info, inductor_options
from tpcompile.passes import DEFAULT_PASSES, Partition, optional_passes, partition
from tpcompile.passes.fold_repeat_kv import fold_repeat_kv
from tpcompile.passes.fuse_linears import fuse_linears
from tpcompile.passes.one_row_linear import fuse_norm_residual, one_row_linear
from tpcompile.placement import shard_tensor
from tpcompile.plan import Rule, make_plan, plan_table, rules_yaml
from tpcompile.progress import progress
from tpcompile.safetensors_io import StreamWriter
from tpcompile.weights import Source

GROUP_NAME = "0"  # the default process group's name: dist.group.WORLD.group_name


@dataclass
class Preflight:
    partition: Partition
    table: str
    seconds: float
    itemsize: int = 4

    def report(self) -> str:
        plan = self.partition.plan
        lines = [self.table, "", "plan (a rule file plan= accepts):", rules_yaml(plan.rules)]
        unsharded = [f"{f} {'x'.join(map(str, s))}" for f, s in plan.shapes.items()
                     if plan.styles[f] == "replicate" and len(s) >= 2]
        if plan.notes or unsharded:
            lines += ["left replicated (could be sharded):"] + [f"  {x}" for x in plan.notes + unsharded]
        lines += ["", *self.collectives(), "", "passes:"]
        for name, what in self.partition.changes.items():
            count = len(what) if isinstance(what, list) else what
            lines.append(f"  {name}: {count}")
            if isinstance(what, list):
                lines.extend(f"    {item}" for item in what)
        return "\n".join(lines)

    def collectives(self) -> list[str]:
        """Every collective with the bytes it carries per token (the value's size / tokens in the input);
        a ring all-reduce sends 2 (tp-1)/tp of that per rank, an all-gather (tp-1)/tp."""
        part, tp = self.partition, self.partition.plan.tp
        nodes = {n.name: n for n in part.gm.graph.nodes}
        first = next((n for n in nodes.values() if n.op == "placeholder"), None)
        shape = tuple(first.meta["val"].shape) if first is not None and "val" in first.meta else (1,)
        tokens = max(1, prod(shape) if first is None or not first.meta["val"].is_floating_point()
                     else prod(shape[:-1]))
        groups, sent = {}, 0.0
        for kind, producer, _ in part.changes.get("insert_collectives", []):
            if kind == "reuse" or producer not in nodes:
                continue
            value = tuple(nodes[producer].meta["val"].shape)
            per_token = prod(value) * self.itemsize / tokens
            groups.setdefault((kind, value, per_token), []).append(producer)
            sent += per_token * (2 if kind == "all_reduce" else 1) * (tp - 1) / tp
        lines = [f"collectives per forward ({tokens} tokens):"]
        for (kind, value, per_token), producers in groups.items():
            lines.append(f"  {kind} x{len(producers)} of {'x'.join(map(str, value))}: {per_token:.0f} B/token each "
                         f"(after {', '.join(producers[:3])}{', ...' if len(producers) > 3 else ''})")
        lines.append(f"  sent per rank: {sent:.0f} B/token (ring algorithms)")
        return lines


def preflight(gm: GraphModule, rules: list[Rule], tp: int, itemsize: int,
              passes: frozenset = DEFAULT_PASSES) -> Preflight:
    """passes: the OPTIONAL passes to run (passes.optional_passes)."""
    start = time.perf_counter()
    # before the plan: auto plans and placements see attention as it will run
    folded = fold_repeat_kv(gm) if "fold_repeat_kv" in passes else []
    rules, notes, applied = resolve_rules(gm, rules, tp)
    plan = make_plan(gm, rules, tp, notes, applied)
    part = partition(gm, plan, GROUP_NAME, passes)
    part.changes = {"fold_repeat_kv": folded, **part.changes}
    return Preflight(part, plan_table(plan, itemsize), time.perf_counter() - start, itemsize)


@dataclass
class GraphSpec:
    """One graph of an artifact: its captured module, example inputs and their specs."""
    gm: GraphModule
    example_args: tuple
    input_specs: list[dict]


def looked_up_by_row(gms) -> list[str]:
    """Weights whose every use in every graph is an embedding lookup (bench counts the rows, not the table)."""
    uses: dict[str, set] = {}
    for gm in gms:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                uses.setdefault(node.target, set()).update(
                    u.target == torch.ops.aten.embedding.default and u.args[0] is node for u in node.users)
    return sorted(f for f, kinds in uses.items() if kinds == {True})


def build(graphs: dict[str, GraphSpec], *, rules: list[Rule], tp: int, backend: str, source: Source,
          dtype: torch.dtype, device: str, out_root: Path, key_parts: dict, trace_device: str = "meta",
          generation: dict | None = None, extra_files: dict | None = None, passes: frozenset | None = None,
          log=print) -> Path:
    """Compile every graph with the same plan into one artifact: weights are written once, state buffers
    (KV caches) are recorded and made at load, so prefill and decode share both. passes: the OPTIONAL passes to
    run (default: optional_passes(backend, device))."""
    passes = optional_passes(backend, device) if passes is None else passes
    key = cache_key({**key_parts, "graphs": {n: [g.gm.code, g.input_specs] for n, g in graphs.items()},
                     "rules": [[r.match, r.style] + ([list(r.parts)] if r.parts else []) for r in rules], "tp": tp,
                     "backend": backend, "dtype": str(dtype), "device": device, "generation": generation,
                     "passes": sorted(passes), "inductor_options": inductor_options(backend, device)})
    final = Path(out_root) / key
    if (final / MANIFEST).is_file():
        log(f"artifact {final} exists: reusing it")
        return final
    pres = {name: preflight(g.gm, rules, tp, torch.finfo(dtype).bits // 8, passes)
            for name, g in progress(graphs.items(), "passes", len(graphs))}
    layout = _layout(pres, dtype, "fuse_linears" in passes)
    if "one_row_linear" in passes:  # after fuse_linears: a fused weight is one product
        for pre in pres.values():
            pre.partition.changes["one_row_linear"] = one_row_linear(pre.partition.gm, device)
            if "fuse_norm_residual" in passes:
                pre.partition.changes["fuse_norm_residual"] = fuse_norm_residual(pre.partition.gm, device)
    staging = staging_dir(Path(out_root), key)
    try:
        programs = {name: rank_program(pres[name].partition.gm, layout.local_shapes, layout.dtypes, g.example_args,
                                       trace_device) for name, g in graphs.items()}
        entries = _lower_all(programs, backend, staging, device, graphs)
        write_rank_weights(staging, layout.plan, layout.weights, source, layout.dtypes, tp, layout.local_shapes,
                            layout.fused)
        for name, content in (extra_files or {}).items():  # e.g. config.json, tokenizer: hashed like the rest
            (staging / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
        (staging / "report.txt").write_text("\n\n".join(f"== {n} ==\n{p.report()}" for n, p in pres.items()) + "\n")
        codes = [program.graph_module.code for program in programs.values()]
        manifest = _manifest(key, layout, pres, entries, codes, tp=tp, backend=backend, dtype=dtype, device=device,
                             generation=generation)
        return publish(staging, manifest, final)
    except BaseException:
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class _Layout:
    """What every rank holds: the plan, the tensors written to the rank files (after fusing) and their dtypes,
    the state made at load (KV caches), local shapes, and the fused weights' parts."""
    plan: object
    weights: list
    state: list
    dtypes: dict
    local_shapes: dict
    fused: dict


def _layout(pres: dict[str, Preflight], dtype: torch.dtype, fuse: bool) -> _Layout:
    plan = next(iter(pres.values())).partition.plan
    for name, pre in pres.items():
        if pre.partition.plan.placements != plan.placements:
            raise ValueError(f"graph {name!r} places its parameters differently from the others; "
                             f"the graphs of one artifact must share their weights")
    state = [f for f, s in plan.styles.items() if s == "state"]
    weights = [f for f in plan.shapes if f not in state]
    held = next(iter(pres.values())).partition.gm  # dtypes from the (meta) module: no weight is read twice
    held = dict(held.named_parameters(remove_duplicate=False)) | dict(held.named_buffers(remove_duplicate=False))
    dtypes = {f: held[f].dtype for f in weights}  # as captured: parameters in the job's dtype, buffers as the model
    # keeps them (transformers keeps RoPE's inv_freq in float32 in a bfloat16 model)
    dtypes.update({f: dtype for f in state})
    local_shapes = {f: plan.local_shape(f) for f in plan.shapes}
    fused = {}
    if fuse:  # after partitioning: each rank concatenates its own pieces
        for pre in pres.values():
            fused = fuse_linears(pre.partition.gm, local_shapes)
            pre.partition.changes["fuse_linears"] = [f"{k} <- {v}" for k, v in fused.items()]
        for name, parts in fused.items():
            dtypes[name] = dtypes[parts[0]]
            weights = [f for f in weights if f not in set(parts)] + [name]
    return _Layout(plan, weights, state, dtypes, local_shapes, fused)


def _lower_all(programs: dict, backend: str, staging: Path, device: str, graphs: dict) -> dict:
    """Each rank program through the backend; a backend whose lower() waits on a compiler process lowers the
    graphs side by side (prefill and decode). Returns the manifest's graph entries."""
    spec = get_backend(backend)

    def lower_one(name: str) -> list[str]:
        return spec.lower(programs[name], staging, name, device=device)
    entries = {}
    with ThreadPoolExecutor(max_workers=len(programs)) as pool:
        lowered = (pool.map if spec.concurrent_lower else map)(lower_one, programs)
        for name, files in progress(zip(programs, lowered), f"engines ({backend})", len(programs)):
            entries[name] = {"files": files, "inputs": graphs[name].input_specs}
    return entries


def _manifest(key: str, layout: _Layout, pres: dict, entries: dict, codes: list, *, tp: int, backend: str,
              dtype: torch.dtype, device: str, generation: dict | None) -> Manifest:
    plan, local_shapes = layout.plan, layout.local_shapes
    params = {f: {"style": plan.styles[f], "placement": str(plan.placements[f]),
                  "global": list(plan.shapes[f]), "local": list(local_shapes[f])} for f in plan.shapes}
    for f in looked_up_by_row([p.partition.gm for p in pres.values()]):
        params[f]["read"] = "rows"  # an embedding table: a step reads one row per token, not the table
    name = str(dtype).removeprefix("torch.")
    return Manifest(key=key, tp=tp, backend=backend, dtype=name, device=device, pg_name=GROUP_NAME,
                    graph_hash=cache_key({"code": codes}), plan_hash=plan.digest(), graphs=entries, params=params,
                    generation=generation, fused=layout.fused,
                    state={f: {"shape": list(local_shapes[f]), "dtype": name} for f in layout.state},
                    changes=_jsonable({n: p.partition.changes for n, p in pres.items()}), **build_info(backend, device))


def write_rank_weights(out: Path, plan, fqns: list[str], source: Source, dtypes: dict, tp: int,
                        local_shapes: dict, fused: dict) -> None:
    """Each global tensor is made (or read) once, cut for every rank and appended to each rank's file:
    memory stays near one global tensor, whatever the model's size. A fused weight is the concatenation
    of its parts' local pieces (dim 0): each part is appended to every rank's file as it comes."""
    specs = {f: (local_shapes[f], dtypes[f]) for f in fqns}
    writers = [StreamWriter(out / f"rank{r}.safetensors", specs, {"format": "pt"}) for r in range(tp)]
    try:
        for fqn in progress(fqns, f"weights -> {tp} rank file(s)", len(fqns), unit="tensor"):
            if fqn in fused:
                for part in fused[fqn]:
                    t = source(part).to(dtypes[fqn])
                    for r, w in enumerate(writers):
                        w.write(fqn, shard_tensor(t, plan.placements[part], r, tp))
                    del t
                continue
            t = (plan.extra[fqn] if fqn in plan.extra else source(fqn)).to(dtypes[fqn])
            if tuple(t.shape) != tuple(plan.shapes[fqn]):
                raise ValueError(f"weight {fqn}: the source gave {list(t.shape)}, the graph needs "
                                 f"{list(plan.shapes[fqn])}")
            for r, w in enumerate(writers):
                w.write(fqn, shard_tensor(t, plan.placements[fqn], r, tp))
            del t
        for w in writers:
            w.close()
    finally:
        for w in writers:
            w.file.close()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)
