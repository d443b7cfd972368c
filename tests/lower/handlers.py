"""Handler factories for tests/lower, built inside worker processes: "tests.lower.handlers:<name>"."""
import sys

from tpcompile.runtime.engine import RankEngine


class ProbedEngine(RankEngine):
    """The real engine, plus an op that tells which compiler modules this worker process has imported."""

    def handle(self, op: str, payload: dict) -> dict:
        if op == "imported":
            return {"modules": sorted(m for m in sys.modules if m.startswith(("torch._inductor", "torch._dynamo",
                                                                             "onnxscript", "torch.onnx")))}
        return super().handle(op, payload)


def make_probed(*, rank: int, world_size: int, device, artifact: str) -> ProbedEngine:
    return ProbedEngine(rank=rank, world_size=world_size, device=device, artifact=artifact)
