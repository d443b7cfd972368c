"""Leaf helpers every layer may import (this module imports nothing of tpcompile): one-line error text, the
provenance stamped on every record, and the age of this process (first-token figures)."""
import os
import subprocess
import time
from pathlib import Path


def one_line(e: BaseException) -> str:
    """An exception as one line for the user: config errors wrap the real one, so the first non-empty cause
    is shown; a ValueError is the user's input and reads as its message, anything else keeps its type."""
    cause = e
    while cause.__cause__ is not None and not str(cause):
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, ValueError) else f"{type(cause).__name__}: {text}"


def provenance() -> dict:
    """torch version, commit (TPC_COMMIT when set: a copied tree may carry a stale .git) and date of a record."""
    import torch
    commit = os.environ.get("TPC_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=5, cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"torch": torch.__version__, "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def process_age() -> float | None:
    """Seconds since this process started, from /proc (clock ticks, 10 ms); None where there is no /proc."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields 3.. of proc_pid_stat(5)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot, in ticks
    except (OSError, ValueError, IndexError):
        return None
