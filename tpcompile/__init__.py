"""tpcompile: declarative, graph-compiled tensor parallelism for PyTorch.

    import tpcompile
    art = tpcompile.compile(model, (x,), tp=2, plan={"fc1.*": "colwise", "fc2.weight": "rowwise"})
    y = art.run(x)

Nothing imported here pulls in Hydra: worker processes import this package too.
"""
from tpcompile.api import Artifact, Session, compile, compile_pretrained, load, verify

__all__ = ["Artifact", "Session", "compile", "compile_pretrained", "load", "verify"]
