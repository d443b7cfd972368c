"""One engine call captured in a CUDA graph at its first call and replayed after: one launch per call instead of
one per kernel, so a batch-1 decode step stops paying each kernel's launch on the host.

    Replay(engine, device)(*args) -> the engine's outputs (the same tensors at every call: read them, or copy
    them, before the next call)

The first call runs the engine twice on a side stream (lazy initialisation: cuBLAS handles, NCCL, the
allocator) and captures a third run. The runs are repeats of one step with the same inputs: what they write (a KV
cache slot) they write again with the same value, so the captured call leaves the state one call would leave.
Later calls copy their inputs into the captured ones and replay. Each graph has its own memory pool, so no graph's
outputs are reused by another's replay. Collectives inside the engine must be capturable (NCCL, not gloo).
"""
import sys

import torch


class Replay:
    def __init__(self, engine, device):
        self.engine, self.device = engine, torch.device(device)
        self.graph, self.inputs, self.outputs = None, None, None

    def __call__(self, *args: torch.Tensor):
        if self.graph is False:  # the capture failed once: run uncaptured
            return self.engine(*args)
        if self.graph is None:
            return self._capture(args)
        for captured, given in zip(self.inputs, args):
            captured.copy_(given, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _capture(self, args):
        self.inputs = [a.to(self.device).clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.engine(*self.inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:  # relaxed: an AOTInductor package queries its own events while it runs (which model of its pool is
            # free), which the default capture mode forbids and which does not touch the captured stream
            with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle(), capture_error_mode="relaxed"):
                self.outputs = self.engine(*self.inputs)
        except RuntimeError as e:  # the engine does something a graph cannot hold: correct, one launch per kernel
            print(f"tpcompile: CUDA graph capture failed ({' '.join(str(e).split())[:200]}); running the engine "
                  f"uncaptured", file=sys.stderr, flush=True)
            torch.cuda.synchronize(self.device)
            self.graph = False
            return self.engine(*args)
        self.graph = graph
        graph.replay()
        return self.outputs
