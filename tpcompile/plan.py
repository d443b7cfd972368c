"""Plans: a rule table of glob patterns over parameter names -> style, turned into one placement per parameter.

A style says what a parameter does, not which dim to cut; the dim follows from the op that consumes it:

    op (param position)        colwise        rowwise
    linear weight (out, in)    Shard(0)       Shard(1)      # rowwise output is a partial sum -> all-reduce
    linear bias (out,)         Shard(0)       Replicate     # added once, after the reduction
    embedding weight (V, C)    Shard(1)       Shard(0)
    addmm weight (in, out)     Shard(1)       Shard(0)      # GPT-2's Conv1D; its bias as a linear's
    anything else              Shard(0)       Shard(-1)

style vocab cuts the vocabulary (dim 0) of an embedding or output head, tied or not: the lookup is masked and
all-reduced, the logits all-gathered. A rule's `parts` (sizes along the cut dim) cuts a fused weight part by part.
plan "auto" (the rule {match: "*", style: auto}) derives the rules from the graph (tpcompile/autoplan.py).
"""
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from tpcompile.placement import R, Placement, Shard, local_shape

aten = torch.ops.aten
STYLES = ("colwise", "rowwise", "replicate", "vocab", "auto")
CONF_PLAN_DIR = Path(__file__).resolve().parents[1] / "conf" / "plan"


class PlanError(ValueError):
    """A plan that does not fit the model; the message names the parameter, the sizes, tp and the fix."""


@dataclass(frozen=True)
class Rule:
    match: str  # glob over parameter fqns, e.g. "layers.*.attn.wq.weight"
    style: str  # colwise | rowwise | replicate | vocab | auto
    parts: tuple | None = None  # a fused weight's part sizes along the cut dim, e.g. (4096, 1024, 1024)


@dataclass
class ShardPlan:
    tp: int
    rules: list[Rule]
    styles: dict[str, str]            # fqn -> style (unmatched parameters: replicate; written buffers: state)
    placements: dict[str, Placement]  # fqn -> placement of the global tensor
    shapes: dict[str, tuple]          # fqn -> global shape
    extra: dict = field(default_factory=dict)  # fqn -> global tensor made by a pass (not in the source)
    notes: list = field(default_factory=list)  # what plan "auto" left replicated, and why
    applied: dict = field(default_factory=dict)  # pass name -> what plan "auto" already changed in the graph

    def local_shape(self, fqn: str) -> tuple:
        return local_shape(self.shapes[fqn], self.placements[fqn])

    def digest(self) -> str:
        text = json.dumps([[r.match, r.style] + ([list(r.parts)] if r.parts else []) for r in self.rules])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_rules(plan) -> list[Rule]:
    """plan: a name from conf/plan, a path to a YAML rule file, a dict {pattern: style}, or a list of rules."""
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.suffix:
            path = CONF_PLAN_DIR / f"{plan}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONF_PLAN_DIR.glob("*.yaml"))
            raise PlanError(f"plan {str(plan)!r}: no such plan; use one of {known} or a path to a YAML rule file")
        from omegaconf import OmegaConf
        plan = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("rules", [])
    if isinstance(plan, dict):
        plan = plan.get("rules", [{"match": k, "style": v} for k, v in plan.items()])
    rules = []
    for item in plan:
        if not isinstance(item, Rule):
            item = dict(item)
            item["parts"] = tuple(item["parts"]) if item.get("parts") else None
        rule = item if isinstance(item, Rule) else Rule(**item)
        if rule.style not in STYLES:
            raise PlanError(f"plan rule {rule.match!r}: unknown style {rule.style!r}; use one of {list(STYLES)}")
        rules.append(rule)
    return rules


def param_nodes(gm: GraphModule) -> dict[str, Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)}


def make_plan(gm: GraphModule, rules: list[Rule], tp: int, notes=(), applied=None) -> ShardPlan:
    """Match every rule against the graph's parameters and check every cut before any work.
    Plan "auto" is resolved by the caller first (tpcompile.autoplan.resolve_rules gives rules, notes, applied)."""
    if tp < 1:
        raise PlanError(f"tp={tp}: the tensor-parallel degree must be >= 1")
    if any(r.style == "auto" for r in rules):
        raise PlanError("plan rule style auto reached make_plan unresolved; derive the rules first with "
                        "tpcompile.autoplan.resolve_rules(gm, rules, tp)")
    params = param_nodes(gm)
    styles, owner = {}, {}
    for rule in rules:
        hits = [fqn for fqn in params if fnmatch.fnmatchcase(fqn, rule.match)]
        if not hits:
            examples = ", ".join(list(params)[:4])
            raise PlanError(f"plan rule {rule.match!r} -> {rule.style} matches no parameter "
                            f"(parameters look like: {examples}); fix the pattern or remove the rule")
        for fqn in hits:
            if fqn in owner:
                raise PlanError(f"parameter {fqn} is matched by two rules, {owner[fqn].match!r} -> {owner[fqn].style} "
                                f"and {rule.match!r} -> {rule.style}; make the patterns disjoint")
            owner[fqn], styles[fqn] = rule, rule.style
    placements, shapes = {}, {}
    for fqn in state_buffers(gm):
        if fqn in styles:
            raise PlanError(f"buffer {fqn} is written by the model (state such as a KV cache) and is placed by what "
                            f"is written into it; remove rule {owner[fqn].match!r} for it")
        styles[fqn] = "state"
    for fqn, node in params.items():
        shape = tuple(node.meta["val"].shape)
        style = styles.setdefault(fqn, "replicate")
        parts = owner[fqn].parts if fqn in owner else None
        pl = placement_for(node, style, tp, parts)
        if isinstance(pl, Shard) and pl.parts:
            if sum(pl.parts) != shape[pl.dim] or any(p % tp for p in pl.parts):
                raise PlanError(f"parameter {fqn} {list(shape)} is {style} with parts {list(pl.parts)}: the parts must "
                                f"add up to {shape[pl.dim]} and each be divisible by tp={tp}")
        elif isinstance(pl, Shard) and shape[pl.dim] % tp and style != "vocab":  # vocab: padded
            raise PlanError(f"parameter {fqn} {list(shape)} is {style}: dim {pl.dim} of size {shape[pl.dim]} is not "
                            f"divisible by tp={tp}; choose a tp that divides {shape[pl.dim]} or make it replicate")
        placements[fqn], shapes[fqn] = pl, shape
    return ShardPlan(tp, rules, styles, placements, shapes, notes=list(notes), applied=dict(applied or {}))


def state_buffers(gm: GraphModule) -> list[str]:
    """Tensors the graph writes in place (arg 0 of an op whose schema marks it written): model state."""
    found = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not node.args:
            continue
        first = schema.arguments[0] if schema.arguments else None
        target = node.args[0]
        if first is not None and first.alias_info is not None and first.alias_info.is_write \
                and isinstance(target, Node) and target.op == "get_attr" and target.target not in found:
            found.append(target.target)
    return found


def placement_for(node: Node, style: str, tp: int, parts=None) -> Placement:
    if style in ("replicate", "state") or tp == 1:
        return R
    ndim, parts = node.meta["val"].dim(), tuple(parts or ())
    col = style == "colwise"
    if style == "vocab":
        return Shard(0, tp)  # embedding (V, C), head weight (V, C) and bias (V,)
    for user in node.users:
        position = user.args.index(node) if node in user.args else None
        if user.target == aten.linear.default and position == 1:
            return Shard(0, tp, parts) if col else Shard(1, tp)
        if user.target == aten.linear.default and position == 2:
            return Shard(0, tp, parts) if col else R
        if user.target == aten.addmm.default and position == 2:  # W (in, out)
            return Shard(1, tp, parts) if col else Shard(0, tp)
        if user.target == aten.addmm.default and position == 0:
            return Shard(0, tp, parts) if col else R
        if user.target == aten.mm.default and position == 1:  # a rowwise addmm after split_rowwise_bias
            return Shard(1, tp, parts) if col else Shard(0, tp)
        if user.target == aten.embedding.default and position == 0:
            return Shard(1 if col else 0, tp)
    return Shard(0, tp, parts) if col else Shard(ndim - 1, tp)


def with_fewer_ways(plan: ShardPlan, fqns: set[str], ways: int, part: int | None = None) -> None:
    """Cut these parameters into `ways` pieces shared by tp // ways ranks each (kv-head replication);
    of a fused parameter (Shard.parts), only part `part`."""
    for fqn in fqns:
        pl = plan.placements[fqn]
        if isinstance(pl, Shard) and pl.parts:
            if part is None or plan.tp % ways:
                raise PlanError(f"parameter {fqn}: fused parts {list(pl.parts)} with {ways} heads cannot be spread "
                                f"over tp={plan.tp} ranks; choose a tp that divides the head counts")
            per_part = list(pl.ways_of_parts())
            per_part[part] = min(per_part[part], ways)
            plan.placements[fqn] = Shard(pl.dim, pl.ways, pl.parts, tuple(per_part))
        elif isinstance(pl, Shard) and pl.ways > ways:
            if plan.tp % ways:
                raise PlanError(f"parameter {fqn}: its {ways} heads cannot be spread over tp={plan.tp} ranks "
                                f"(tp must divide or be a multiple of {ways}); choose tp in "
                                f"{[d for d in range(1, 2 * ways + 1) if d % ways == 0 or ways % d == 0]}")
            plan.placements[fqn] = Shard(pl.dim, ways)


def rules_yaml(rules: list[Rule], notes=()) -> str:
    """The rules as a YAML rule file (conf/plan/*.yaml), notes as comments."""
    lines = ["rules:"]
    for r in rules:
        parts = f", parts: {list(r.parts)}" if r.parts else ""
        lines.append(f'  - {{match: "{r.match}", style: {r.style}{parts}}}')
    return "\n".join(lines + [f"# {n}" for n in notes]) + "\n"


def plan_table(plan: ShardPlan, itemsize: int) -> str:
    """The pre-flight table: every parameter, its style, placement, global and local shape; per-rank bytes."""
    rows = [("parameter", "style", "placement", "global", "local")]
    total = local = 0
    for fqn, shape in plan.shapes.items():
        lshape = plan.local_shape(fqn)
        rows.append((fqn, plan.styles[fqn], str(plan.placements[fqn]), "x".join(map(str, shape)) or "()",
                     "x".join(map(str, lshape)) or "()"))
        total += _numel(shape) * itemsize
        local += _numel(lshape) * itemsize
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"parameter bytes: total {total / 2**20:.2f} MiB, per rank {local / 2**20:.2f} MiB "
                 f"({local / total:.1%} of total at tp={plan.tp})" if total else "no parameters")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
