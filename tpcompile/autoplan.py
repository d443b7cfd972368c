"""autoplan: derive a plan from the graph, never from names (plan "auto").

A block is where an activation of the hidden size is projected up (one or several matmuls reading the same
stream), transformed per head or per feature, and projected back to the hidden size:

    x (.., C) -> up_1 .. up_k -> per head / per feature ops -> down -> (.., C)
    up_i colwise (weight and bias; a fused up cut part by part), down rowwise (its bias added after the sum)

A projection whose nearest projections upstream are all "down"s (or none) is an "up"; one whose nearest
upstream projections are all unclaimed "up"s and that returns to the hidden size is their "down". An "up" no
"down" claims and whose output size is a vocabulary (an embedding's row count, or the embedding's own weight)
is the output head: it and the embeddings of that vocabulary are cut by vocabulary.

Every candidate is checked by propagation: a block whose sharding makes any op fall back to a gather, or that
the graph cannot honour, stays replicated; the notes say which and why.
"""
import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from tpcompile.plan import PlanError, Rule, make_plan, param_nodes, rules_yaml

aten = torch.ops.aten
SAME_SIZE_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


@dataclass
class Proj:
    node: Node
    x: Node            # the activation it reads
    weight: str        # fqn
    bias: str | None
    d_in: int
    d_out: int


@dataclass
class AutoPlan:
    rules: list[Rule]
    notes: list[str] = field(default_factory=list)  # what stayed replicated and why
    split: list[str] = field(default_factory=list)  # rowwise biases split off while checking (split_rowwise_bias)

    def yaml(self) -> str:
        return "# derived by tpcompile plan=auto\nname: auto\n" + rules_yaml(self.rules, self.notes)

    def save(self, path) -> None:
        """A YAML rule file that plan= accepts."""
        from pathlib import Path
        Path(path).write_text(self.yaml())


def projections(gm: GraphModule) -> list[Proj]:
    """linear(x, W (out, in), b) and addmm(b, x, W (in, out)) with W a parameter, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.target == aten.linear.default and _param(n.args[1]):
            b = n.args[2] if len(n.args) > 2 and _param(n.args[2]) else None
            o, i = n.args[1].meta["val"].shape
            out.append(Proj(n, n.args[0], n.args[1].target, b and b.target, i, o))
        elif n.target == aten.addmm.default and _param(n.args[2]) and _param(n.args[0]):
            i, o = n.args[2].meta["val"].shape
            out.append(Proj(n, n.args[1], n.args[2].target, n.args[0].target, i, o))
    return out


def _param(a) -> bool:
    return isinstance(a, Node) and a.op == "get_attr"


def _nearest(x: Node, projs: set[Node]) -> set[Node]:
    """The projections reached walking upstream from x, not walking through them."""
    seen, stack, found = set(), [x], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in projs:
            found.add(n)
        else:
            stack.extend(n.all_input_nodes)
    return found


def _parts(p: Proj) -> tuple | None:
    """Part sizes of a fused projection, read from the split / chunk / slices that consume its last dim."""
    v, d_out = p.node, p.d_out
    while len(v.users) == 1 and next(iter(v.users)).target in SAME_SIZE_VIEWS \
            and tuple(next(iter(v.users)).meta["val"].shape)[-1] == d_out:
        v = next(iter(v.users))
    ndim = v.meta["val"].dim()
    users = list(v.users)
    if len(users) == 1 and users[0].target in SPLITS:
        u = users[0]
        dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
        sizes = tuple(t.shape[dim] for t in u.meta["val"])
        return sizes if dim % ndim == ndim - 1 and len(sizes) > 1 else None
    if users and all(u.target == aten.slice.Tensor and u.args[1] % ndim == ndim - 1 for u in users):
        spans = sorted((u.args[2] or 0, min(u.args[3], d_out)) for u in users)
        if spans[0][0] == 0 and spans[-1][1] == d_out and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
            return tuple(hi - lo for lo, hi in spans) if len(spans) > 1 else None
    return None


def _candidates(gm: GraphModule) -> tuple[list[list[Rule]], list[Rule], list[str]]:
    """-> (one rule list per block, vocab rules, notes)."""
    projs = projections(gm)
    if not projs:
        return [], [], ["no projections (linear / addmm with a parameter weight) in the graph"]
    sizes = [p.d_in for p in projs]
    hidden = max(set(sizes), key=sizes.count)  # the residual stream is what most projections read
    nodes = {p.node: p for p in projs}
    kind, claimed, blocks = {}, set(), []
    for p in projs:
        near = _nearest(p.x, set(nodes))
        ups = [n for n in near if kind[n] == "up" and n not in claimed]
        if near and len(ups) == len(near) and p.d_out == hidden and all(nodes[u].d_in == hidden for u in ups):
            kind[p.node] = "down"
            claimed.update(ups)
            blocks.append(([nodes[u] for u in sorted(ups, key=list(gm.graph.nodes).index)], p))
        else:
            kind[p.node] = "up"
    rules, notes = [], []
    for ups, down in blocks:
        block = []
        for u in ups:
            parts = _parts(u)
            block += [Rule(f, "colwise", parts) for f in (u.weight, u.bias) if f]
        block.append(Rule(down.weight, "rowwise"))
        rules.append(block)
    vocab = _vocab_rules(gm, [nodes[n] for n in nodes if kind[n] == "up" and n not in claimed], hidden)
    for n in nodes:
        if kind[n] == "up" and n not in claimed and not any(r.match == nodes[n].weight for r in vocab):
            notes.append(f"{nodes[n].weight}: a projection without a matching back-projection; replicated")
    return rules, vocab, notes


def _vocab_rules(gm: GraphModule, heads: list[Proj], hidden: int) -> list[Rule]:
    """The output head (an unclaimed up whose output size is an embedding's vocabulary) and those embeddings."""
    embeddings = {}
    for n in gm.graph.nodes:
        if n.target == aten.embedding.default and _param(n.args[0]):
            embeddings.setdefault(n.args[0].target, tuple(n.args[0].meta["val"].shape))
    vocabs = {shape[0] for shape in embeddings.values() if shape[1] == hidden}
    rules = []
    for p in heads:
        if p.node.target == aten.linear.default and p.d_in == hidden and (p.d_out in vocabs or p.weight in embeddings):
            rules += [Rule(f, "vocab") for f in (p.weight, p.bias) if f]
            rules += [Rule(f, "vocab") for f, s in embeddings.items() if s == (p.d_out, hidden) and f != p.weight]
    return list(dict.fromkeys(rules))


def _problem(gm: GraphModule, rules: list[Rule], tp: int, split: list) -> str | None:
    """None when the plan propagates with no gather fallback; else why not."""
    from tpcompile.passes import ShardingError, settle
    from tpcompile.passes.split_rowwise_bias import split_rowwise_bias
    try:
        plan = make_plan(gm, rules, tp)
        split += split_rowwise_bias(gm, {f for f, s in plan.styles.items() if s == "rowwise"})  # as partition would
        prop, _, _ = settle(gm, plan)
    except (ShardingError, PlanError) as e:
        return str(e).splitlines()[0]
    if prop.fallbacks:
        return "gathers before " + ", ".join(n.name for n in prop.fallbacks[:3])
    return None


def derive_plan(gm: GraphModule, tp: int) -> AutoPlan:
    """Propose every block and the vocabulary cut; keep what propagates cleanly."""
    blocks, vocab, notes = _candidates(gm)
    candidates = blocks + ([vocab] if vocab else [])
    everything = [r for c in candidates for r in c]
    split = []
    if _problem(gm, everything, tp, split) is None:
        kept = everything
    else:  # one at a time, so one bad block does not cost the others
        kept = []
        for c in candidates:
            why = _problem(gm, kept + c, tp, split)
            if why is None:
                kept += c
            else:
                notes.append(f"left replicated: {', '.join(r.match for r in c)}: {why}")
    return AutoPlan(_generalise(kept, list(param_nodes(gm))), notes, split)


def derive_rules(gm: GraphModule, tp: int) -> list[Rule]:
    return derive_plan(gm, tp).rules


def resolve_rules(gm: GraphModule, rules: list[Rule], tp: int) -> tuple[list[Rule], list[str], dict]:
    """-> (rules, notes, applied) for make_plan: a plan with a rule of style auto is replaced by the rules derived
    from the graph (applied: the passes derive_plan already ran on gm); any other plan is returned as given."""
    if not any(r.style == "auto" for r in rules):
        return rules, [], {}
    auto = derive_plan(gm, tp)
    return auto.rules, auto.notes, {"split_rowwise_bias": auto.split}


def _generalise(rules: list[Rule], params: list[str]) -> list[Rule]:
    """Per-layer rules -> one rule per pattern ("layers.3.q.weight" -> "layers.*.q.weight") where every parameter
    the pattern matches gets the same rule; the others stay exact."""
    given = {r.match: r for r in rules}
    out, covered = [], set()
    for r in rules:
        if r.match in covered:
            continue
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", r.match)
        hits = [f for f in params if fnmatch.fnmatchcase(f, pattern)]
        if pattern != r.match and all(f in given and (given[f].style, given[f].parts) == (r.style, r.parts)
                                      for f in hits):
            out.append(Rule(pattern, r.style, r.parts))
            covered.update(hits)
        else:
            out.append(r)
            covered.add(r.match)
    return out
