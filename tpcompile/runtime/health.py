"""`tpcompile health ARTIFACT [--start-timeout-s S] [--log-dir DIR]`: is this artifact usable here, and what do
its ranks look like once loaded?

1. the manifest parses, was built with this torch, and every file it lists matches its sha256;
2. tp workers start, load it, and each answers op "health": state, pid, RSS and peak RSS, CUDA memory on GPU.
Prints one line per rank; exit 0 when every rank answered, else a one-line error and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpcompile.artifact import Manifest, check_compatible, check_files, read_manifest


def check_artifact(path) -> Manifest:
    """Every recorded file (engines, rank weights, report) against its sha256, before anything is loaded."""
    m = read_manifest(path)
    check_compatible(m, Path(path))
    names = sorted(set(m.files) | set(m.engine_files) | {m.rank_file(r) for r in range(m.tp)})
    check_files(m, Path(path), names)
    return m


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def report(ranks: list[dict]) -> str:
    lines = []
    for r in ranks:
        cuda = (f", cuda allocated {_mib(r['cuda_allocated_bytes'])} reserved {_mib(r['cuda_reserved_bytes'])} "
                f"free {_mib(r['cuda_free_bytes'])}" if "cuda_allocated_bytes" in r else "")
        lines.append(f"rank {r['rank']}: {'alive' if r['alive'] else 'dead'}, {r['status']}, pid {r['pid']}, "
                     f"rss {_mib(r.get('rss_bytes'))} (peak {_mib(r.get('peak_rss_bytes'))}){cuda}")
    return "\n".join(lines)


def main(argv: list[str], debug: bool = False) -> int:
    ap = argparse.ArgumentParser(prog="tpcompile health", description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--start-timeout-s", type=float, default=120.0)
    ap.add_argument("--log-dir", default=None, help="worker logs (default: a temp dir, kept on failure)")
    args = ap.parse_args(argv)
    try:
        from tpcompile.api import Artifact
        m = check_artifact(args.artifact)
        print(f"artifact {args.artifact}: tp={m.tp} backend={m.backend} device={m.device}, "
              f"{len(m.files)} files match their sha256")
        with Artifact(args.artifact).session(start_timeout_s=args.start_timeout_s, log_dir=args.log_dir) as s:
            print(report(s.health()))
    except Exception as e:
        if debug:
            raise
        from tpcompile.util import one_line
        print(f"tpcompile health: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
