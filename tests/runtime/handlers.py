"""Handler factories for tests/runtime: built inside worker processes by "tests.runtime.handlers:<name>"."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist


class ToyHandler:
    """Ops that exercise collectives, the channel, and each way a rank can fail."""

    def __init__(self, rank: int, world_size: int, device: str):
        self.rank, self.world_size, self.device = rank, world_size, device

    def handle(self, op: str, payload: dict) -> dict:
        if op == "sum":  # all_reduce(x + rank) == world_size * x + sum(range(world_size))
            y = payload["x"].to(self.device) + self.rank
            dist.all_reduce(y)
            return {"y": y, "rank": self.rank}
        if op == "echo":  # the payload back, untouched, to test the channel both ways
            return {"echo": payload, "rank": self.rank}
        if op == "raise":
            if self.rank == payload["rank"]:
                raise ValueError(f"bad input on purpose at rank {self.rank}")
            return {}
        if op == "stall":  # one rank sleeps; the others wait for it in a collective
            if self.rank == payload["rank"]:
                time.sleep(3600)
            dist.all_reduce(torch.ones(1))
            return {}
        if op == "sleep":  # one rank never answers; no collective involved
            if self.rank == payload["rank"]:
                time.sleep(3600)
            return {}
        if op == "modules":  # which top-level packages this worker process has imported
            return {"modules": sorted({name.split(".")[0] for name in sys.modules})}
        raise KeyError(f"ToyHandler has no op {op!r}")


def make_toy(*, rank: int, world_size: int, device: str) -> ToyHandler:
    return ToyHandler(rank, world_size, device)


class FaultHandler(ToyHandler):
    """ToyHandler plus a long request every rank works on, and a rank that hangs while it sets up."""

    def __init__(self, rank: int, world_size: int, device: str, hang_rank: int = -1):
        super().__init__(rank, world_size, device)
        if rank == hang_rank:  # blocks forever before its first collective
            time.sleep(3600)

    def handle(self, op: str, payload: dict) -> dict:
        if op == "slow":  # every rank busy for payload["s"] seconds, then all_reduce(x + rank)
            time.sleep(payload["s"])
            return super().handle("sum", payload)
        return super().handle(op, payload)


def make_fault(*, rank: int, world_size: int, device: str, hang_rank: int = -1) -> FaultHandler:
    return FaultHandler(rank, world_size, device, hang_rank)


def failing_call(group, op: str, payload: dict | None = None, *, timeout_s: float | None = None, before=None):
    """Start `group`, run before(pids) if given, then time one call that must fail.
    Returns (the WorkerError, seconds the call took, the worker pids)."""
    import pytest

    from tpcompile.runtime.launcher import WorkerError
    with pytest.raises(WorkerError) as ei:
        with group:
            pids = [s["pid"] for s in group.status()]
            if before is not None:
                before(pids)
            t0 = time.monotonic()
            try:
                group.call(op, payload, timeout_s=timeout_s)
            finally:
                elapsed = time.monotonic() - t0
    return ei.value, elapsed, pids
