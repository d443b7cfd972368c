"""Faults with real gloo processes: SIGKILL of each rank in turn, a rank that hangs before its first
collective, a frozen rank, a launcher killed without cleanup, and restarts.

Bounds: every group here has start 30 s, call 30 s, heartbeat 3 s; a dead rank must be reported within
DETECT_S of the kill. The file runs 40+ tp=2 group starts; on 2 busy cores it takes about 1-2 minutes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from tpcompile.runtime.launcher import WorkerError, WorkerGroup
from tpcompile.runtime.restart import RestartingGroup
from tests.runtime.handlers import failing_call

HANDLER = "tests.runtime.handlers:make_fault"
ROOT = Path(__file__).resolve().parents[2]
REPEATS = 10  # 5 rounds per rank; ~5 s a round
DETECT_S = 5.0  # kill -> WorkerError; measured ~0.1-0.3 s (poll_s=0.1), the rest is slack for loaded CI
X = torch.arange(6, dtype=torch.float32).reshape(2, 3)
WANT = 2 * X + 1  # all_reduce over 2 ranks of (x + rank)


def _group(log_dir, tp: int = 2, **kw) -> WorkerGroup:
    options = dict(start_timeout_s=30.0, call_timeout_s=30.0, poll_s=0.1, heartbeat_timeout_s=3.0)
    options.update(kw)
    return WorkerGroup(tp=tp, handler=HANDLER, handler_args=options.pop("handler_args", {}),
                       log_dir=str(log_dir), **options)


def _assert_gone(pids, within_s: float = 5.0) -> None:
    end = time.monotonic() + within_s
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not alive, f"worker processes left behind: {alive}"


def _kill_when_busy(group_of, rank: int, op: str, kills: list) -> threading.Thread:
    """SIGKILL `rank` once every rank reports it is inside `op`; appends (time, pid) to kills."""
    def run():
        end = time.monotonic() + 20.0
        while time.monotonic() < end:
            st = group_of().status()
            if st and all(s["status"] == f"op {op}" for s in st):
                pid = st[rank]["pid"]
                kills.append((time.monotonic(), pid))
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_kill_each_rank_restart_then_fail_10_times(tmp_path):
    """Per round, rank r = round % 2: (1) SIGKILL r mid-request -> detected and named, the group restarts
    (max_restarts=1) and the same request succeeds; (2) SIGKILL r again -> no restart left: WorkerError
    names r and SIGKILL within DETECT_S; no process of either group survives."""
    detect = []
    for i in range(REPEATS):
        rank = i % 2
        rg = RestartingGroup(lambda: _group(tmp_path / f"r{i}"), max_restarts=1, log=lambda _: None)
        pids = []
        try:
            rg.start()
            pids += [s["pid"] for s in rg.status()]
            kills: list = []
            _kill_when_busy(lambda: rg.group, rank, "slow", kills)
            replies = rg.call("slow", {"x": X, "s": 1.0})
            assert [r["rank"] for r in replies] == [0, 1] and all(torch.equal(r["y"], WANT) for r in replies)
            assert rg.restarts == 1 and len(rg.failures) == 1, rg.failures
            err = rg.failures[0][1]
            assert err.rank == rank and err.exit == "SIGKILL", str(err)
            assert f"rank {rank} died (killed by SIGKILL) during op 'slow'" in str(err), str(err)
            detect.append(err.at - kills[0][0])
            pids += [s["pid"] for s in rg.status()]

            kills.clear()
            _kill_when_busy(lambda: rg.group, rank, "slow", kills)
            with pytest.raises(WorkerError) as ei:
                rg.call("slow", {"x": X, "s": 5.0})
            assert ei.value.rank == rank and ei.value.exit == "SIGKILL" and "\n" not in str(ei.value)
            detect.append(ei.value.at - kills[0][0])
        finally:
            rg.close()
        _assert_gone(pids)
    print(f"\ndetection after SIGKILL over {len(detect)} kills: max {max(detect):.3f} s, "
          f"mean {sum(detect) / len(detect):.3f} s")
    assert max(detect) < DETECT_S, detect


@pytest.mark.slow
def test_rank_hangs_before_first_collective(tmp_path):
    """Rank 1 blocks in its handler's setup: start() fails at start_timeout_s naming rank 1 and where it is."""
    group = _group(tmp_path, start_timeout_s=6.0, handler_args={"hang_rank": 1})
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as ei:
        group.start()
    elapsed = time.monotonic() - t0
    pids = [s["pid"] for s in group.status()]
    assert 6.0 <= elapsed < 6.0 + DETECT_S, elapsed
    assert ei.value.rank == 1 and ei.value.kind == "timeout"
    assert "was not ready within start_timeout_s=6" in str(ei.value) and "setup handler" in str(ei.value)
    assert "time.sleep(3600)" in ei.value.details or "handlers.py" in ei.value.details  # the stack dump
    _assert_gone(pids)


@pytest.mark.slow
def test_rank_hangs_before_collective_in_a_call(tmp_path):
    """Rank 1 sleeps before the all_reduce that rank 0 is already in: the call deadline names rank 1."""
    err, elapsed, pids = failing_call(_group(tmp_path), "stall", {"rank": 1}, timeout_s=3.0)
    assert 3.0 <= elapsed < 3.0 + DETECT_S, elapsed
    assert err.rank == 1 and err.kind == "timeout" and "'stall'" in str(err)
    _assert_gone(pids)


@pytest.mark.slow
def test_frozen_rank_is_caught_by_the_heartbeat(tmp_path):
    """SIGSTOP: the process exists but sends nothing; heartbeat_timeout_s=3 ends the call long before 30 s."""
    err, elapsed, pids = failing_call(_group(tmp_path), "slow", {"x": X, "s": 0.1},
                                      before=lambda pids: os.kill(pids[0], signal.SIGSTOP))
    assert elapsed < 3.0 + DETECT_S, elapsed
    assert err.rank == 0 and err.kind == "hung" and "heartbeat" in str(err)
    _assert_gone(pids)


def test_raised_op_is_not_retried(tmp_path):
    rg = RestartingGroup(lambda: _group(tmp_path), max_restarts=1, log=lambda _: None)
    with rg:
        with pytest.raises(WorkerError, match="bad input on purpose") as ei:
            rg.call("raise", {"rank": 0})
    assert ei.value.kind == "raised" and rg.restarts == 0


def test_health_reports_each_rank(tmp_path):
    with _group(tmp_path) as group:
        health = group.health()
    assert [h["rank"] for h in health] == [0, 1]
    for h in health:
        assert h["alive"] and h["status"] == "idle" and h["rss_bytes"] > 10 * 2**20
        assert h["peak_rss_bytes"] >= h["rss_bytes"] * 0.5 and h["pid"] > 0


@pytest.mark.slow
def test_launcher_killed_leaves_no_orphans(tmp_path):
    """The launcher itself gets SIGKILL (no close()): every worker notices within ~1 s and exits."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from tpcompile.runtime.launcher import WorkerGroup
        g = WorkerGroup(tp=2, handler={HANDLER!r}, handler_args={{}}, start_timeout_s=30, log_dir={str(tmp_path)!r})
        g.start()
        print(" ".join(str(s["pid"]) for s in g.status()), flush=True)
        time.sleep(3600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
    finally:
        proc.kill()
        proc.wait(10)
    _assert_gone(pids, within_s=DETECT_S)
