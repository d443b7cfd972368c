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


def build(gm: GraphModule, example_args: tuple, *, rules: list[Rule], tp: int, backend: str, source: Source,
          dtype: torch.dtype, device: str, input_specs: list[dict], out_root: Path, key_parts: dict,
          trace_device: str = "meta", log=print) -> Path:
    lower, _ = get_backend(backend)
    key = cache_key({**key_parts, "graph": gm.code, "rules": [[r.match, r.style] for r in rules], "tp": tp,
                     "backend": backend, "dtype": str(dtype), "device": device, "inputs": input_specs})
    final = Path(out_root) / key
    if (final / MANIFEST).is_file():
        log(f"artifact {final} exists: reusing it")
        return final
    pre = preflight(gm, rules, tp, torch.finfo(dtype).bits // 8)
    plan = pre.partition.plan
    dtypes = {fqn: dtype if source(fqn).is_floating_point() else source(fqn).dtype for fqn in plan.shapes}
    program = rank_program(pre.partition.gm, {f: plan.local_shape(f) for f in plan.shapes}, dtypes, example_args,
                           trace_device)
    staging = staging_dir(Path(out_root), key)
    try:
        engine_files = lower(program, staging)
        _write_rank_weights(staging, plan, source, dtypes, tp)
        (staging / "report.txt").write_text(pre.report() + "\n")
        params = {f: {"style": plan.styles[f], "placement": str(plan.placements[f]),
                      "global": list(plan.shapes[f]), "local": list(plan.local_shape(f))} for f in plan.shapes}
        manifest = Manifest(key=key, tp=tp, backend=backend, dtype=str(dtype).removeprefix("torch."), device=device,
                            pg_name=GROUP_NAME, graph_hash=cache_key({"code": program.graph_module.code}),
                            plan_hash=plan.digest(), inputs=input_specs, params=params,
                            engine_files=engine_files, changes=_jsonable(pre.partition.changes))
        return publish(staging, manifest, final)
    except BaseException:
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_rank_weights(out: Path, plan, source: Source, dtypes: dict, tp: int) -> None:
    """Each global tensor is made (or read) once and cut for every rank; rank r's file holds only its parts."""
    per_rank = [{} for _ in range(tp)]
    for fqn in plan.shapes:
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
