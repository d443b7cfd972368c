"""The compile pipeline end to end: captured graph -> plan -> passes -> rank program -> engine + weights.

    build(...)   -> artifact directory (reused when the key exists)
    preflight(...) -> the same up to the passes, no weights and no engine (`tpcompile inspect`)
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.fx import GraphModule

from tpcompile.artifact import MANIFEST, Manifest, cache_key, publish, staging_dir
from tpcompile.capture import rank_program
from tpcompile.lower import backend as get_backend
from tpcompile.passes import Partition, partition
from tpcompile.placement import shard_tensor
from tpcompile.plan import Rule, make_plan, plan_table
from tpcompile.weights import Source

GROUP_NAME = "0"  # the default process group's name: dist.group.WORLD.group_name


@dataclass
class Preflight:
    partition: Partition
    table: str
    seconds: float

    def report(self) -> str:
        lines = [self.table, "", "passes:"]
        for name, what in self.partition.changes.items():
            count = len(what) if isinstance(what, list) else what
            lines.append(f"  {name}: {count}")
            if isinstance(what, list):
                lines.extend(f"    {item}" for item in what)
        return "\n".join(lines)


def preflight(gm: GraphModule, rules: list[Rule], tp: int, itemsize: int) -> Preflight:
    start = time.perf_counter()
    plan = make_plan(gm, rules, tp)
    part = partition(gm, plan, GROUP_NAME)
    return Preflight(part, plan_table(plan, itemsize), time.perf_counter() - start)


@dataclass
class GraphSpec:
    """One graph of an artifact: its captured module, example inputs and their specs."""
    gm: GraphModule
    example_args: tuple
    input_specs: list[dict]


def build(graphs: dict[str, GraphSpec], *, rules: list[Rule], tp: int, backend: str, source: Source,
          dtype: torch.dtype, device: str, out_root: Path, key_parts: dict, trace_device: str = "meta",
          generation: dict | None = None, log=print) -> Path:
    """Compile every graph with the same plan into one artifact: weights are written once, state buffers
    (KV caches) are recorded and made at load, so prefill and decode share both."""
    lower, _ = get_backend(backend)
    key = cache_key({**key_parts, "graphs": {n: [g.gm.code, g.input_specs] for n, g in graphs.items()},
                     "rules": [[r.match, r.style] for r in rules], "tp": tp, "backend": backend,
                     "dtype": str(dtype), "device": device, "generation": generation})
    final = Path(out_root) / key
    if (final / MANIFEST).is_file():
        log(f"artifact {final} exists: reusing it")
        return final
    itemsize = torch.finfo(dtype).bits // 8
    pres = {name: preflight(g.gm, rules, tp, itemsize) for name, g in graphs.items()}
    plan = next(iter(pres.values())).partition.plan
    for name, pre in pres.items():
        if pre.partition.plan.placements != plan.placements:
            raise ValueError(f"graph {name!r} places its parameters differently from the others; "
                             f"the graphs of one artifact must share their weights")
    state = [f for f, s in plan.styles.items() if s == "state"]
    weights = [f for f in plan.shapes if f not in state]
    dtypes = {f: dtype if source(f).is_floating_point() else source(f).dtype for f in weights}
    dtypes.update({f: dtype for f in state})
    local_shapes = {f: plan.local_shape(f) for f in plan.shapes}
    staging = staging_dir(Path(out_root), key)
    try:
        entries, codes = {}, []
        for name, g in graphs.items():
            program = rank_program(pres[name].partition.gm, local_shapes, dtypes, g.example_args, trace_device)
            codes.append(program.graph_module.code)
            entries[name] = {"files": lower(program, staging, name), "inputs": g.input_specs}
        _write_rank_weights(staging, plan, weights, source, dtypes, tp)
        (staging / "report.txt").write_text("\n\n".join(f"== {n} ==\n{p.report()}" for n, p in pres.items()) + "\n")
        params = {f: {"style": plan.styles[f], "placement": str(plan.placements[f]),
                      "global": list(plan.shapes[f]), "local": list(local_shapes[f])} for f in plan.shapes}
        manifest = Manifest(key=key, tp=tp, backend=backend, dtype=str(dtype).removeprefix("torch."), device=device,
                            pg_name=GROUP_NAME, graph_hash=cache_key({"code": codes}), plan_hash=plan.digest(),
                            graphs=entries, params=params, generation=generation,
                            state={f: {"shape": list(local_shapes[f]), "dtype": str(dtype).removeprefix("torch.")}
                                   for f in state},
                            changes=_jsonable({n: p.partition.changes for n, p in pres.items()}))
        return publish(staging, manifest, final)
    except BaseException:
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_rank_weights(out: Path, plan, fqns: list[str], source: Source, dtypes: dict, tp: int) -> None:
    """Each global tensor is made (or read) once and cut for every rank; rank r's file holds only its parts."""
    per_rank = [{} for _ in range(tp)]
    for fqn in fqns:
        t = source(fqn).to(dtypes[fqn])
        for r in range(tp):
            per_rank[r][fqn] = shard_tensor(t, plan.placements[fqn], r, tp)
    for r in range(tp):
        save_file(per_rank[r], out / f"rank{r}.safetensors")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)
