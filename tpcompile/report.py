"""`tpcompile report SWEEP_DIR`: one table and a few plots from the records of a Hydra sweep.

Every job of `tpcompile bench -m ...` / `tpcompile verify -m ...` writes `<command>.json` into its own job dir
(outputs/sweeps/<time>/<n>/). This module reads them all and writes, into SWEEP_DIR:

    report.md          the table(s), also printed
    report.csv         one row per record, every column
    decode.png         decode latency (p50) and tokens/s against tp, one line per backend
    speedup.png        speed-up = p50(tp=1) / p50(tp) and efficiency = speed-up / tp, per backend
    percentiles.png    decode latency p50 / p95 / p99 per (backend, tp)

Speed-up is relative to tp=1 of the same model, backend, dtype, batch, prompt length and device; a series
without a tp=1 point gets no speed-up (shown as "-").
"""
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("bench", "verify")  # the records a report reads
BENCH_COLUMNS = [  # (key, header, format)
    ("job", "job", "{}"), ("swept", "swept overrides", "{}"), ("model", "model", "{}"),
    ("backend", "backend", "{}"), ("dtype", "dtype", "{}"), ("tp", "tp", "{}"), ("batch", "batch", "{}"), ("decode_ms_p50", "decode p50 ms", "{:.3f}"),
    ("decode_ms_p95", "p95 ms", "{:.3f}"), ("decode_ms_p99", "p99 ms", "{:.3f}"),
    ("decode_tokens_per_s", "tokens/s", "{:.1f}"), ("decode_ms_run", "whole-run ms/token", "{:.3f}"),
    ("speedup", "speed-up", "{:.2f}"),
    ("efficiency", "efficiency", "{:.0%}"), ("collective_share", "collective share", "{:.0%}"),
    ("prefill_ms", "prefill ms", "{:.2f}"), ("peak_memory_mib", "peak MiB/rank", "{:.0f}"),
]
VERIFY_COLUMNS = [
    ("job", "job", "{}"), ("swept", "swept overrides", "{}"), ("model", "model", "{}"),
    ("backend", "backend", "{}"), ("dtype", "dtype", "{}"), ("tp", "tp", "{}"), ("ok", "ok", "{}"), ("max_abs_err", "max abs err", "{:.3e}"),
    ("max_rel_err", "max rel err", "{:.3e}"), ("tolerance", "tolerance", "{:.0e}"), ("seconds", "seconds", "{:.1f}"),
]
PLOTS = ("decode.png", "speedup.png", "percentiles.png")


@dataclass
class Report:
    sweep_dir: Path
    rows: list[dict]                                  # one per record, sorted by command, series, tp
    files: list[Path] = field(default_factory=list)  # what was written
    notes: list[str] = field(default_factory=list)   # e.g. a series without a tp=1 point

    def bench_rows(self) -> list[dict]:
        return [r for r in self.rows if r["command"] == "bench"]

    def markdown(self) -> str:
        parts = [f"# tpcompile report: {self.sweep_dir}", ""]
        for command, columns in (("bench", BENCH_COLUMNS), ("verify", VERIFY_COLUMNS)):
            rows = [r for r in self.rows if r["command"] == command]
            if rows:
                parts += [f"## {command} ({len(rows)} job(s))", "", _markdown_table(rows, columns), ""]
        parts += [f"- {n}" for n in self.notes]
        parts += [f"![{p.stem}]({p.name})" for p in self.files if p.suffix == ".png"]
        return "\n".join(parts).rstrip() + "\n"


def load_records(sweep_dir: Path) -> list[dict]:
    """Every bench.json / verify.json under sweep_dir (a sweep dir, or one run dir), with its job dir and overrides."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir}: no such directory; pass a sweep dir such as outputs/sweeps/<time>")
    records = []
    for command in COMMANDS:
        for path in sorted(sweep_dir.rglob(f"{command}.json")):
            rel = path.parent.relative_to(sweep_dir)
            if any(part.startswith(".") for part in rel.parts):  # .hydra/, .submitit/
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a readable JSON record ({e}); delete it or rerun that job") from e
            record.setdefault("command", command)
            record["job"] = str(rel) if rel.parts else "."
            record["overrides"] = " ".join(_overrides(path.parent))
            if "peak_memory_bytes" in record:
                record["peak_memory_mib"] = record["peak_memory_bytes"] / 2**20
            records.append(record)
    if not records:
        raise ValueError(f"{sweep_dir}: no bench.json or verify.json in it or its job dirs; run a sweep first, "
                         f"e.g. `tpcompile bench -m tp=1,2 hydra.sweep.dir={sweep_dir}`")
    return records


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf
    return [str(o) for o in OmegaConf.load(path)]


def _series(r: dict) -> tuple:
    """Records that differ only in tp: one line in a plot, one tp=1 baseline."""
    return (r["command"], r.get("model"), r.get("backend"), r.get("dtype"), r.get("batch"), r.get("prompt_len"),
            r.get("device_name"))


def add_speedup(rows: list[dict]) -> list[str]:
    """speed-up = p50(tp=1) / p50(tp) within a series; efficiency = speed-up / tp (1.0 = linear scaling)."""
    notes, base = [], {}
    for r in rows:
        if r["command"] == "bench" and r.get("tp") == 1:
            base.setdefault(_series(r), r["decode_ms_p50"])
    for r in rows:
        if r["command"] != "bench":
            continue
        b = base.get(_series(r))
        if b is None:
            note = f"no tp=1 point for {r.get('model')} backend={r.get('backend')} {r.get('dtype')}: no speed-up"
            if note not in notes:
                notes.append(note)
            continue
        r["speedup"] = b / r["decode_ms_p50"]
        r["efficiency"] = r["speedup"] / r["tp"]
    return notes


def report(sweep_dir, plots: bool = True) -> Report:
    """Read the sweep's records, write report.md, report.csv and (plots=True) the PNGs into sweep_dir."""
    sweep_dir = Path(sweep_dir)
    rows = sorted(load_records(sweep_dir), key=lambda r: (tuple(map(str, _series(r))), r.get("tp", 0), r["job"]))
    common = set.intersection(*(set(r["overrides"].split()) for r in rows))
    for r in rows:  # what differs between the jobs: the sweep's axes
        r["swept"] = " ".join(o for o in r["overrides"].split() if o not in common)
    rep = Report(sweep_dir, rows, notes=add_speedup(rows))
    if plots and rep.bench_rows():
        rep.files += plot(rep.bench_rows(), sweep_dir)
    _write_csv(rows, sweep_dir / "report.csv")
    (sweep_dir / "report.md").write_text(rep.markdown())
    rep.files = [sweep_dir / "report.md", sweep_dir / "report.csv"] + rep.files
    return rep


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(rows: list[dict], path: Path) -> None:
    first = [k for k, _, _ in BENCH_COLUMNS] + [k for k, _, _ in VERIFY_COLUMNS] + ["command", "overrides"]
    keys = list(dict.fromkeys(first + [k for r in rows for k in r]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The three PNGs from bench rows (matplotlib, Agg: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_series(r), []).append(r)
    vary = [i for i in (1, 3, 4, 6) if len({k[i] for k in groups}) > 1]  # model, dtype, batch, device if they vary

    def label(key):
        return " ".join([str(key[2])] + [str(key[i]) for i in vary])

    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, rs in groups.items():
        tps = [r["tp"] for r in rs]
        ax1.plot(tps, [r["decode_ms_p50"] for r in rs], marker="o", label=label(key))
        ax2.plot(tps, [r["decode_tokens_per_s"] for r in rs], marker="o", label=label(key))
    ax1.set(xlabel="tp", ylabel="decode latency p50 (ms / step)", title="decode latency")
    ax2.set(xlabel="tp", ylabel="decode tokens/s", title="decode throughput")
    files.append(_save(fig, [ax1, ax2], out / "decode.png"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    all_tps = sorted({r["tp"] for r in rows})
    ax1.plot(all_tps, all_tps, "k--", lw=0.8, label="linear")
    ax2.axhline(1.0, color="k", ls="--", lw=0.8, label="linear")
    for key, rs in groups.items():
        pts = [(r["tp"], r["speedup"], r["efficiency"]) for r in rs if "speedup" in r]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label(key))
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label(key))
    ax1.set(xlabel="tp", ylabel="speed-up vs tp=1 (decode p50)", title="speed-up")
    ax2.set(xlabel="tp", ylabel="efficiency (speed-up / tp)", title="efficiency")
    files.append(_save(fig, [ax1, ax2], out / "speedup.png"))

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    width = 0.27
    for i, (q, key) in enumerate((("p50", "decode_ms_p50"), ("p95", "decode_ms_p95"), ("p99", "decode_ms_p99"))):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=q)
    ax.set_xticks(range(len(rows)), [f"{label(_series(r))}\ntp={r['tp']}" for r in rows])
    ax.set(ylabel="decode latency (ms / step)", title="decode latency percentiles")
    files.append(_save(fig, [ax], out / "percentiles.png"))
    return files


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if ax.get_xlabel() == "tp":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str], debug: bool = False) -> int:
    """`tpcompile report SWEEP_DIR [--no-plots]`"""
    paths = [a for a in argv if not a.startswith("-")]
    flags = set(argv) - set(paths)
    if len(paths) != 1 or flags - {"--no-plots"}:
        print("usage: tpcompile report SWEEP_DIR [--no-plots]", file=sys.stderr)
        return 2
    try:
        rep = report(paths[0], plots="--no-plots" not in flags)
    except Exception as e:
        if debug:
            raise
        from tpcompile.util import one_line
        print(f"tpcompile report: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(rep.markdown())
    print("wrote " + ", ".join(str(p) for p in rep.files))
    return 0
