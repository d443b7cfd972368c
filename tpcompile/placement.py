"""Placements: the DTensor vocabulary, used at compile time only (engines see plain local tensors).

Shard(dim, ways): the tensor is cut into `ways` contiguous pieces along `dim`; rank r holds piece
r * ways // tp. ways == tp is the usual case; ways < tp means pieces are replicated on tp // ways
ranks each (kv heads when tp > kv heads).
Shard(dim, ways, parts): a fused tensor whose `dim` is the concatenation of parts (q, k, v): every part is
cut into `ways` pieces and a rank holds its piece of each part, concatenated (never a cut across parts).
part_ways: per part, when a part has fewer heads than tp (fused qkv with kv heads replicated).
Partial: every rank holds a summand; the full value is their sum (rowwise matmul output).
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    ways: int
    parts: tuple = ()  # global sizes of the fused parts along dim; () = one part
    part_ways: tuple = ()  # pieces per part; () = `ways` for every part

    def __str__(self) -> str:
        return f"S({self.dim})/{self.ways}" + (f"{list(self.parts)}" if self.parts else "") \
            + (f"/{list(self.part_ways)}" if self.part_ways else "")

    def ways_of_parts(self) -> tuple:
        return self.part_ways or (self.ways,) * len(self.parts)


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "P(sum)"


Placement = Replicate | Shard | Partial
R = Replicate()
P = Partial()


def local_shape(shape, placement: Placement) -> tuple[int, ...]:
    shape = tuple(shape)
    if isinstance(placement, Shard):
        d = placement.dim
        # rounded up: a vocabulary not divisible by tp is padded with zero rows (parts always divide)
        size = sum(p // w for p, w in zip(placement.parts, placement.ways_of_parts())) if placement.parts \
            else -(-shape[d] // placement.ways)
        return shape[:d] + (size,) + shape[d + 1:]
    return shape


def piece(rank: int, tp: int, ways: int) -> int:
    """Which of `ways` pieces rank `rank` holds: neighbouring ranks share a piece when ways < tp."""
    return rank * ways // tp


def shard_tensor(t: torch.Tensor, placement: Placement, rank: int, tp: int) -> torch.Tensor:
    """The rank's local part of a global tensor, contiguous (AOTInductor mis-reads offset views)."""
    if not isinstance(placement, Shard):
        return t.contiguous()
    if placement.parts:  # each part cut alone: (q0 q1 | k0 k1) -> rank 0 holds (q0 | k0)
        parts = t.split(list(placement.parts), placement.dim)
        return torch.cat([shard_tensor(p, Shard(placement.dim, w), rank, tp)
                          for p, w in zip(parts, placement.ways_of_parts())], placement.dim)
    size = -(-t.shape[placement.dim] // placement.ways)
    start = piece(rank, tp, placement.ways) * size
    part = t.narrow(placement.dim, min(start, t.shape[placement.dim]),
                    max(0, min(size, t.shape[placement.dim] - start)))
    if part.shape[placement.dim] < size:  # the last ranks' padding rows
        pad = list(part.shape)
        pad[placement.dim] = size - part.shape[placement.dim]
        part = torch.cat([part, part.new_zeros(pad)], placement.dim)
    return part.contiguous()
