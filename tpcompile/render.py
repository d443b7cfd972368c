"""`tpcompile inspect render=true`: a picture of one layer of the partitioned (rank) graph.

Each value is coloured by its placement from the propagation pass, collectives are marked:

    sharded S(d)/n  blue       replicated R  grey       partial P(sum)  orange       collective  red octagon

A layer is the render_layer-th child of the first numbered container in the module paths
(node.meta["nn_module_stack"], or the parameter's fqn for get_attr nodes), e.g. `blocks.3` or `h.0`; a graph
without one is drawn whole. The DOT source is always written; the SVG needs Graphviz's `dot`.
"""
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from torch.fx import Node

from tpcompile.placement import Partial, Shard

COLOURS = {"sharded": "#9ecae1", "replicated": "#e5e5e5", "partial": "#fdae6b", "collective": "#de2d26"}
GET_DOT = ("Graphviz's `dot` was not found, so no SVG was drawn; install it (Debian/Ubuntu: apt-get install "
           "graphviz, macOS: brew install graphviz, conda: conda install graphviz) and rerun, or render the DOT "
           "file elsewhere: dot -Tsvg {dot} -o {svg}")


@dataclass
class Picture:
    layer: str               # the module path drawn ("" for the whole graph)
    nodes: list[Node]        # the drawn nodes, in graph order
    dot_path: Path
    svg_path: Path | None    # None when `dot` is missing or failed
    text: str                # the layer as a text plan: one line per value
    message: str             # what was written, or how to get `dot`


def module_path(node: Node) -> str:
    if node.op == "get_attr":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def is_collective(node: Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("_c10d_functional.")


def kind(placement) -> str:
    if isinstance(placement, (list, tuple)):  # a multi-output op (chunk, split): its first output
        placement = placement[0] if placement else None
    if isinstance(placement, Shard):
        return "sharded"
    if isinstance(placement, Partial):
        return "partial"
    return "replicated"


def find_layer(nodes: list[Node], layer: int) -> str:
    """The module path of the layer-th child of the first numbered container ('' when there is none)."""
    containers: dict[str, set[int]] = {}
    for n in nodes:
        m = re.match(r"^(.*?)\.(\d+)(\.|$)", module_path(n))
        if m:
            containers.setdefault(m[1], set()).add(int(m[2]))
    if not containers:
        return ""
    name, indices = next(iter(containers.items()))
    if layer not in indices:
        raise ValueError(f"render_layer={layer}: the graph's layers are {name}.{min(indices)}..{name}.{max(indices)}; "
                         f"choose render_layer between {min(indices)} and {max(indices)}")
    return f"{name}.{layer}"


def select(gm, layer_path: str) -> list[Node]:
    """Tensor-valued nodes under layer_path, plus the collectives (and their waits) fed by them."""
    def in_layer(n):
        path = module_path(n)
        return not layer_path or path == layer_path or path.startswith(layer_path + ".")

    chosen: set[Node] = set()
    for n in gm.graph.nodes:
        has_value = "val" in n.meta and n.meta["val"] is not None
        if n.op in ("call_function", "get_attr", "placeholder") and has_value and in_layer(n):
            chosen.add(n)
        elif is_collective(n) and any(a in chosen for a in n.all_input_nodes):
            chosen.add(n)
    return [n for n in gm.graph.nodes if n in chosen]


def _shape(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return ", ".join("x".join(map(str, v.shape)) for v in val if hasattr(v, "shape"))
    return "x".join(map(str, val.shape)) if hasattr(val, "shape") else ""


def _op(node: Node) -> str:
    if node.op == "get_attr":
        return "parameter"
    if node.op == "placeholder":
        return "input"
    name = getattr(node.target, "__name__", None) if callable(node.target) and not hasattr(node.target, "_schema") else None
    return name or re.sub(r"^aten\.|\.default$", "", str(node.target).replace("_c10d_functional.", ""))


def _placement(node: Node, placements: dict) -> str:
    if is_collective(node):
        return "collective"
    p = placements.get(node)
    if isinstance(p, (list, tuple)):
        return "[" + ", ".join(map(str, p)) + "]"
    return str(p) if p is not None else "R"


def text_plan(nodes: list[Node], placements: dict) -> str:
    rows = [("value", "op", "placement", "global shape", "module")]
    rows += [(n.name, _op(n), _placement(n, placements), _shape(n), module_path(n)) for n in nodes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def to_dot(nodes: list[Node], placements: dict, title: str) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(title)} {{", "  rankdir=TB; node [fontname=Helvetica, fontsize=10, style=filled];",
             f"  labelloc=t; label={q(title)};"]
    drawn = set(nodes)
    outside: set[Node] = set()
    for n in nodes:
        if is_collective(n) or _op(n).startswith("wait_tensor"):
            attrs = f'shape=octagon, fillcolor="{COLOURS["collective"]}", fontcolor=white, penwidth=2'
        else:
            shape = "box" if n.op == "get_attr" else "ellipse"
            attrs = f'shape={shape}, fillcolor="{COLOURS[kind(placements.get(n))]}"'
        label = f"{n.name}\\n{_op(n)}\\n{_placement(n, placements)}  {_shape(n)}"
        lines.append(f"  {q(n.name)} [label=\"{label}\", {attrs}];")
        for a in n.all_input_nodes:
            if a not in drawn and a.op != "get_attr" and "val" in a.meta:
                outside.add(a)
            if a in drawn or a in outside:
                lines.append(f"  {q(a.name)} -> {q(n.name)};")
    for a in sorted(outside, key=lambda n: n.name):  # values from outside the layer: small and dashed
        lines.append(f"  {q(a.name)} [label=\"{a.name}\\n{_placement(a, placements)}\", style=dashed, shape=ellipse];")
    legend = " | ".join(f"<{k}> {k}" for k in COLOURS)
    lines.append(f'  legend [shape=record, style=filled, fillcolor=white, label="{legend}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(partition, layer: int, out_dir: Path, stem: str | None = None) -> Picture:
    """Write <stem>.dot, <stem>.txt and (with Graphviz) <stem>.svg for one layer of partition.gm."""
    gm, placements = partition.gm, partition.propagation.placements
    path = find_layer(list(gm.graph.nodes), layer)
    nodes = select(gm, path)
    stem = stem or (f"layer{layer}" if path else "graph")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{path or 'whole graph'} at tp={partition.plan.tp}"
    dot_path, svg_path = out_dir / f"{stem}.dot", out_dir / f"{stem}.svg"
    dot_path.write_text(to_dot(nodes, placements, title))
    text = text_plan(nodes, placements)
    (out_dir / f"{stem}.txt").write_text(text + "\n")
    exe = shutil.which("dot")
    if exe is None:
        return Picture(path, nodes, dot_path, None, text, GET_DOT.format(dot=dot_path, svg=svg_path))
    r = subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg_path)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        return Picture(path, nodes, dot_path, None, text,
                       f"dot failed on {dot_path} (exit {r.returncode}): {r.stderr.strip()[:300]}")
    return Picture(path, nodes, dot_path, svg_path, text, f"wrote {svg_path} ({len(nodes)} values of {title})")
