"""Compile your own nn.Module with the Python API: no Hydra, no config files.

    python examples/custom_module.py [--tp 2] [--backend eager] [--out-dir outputs/engines]

A two-layer feed-forward block with biases and a LayerNorm. The plan is a dict {glob: style}: fc1 is cut by
output features (colwise), fc2 by input features (rowwise: each rank holds a partial sum, one all-reduce per
call, and fc2's bias is added once after it). Everything else is replicated.
"""
import argparse

import torch
from torch import nn

import tpcompile


class FeedForward(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                    # (B, T, dim)
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))  # fc1: (B, T, hidden / tp) on each rank


PLAN = {"fc1.*": "colwise", "fc2.weight": "rowwise", "fc2.bias": "rowwise", "norm.*": "replicate"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--out-dir", default="outputs/engines")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = FeedForward().eval()
    x = torch.randn(2, 8, 64)
    art = tpcompile.compile(model, (x,), tp=args.tp, plan=PLAN, backend=args.backend, out_dir=args.out_dir)
    print(f"artifact: {art.path} (tp={art.tp}, backend={args.backend})")

    with art.session() as run:                              # workers stay up between calls
        outputs = [run(torch.randn(2, 8, 64) if i else x) for i in range(3)]
    y = outputs[0][0] if isinstance(outputs[0], (list, tuple)) else outputs[0]
    with torch.no_grad():
        ref = model(x)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    print(f"max relative error vs the unsharded module: {err:.2e}")
    if err > 1e-5:
        raise SystemExit(f"error {err:.2e} is above 1e-5")


if __name__ == "__main__":
    main()
