"""Cut a rank graph at its collectives, for backends that cannot compile collectives (onnx, tensorrt):
each compute segment is compiled on its own, the collectives run by torch.distributed between them.

    rank graph:  seg0 -> all_reduce -> seg1 -> all_reduce -> ... -> segN
    files:       <name>.seg0<suffix> ... <name>.segN<suffix>, <name>.steps.json (the steps, in order)

`torch.fx.passes.split_module` cuts the graph: every `_c10d_functional` op and its `wait_tensor` form a
partition of their own, the nodes between two of them one compute partition. Weights are inputs of the
segments, so one set of files serves every rank; each rank binds its own tensors at load.

State (a KV cache: `index_copy_` on a buffer) is exported functionally: the program is functionalised, so a
segment that updates a buffer takes it as an input and returns the new value as one more output:

    seg: (x, cache) -> (y, cache')          Steps then makes cache hold cache'

A backend that can write cache' over cache says so per segment ("may_alias"); every other update is copied
back into the state tensor (`copy_`) after the graph has run.
"""
import json
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from tpcompile.capture import retarget_device


def split_program(program: ExportedProgram, out_dir: Path, name: str, suffix: str, compile_segment) -> list[str]:
    """Cut the rank graph at its collectives; compile_segment(GraphModule, file) -> dict writes one compute
    segment and returns what its step needs at run time (with "may_alias": [[output, input], ...], the pairs
    it can write in place). Writes <name>.steps.json, returns the files."""
    gm, params, writes = _functional(program, name)
    split = split_at_collectives(gm)
    (output,) = [n for n in split.graph.nodes if n.op == "output"]
    results = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    updated = {v: fqn for v, fqn in zip(results, writes) if fqn is not None}  # new value -> its buffer
    steps, files = [], []
    for node in split.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            steps.append({"op": "output", "args": [r.name for r, fqn in zip(results, writes) if fqn is None],
                          "writes": [[r.name, fqn] for r, fqn in zip(results, writes) if fqn is not None]})
        elif node.op == "call_function":  # getitem of a segment's tuple of outputs
            src, index = node.args
            steps.append({"op": "getitem", "src": src.name, "index": index, "out": node.name})
        elif node.op == "call_module":
            sub = getattr(split, node.target)
            collective = _collective(sub)
            args = [a.name for a in node.args]
            if collective is not None:
                steps.append({"op": "collective", **collective, "args": args, "out": node.name})
            else:
                (out,) = [n for n in sub.graph.nodes if n.op == "output"]
                file = f"{name}.seg{len(files)}{suffix}"
                step = {"op": "segment", "file": file, "args": args, "out": node.name,
                        "tuple": isinstance(out.args[0], (tuple, list)), **compile_segment(sub, out_dir / file)}
                may = {tuple(p) for p in step.pop("may_alias", [])}
                step["inplace"] = [p for p in _state_updates(node, params, updated) if tuple(p) in may]
                steps.append(step)
                files.append(file)
        else:
            raise NotImplementedError(f"unexpected node in the split graph: {node.format_node()}")
    spec = {"params": params, "inputs": [n.name for n in split.graph.nodes if n.op == "placeholder"
                                         and n.name not in params], "steps": steps}
    (out_dir / f"{name}.steps.json").write_text(json.dumps(spec, indent=1))
    return [f"{name}.steps.json", *files]


class Steps:
    """Runs a split graph: run_segment(step, inputs) -> outputs for compute segments, the graph's own
    functional collectives between them (all_reduce(x, "sum", group), all_gather_into_tensor, ...).
    State the graph updates (the output step's "writes") ends in the shared state tensor: written there in
    place by the segment (run_segment returned that very tensor), else copied there (`copy_`)."""

    def __init__(self, spec: dict, weights: dict, device: torch.device, run_segment):
        missing = sorted(set(spec["params"].values()) - set(weights))
        if missing:
            raise ValueError(f"no tensor for {missing[:3]} ({len(missing)} in all); recompile the artifact")
        for fqn in set(spec["params"].values()):  # dense tensors on the device, shared with later graphs
            weights[fqn] = weights[fqn].to(device).contiguous()
        self.spec, self.device, self.run_segment = spec, device, run_segment
        self.params = {ph: weights[fqn] for ph, fqn in spec["params"].items()}
        self.state = {fqn: weights[fqn] for _, fqn in spec["steps"][-1].get("writes", [])}

    def __call__(self, *args: torch.Tensor):
        c10d = torch.ops._c10d_functional
        env = {**self.params, **{n: a.to(self.device).contiguous() for n, a in zip(self.spec["inputs"], args)}}
        for step in self.spec["steps"]:
            op = step["op"]
            if op == "segment":
                outs = self.run_segment(step, [env[a] for a in step["args"]])
                env[step["out"]] = outs if step["tuple"] else outs[0]
            elif op == "collective":
                (x,) = [env[a] for a in step["args"]]
                env[step["out"]] = c10d.wait_tensor.default(getattr(c10d, step["target"]).default(x, *step["consts"]))
            elif op == "getitem":
                env[step["out"]] = env[step["src"]][step["index"]]
            else:
                self._write_back([(self.state[fqn], env[value]) for value, fqn in step.get("writes", [])])
                outs = [env[a] for a in step["args"]]
                return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def _write_back(updates: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """state <- new value, after every read of the old one; a value written in place is already there.
        A new value that is another state's old tensor (b = a; a = f(a)) is taken before a is written."""
        targets = {id(state) for state, _ in updates}
        updates = [(state, new.clone() if new is not state and id(new) in targets else new) for state, new in updates]
        for state, new in updates:
            if new is not state:
                state.copy_(new)


def _functional(program: ExportedProgram, name: str) -> tuple[GraphModule, dict, list]:
    """The rank graph with no mutation: weights and state are placeholders (params: placeholder -> fqn), and
    each buffer updated in place is one more output, its new value. Returns (graph, params, writes): writes[i]
    is the fqn that output i becomes, None for the graph's own outputs. Device arguments retargeted to CPU.

        before: index_copy_(cache, 2, pos, k); ...; return (logits,)              (export keeps in-place ops)
        after:  cache_1 = index_copy(cache, 2, pos, k); ...; return (cache_1, logits)   cache_1 -> fqn of cache
    """
    from torch.export.graph_signature import InputKind, OutputKind
    program = program.run_decompositions({})  # functionalise only: the exporter decomposes per segment
    sig = program.graph_signature
    held = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    odd = [f"{s.kind.name} {s.arg.name}" for s in sig.input_specs if s.kind not in held + (InputKind.USER_INPUT,)]
    odd += [f"{s.kind.name} {s.target or s.arg.name}" for s in sig.output_specs
            if s.kind not in (OutputKind.USER_OUTPUT, OutputKind.BUFFER_MUTATION)]
    if odd:
        raise ValueError(f"{name}: the split backends (onnx, tensorrt) run graphs whose only side effect is an "
                         f"update of their own buffers (a KV cache); this one has {odd[:3]}: use backend=aoti")
    gm = program.graph_module
    retarget_device(gm, "cpu")
    params = {s.arg.name: s.target for s in sig.input_specs if s.kind in held}
    writes = [s.target if s.kind == OutputKind.BUFFER_MUTATION else None for s in sig.output_specs]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, params, writes


def _state_updates(node, params: dict, updated: dict) -> list[list[int]]:
    """[output, input] pairs of one segment node of the split graph: the output is the new value of a state
    buffer (updated: value node -> fqn) whose old value is that input and is read by no other segment."""
    values = [(u, u.args[1]) for u in node.users if u.op == "call_function"] if any(
        u.op == "call_function" for u in node.users) else [(node, 0)]  # getitems of a tuple, or the node itself
    pairs = []
    for value, index in values:
        old = next((a for a in node.args if params.get(a.name) == updated.get(value, "")), None)
        if old is not None and set(old.users) == {node}:
            pairs.append([index, node.args.index(old)])
    return pairs


def split_at_collectives(gm: GraphModule) -> GraphModule:
    """Partition 2k: the compute after the k-th collective; partition 2k+1: the k-th collective and its wait."""
    from torch.fx.passes.split_module import split_module
    part, segment = {}, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_c10d(node) and node.target != torch.ops._c10d_functional.wait_tensor.default:
            segment += 1
            part[node] = segment
        elif node.target == torch.ops._c10d_functional.wait_tensor.default:
            part[node] = part[node.args[0]]
            segment += 1
        else:
            part[node] = segment
    return split_module(gm, None, lambda n: part[n], keep_original_order=True)


def _collective(sub: GraphModule) -> dict | None:
    ops = [n for n in sub.graph.nodes if n.op == "call_function"]
    if not any(_is_c10d(n) for n in ops):
        return None
    (op,) = [n for n in ops if n.target != torch.ops._c10d_functional.wait_tensor.default]
    if not _is_c10d(op) or len(ops) != 2:
        raise NotImplementedError(f"split at collectives: a collective partition holds more than the collective: "
                                  f"{[n.format_node() for n in ops]}")
    consts = list(op.args[1:])
    if not all(isinstance(c, (int, float, str)) for c in consts):
        raise NotImplementedError(f"split at collectives: a collective with non-constant arguments: {op.format_node()}")
    return {"target": op.target._overloadpacket.__name__, "consts": consts}


def _is_c10d(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "_c10d_functional"
