"""Progress bars for the slow stages (capture, passes, weight re-sharding, engine builds).

Shown only when both stdout and stderr are terminals: logs, pipes, CI and Hydra sweeps stay clean.
TPCOMPILE_PROGRESS=1 forces them on, TPCOMPILE_PROGRESS=0 off.
"""
import os
import sys


def enabled() -> bool:
    forced = os.environ.get("TPCOMPILE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable`, wrapped in a tqdm bar on stderr when enabled(); the bar disappears when done."""
    if not enabled():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
