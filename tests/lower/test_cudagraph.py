"""Replay (lower/cudagraph.py): an engine call captured in a CUDA graph gives what the engine gives, call after
call, with the state it writes in place (a KV cache) left as the engine leaves it. Needs a GPU."""
import pytest
import torch

from tpcompile.lower.cudagraph import Replay

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_engine(device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(64, 32, generator=gen).to(device)
    cache = torch.zeros(4, 9, 32, device=device)  # rows, slots (the last one scratch), features

    def engine(x, positions):  # x (4, 64), positions (4,): write row r's value at its slot, attend over its slots
        value = x @ w
        cache.index_put_((torch.arange(4, device=device), positions), value)
        seen = (torch.arange(9, device=device)[None, :] <= positions[:, None]).float()
        return (cache * seen[..., None]).sum(1) + value
    return engine, cache


def test_replay_gives_the_engine_s_outputs_and_state_call_after_call():
    device = torch.device("cuda")
    direct, direct_cache = make_engine(device)
    graphed, graphed_cache = make_engine(device)
    replay = Replay(graphed, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for step in range(6):
        x = torch.randn(4, 64, generator=gen).to(device)
        positions = torch.tensor([step, step + 1, 8, min(step * 2, 7)], device=device)
        want = direct(x, positions)
        got = replay(x, positions).clone()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed_cache, direct_cache, rtol=1e-5, atol=1e-5)
    assert replay.graph is not None
