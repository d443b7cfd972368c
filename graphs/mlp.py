"""A plain MLP: Linear -> GELU -> Linear, repeated; residual around each pair."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLP(nn.Module):
    """x (B, dim) float -> (B, dim)."""

    def __init__(self, dim: int, hidden: int, n_layers: int = 2, bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden, bias) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
