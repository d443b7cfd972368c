"""Sharded vs unsharded: the same inputs through the artifact on tp workers and through the original model
in one process; max abs and relative error against a tolerance set by dtype."""
from dataclasses import asdict, dataclass

import torch



TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}  # max relative error by dtype


@dataclass
class VerifyReport:
    max_abs_err: float
    max_rel_err: float   # max |out - ref| / max |ref|, over every output
    tolerance: float
    ok: bool
    outputs: int
    per_layer: dict | None = None        # verify per_layer: block name -> its own report (as a dict)
    first_divergent: str | None = None   # the first block past the tolerance

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verify {verdict}: max abs err {self.max_abs_err:.3e}, max rel err {self.max_rel_err:.3e} "
                f"(tolerance {self.tolerance:.0e}) over {self.outputs} output(s)")

    def as_dict(self) -> dict:
        return asdict(self)


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flat(o)] if isinstance(out, (list, tuple)) else []


def compare(out, ref, dtype: str = "float32", tolerance: float | None = None) -> VerifyReport:
    outs, refs = flat(out), flat(ref)
    if len(outs) != len(refs):
        raise ValueError(f"the artifact returned {len(outs)} outputs, the reference {len(refs)}")
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    abs_err = rel_err = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise ValueError(f"output shape {list(o.shape)} differs from the reference {list(r.shape)}")
        diff = (o.double() - r.double()).abs().max().item() if o.numel() else 0.0
        scale = r.double().abs().max().item() if r.numel() else 0.0
        abs_err, rel_err = max(abs_err, diff), max(rel_err, diff / scale if scale else diff)
    return VerifyReport(abs_err, rel_err, tol, rel_err <= tol, len(outs))
