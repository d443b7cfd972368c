"""Per-layer probes: a model that also returns the output of every block, so a sharded run can be compared
with the unsharded one at each block boundary and the first divergent layer found at its source.

A "block" is a child of the model's first nn.ModuleList (layers, blocks, h, ...): found, not named.
"""
from torch import nn


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            return [(f"{name}.{i}", child) for i, child in enumerate(mod)]
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; per-layer checks need one")


class Probe(nn.Module):
    """Wraps `model` without renaming anything (it shares the model's children, so every parameter keeps its
    fqn and the plan still matches): forward returns (output, block 0 output, block 1 output, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.inner = [model]  # a list: not registered as a child (that would prefix every fqn)
        self.blocks = blocks_of(model)

    def forward(self, *args):
        seen = []

        def keep(module, inputs, output):
            seen.append(output[0] if isinstance(output, (tuple, list)) else output)

        hooks = [block.register_forward_hook(keep) for _, block in self.blocks]
        try:
            out = self.inner[0](*args)
        finally:
            for h in hooks:
                h.remove()
        return (out, *seen)


def per_layer_lines(names: list[str], reports: list) -> tuple[list[str], str | None]:
    """One line per block with its errors; the name of the first block past its tolerance."""
    lines, first = [], None
    for name, r in zip(names, reports):
        flag = "" if r.ok else "  <- diverges"
        if not r.ok and first is None:
            first = name
        lines.append(f"  {name:24} max abs {r.max_abs_err:.3e}  max rel {r.max_rel_err:.3e}{flag}")
    return lines, first


def compare_per_layer(out, ref, names: list[str], dtype: str, tolerance: float | None = None, log=print):
    """out / ref from a probed model: (output, block outputs...). The output's report, with every block's
    report and the first divergent block attached; logs one line per block."""
    from dataclasses import replace

    from tpcompile.compare import compare
    reports = [compare(o, r, dtype, tolerance) for o, r in zip(out[1:], ref[1:])]
    lines, first = per_layer_lines(names, reports)
    log("per block (sharded vs unsharded):\n" + "\n".join(lines))
    log(f"first divergent block: {first}" if first else "no block diverges")
    return replace(compare(out[0], ref[0], dtype, tolerance),
                   per_layer={n: r.as_dict() for n, r in zip(names, reports)}, first_divergent=first)
