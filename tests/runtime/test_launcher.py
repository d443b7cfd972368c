"""WorkerGroup with real gloo processes (no mocks), plus the channel on its own.

Every test is bounded by the group's own timeouts (start 30 s, call 30 s or less) or subprocess timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from tpcompile.runtime.channel import Channel, ChannelClosed, ChannelError, ChannelTimeout, accept, connect, \
    free_port, listen
from tpcompile.runtime.launcher import WorkerError, WorkerGroup
from tests.runtime.handlers import failing_call

HANDLER = "tests.runtime.handlers:make_toy"
ROOT = Path(__file__).resolve().parents[2]


def _group(tp: int, log_dir: Path | None, **kw) -> WorkerGroup:
    return WorkerGroup(tp=tp, handler=HANDLER, handler_args={}, start_timeout_s=30.0, call_timeout_s=30.0,
                       poll_s=0.1, log_dir=None if log_dir is None else str(log_dir), **kw)


def _assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"worker processes left behind: {alive}"


def _assert_same(got, want, path="payload") -> None:
    """Exact structural equality; tensors must match in dtype, shape and every bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert torch.equal(got, want), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, path


def _mixed_payload() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "f32": base,
        "view": base[1:, ::2],  # non-contiguous view sharing storage with f32
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "i64": torch.tensor([-(2**62), 0, 7, 2**62 + 3], dtype=torch.int64),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 2, dtype=torch.float16),
        "nested": {"list": [torch.arange(3), 1, "text", None, 2.5, True, {"deep": torch.ones(2, dtype=torch.bfloat16)}],
                   "no_tensors": {"a": [1, [2, [3]]]}},
    }


# ---------------------------------------------------------------- channel alone


def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b)


def test_channel_roundtrip_and_errors():
    a, b = _pair()
    payload = _mixed_payload()
    a.send(payload)
    _assert_same(b.recv(timeout_s=5.0), payload)
    with pytest.raises(ChannelTimeout):
        b.recv(timeout_s=0.2)
    with pytest.raises(TypeError, match=r"message\['x'\]\[1\]"):
        a.send({"x": [1, object()]})
    with pytest.raises(ValueError, match="reserved"):
        a.send({"__tensor__": 1})
    a.close()
    with pytest.raises(ChannelClosed):
        b.recv(timeout_s=5.0)


@pytest.mark.parametrize("token_ok", [True, False])
def test_channel_token(token_ok):
    server = listen()
    addr = "%s:%d" % server.getsockname()
    got: list = []
    t = threading.Thread(target=lambda: got.append(accept(server, "right-token", timeout_s=5.0)))
    t.start()
    try:
        if token_ok:
            ch = connect(addr, "right-token", {"rank": 0}, timeout_s=5.0)
            ch.close()
        else:
            with pytest.raises(ChannelError, match="wrong TPC_TOKEN"):
                connect(addr, "wrong-token", {"rank": 0}, timeout_s=5.0)
    finally:
        t.join(10.0)
        server.close()
    assert (got[0] is not None) == token_ok


# ---------------------------------------------------------------- healthy groups


@pytest.fixture(scope="module")
def group2(tmp_path_factory):
    with _group(2, tmp_path_factory.mktemp("logs2")) as group:
        yield group


def _check_sum(group: WorkerGroup, tp: int) -> None:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    want = tp * x + sum(range(tp))  # all_reduce over ranks of (x + rank)
    replies = group.call("sum", {"x": x})
    assert [r["rank"] for r in replies] == list(range(tp))
    for r in replies:
        _assert_same(r["y"], want)


def test_sum_tp2(group2):
    _check_sum(group2, 2)
    st = group2.status()
    assert [s["status"] for s in st] == ["idle", "idle"]
    assert all(s["alive"] and s["rss_bytes"] > 10_000_000 for s in st)


def test_payload_roundtrip(group2):
    payload = _mixed_payload()
    for rank, reply in enumerate(group2.call("echo", payload)):
        assert reply["rank"] == rank
        _assert_same(reply["echo"], payload)
    with pytest.raises(TypeError, match="ndarray"):  # refused before sending: the group stays usable
        group2.call("echo", {"x": torch.ones(2).numpy()})
    assert group2.call("echo", {"k": 1})[0]["echo"] == {"k": 1}


def test_worker_imports_no_hydra(group2):
    for reply in group2.call("modules"):
        assert not {"hydra", "omegaconf"} & set(reply["modules"]), "workers must get only env vars, never Hydra"


def test_sum_tp3_and_clean_close():
    group = _group(3, None)  # temp log dir: removed after a clean close
    with group:
        _check_sum(group, 3)
        _check_sum(group, 3)  # a second call on the same group
        st = group.status()
    _assert_gone([s["pid"] for s in st])
    assert not Path(st[0]["log"]).parent.exists()
    group.close()  # idempotent


# ---------------------------------------------------------------- failures


def test_handler_raises(tmp_path):
    group = _group(2, tmp_path)
    with pytest.raises(WorkerError) as ei:
        with group:
            pids = [s["pid"] for s in group.status()]
            group.call("raise", {"rank": 1})
    err = ei.value
    assert err.rank == 1
    assert "rank 1" in str(err) and "ValueError: bad input on purpose at rank 1" in str(err)
    assert "\n" not in str(err) and str(tmp_path / "rank1.log") in str(err)
    assert "Traceback" in err.details and "raise ValueError" in err.details
    _assert_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        group.call("sum", {"x": torch.ones(1)})


def test_sigkill_during_collective(tmp_path):
    group = _group(2, tmp_path)
    with pytest.raises(WorkerError) as ei:
        with group:
            pids = [s["pid"] for s in group.status()]

            def kill_rank1_once_busy():
                end = time.monotonic() + 10.0
                while time.monotonic() < end and [s["status"] for s in group.status()] != ["op stall"] * 2:
                    time.sleep(0.05)
                time.sleep(0.3)  # rank 0 is now inside all_reduce, rank 1 asleep before it
                os.kill(pids[1], signal.SIGKILL)

            threading.Thread(target=kill_rank1_once_busy, daemon=True).start()
            t0 = time.monotonic()
            try:
                group.call("stall", {"rank": 1})
            finally:
                elapsed = time.monotonic() - t0
    err = ei.value
    assert elapsed < 15.0, elapsed
    assert err.rank == 1 and err.exit == "SIGKILL"
    assert "rank 1" in str(err) and "SIGKILL" in str(err) and "'stall'" in str(err)
    _assert_gone(pids)


@pytest.mark.slow
def test_call_timeout(tmp_path):
    err, elapsed, pids = failing_call(_group(2, tmp_path), "sleep", {"rank": 1}, timeout_s=3)
    assert 3.0 <= elapsed < 10.0, elapsed
    assert err.rank == 1 and "'sleep'" in str(err) and "timeout_s=3" in str(err)
    assert err.status == "op sleep"
    _assert_gone(pids)


def test_bad_handler_fails_at_start(tmp_path):
    group = WorkerGroup(tp=2, handler="tests.runtime.handlers:no_such_factory", handler_args={},
                        start_timeout_s=30.0, poll_s=0.1, log_dir=str(tmp_path))
    with pytest.raises(WorkerError, match="setup handler.*no_such_factory") as ei:
        group.start()
    assert "Traceback" in ei.value.details
    assert (tmp_path / "rank0.log").exists()
    st = group.status()  # still lists the (now reaped) ranks after a failed start
    assert len(st) == 2 and not any(s["alive"] for s in st)
    _assert_gone([s["pid"] for s in st])


# ---------------------------------------------------------------- torchrun-style


def test_serve_standalone(tmp_path):
    script = tmp_path / "standalone.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from tpcompile.runtime.worker import serve_standalone
        out = serve_standalone({HANDLER!r}, {{}}, [("sum", {{"x": torch.arange(3.0)}}), ("echo", {{"k": 1}})],
                               device="cpu", timeout_s=30)
        if out is not None:
            print("RESULT " + json.dumps([out[0]["y"].tolist(), out[1]["echo"]]))
        else:
            print("NONE")
    """))
    port, tp = free_port(), 2
    procs = []
    for rank in range(tp):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(tp), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
    assert [p.returncode for p in procs] == [0, 0], outs
    result = [line for line in outs[0].splitlines() if line.startswith("RESULT ")]
    want = (tp * torch.arange(3.0) + sum(range(tp))).tolist()  # [1, 3, 5]
    assert result == ["RESULT " + json.dumps([want, {"k": 1}])], outs[0]
    assert "NONE" in outs[1]
