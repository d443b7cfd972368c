"""Artifacts: outputs/engines/<key>/ with manifest.json, engine file(s), rank{r}.safetensors, report.txt.

Written into a temporary sibling directory and renamed into place, so a directory under its final name is
always complete. The key hashes everything that changes the result, so a rerun reuses the artifact.
"""
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact that cannot be used here: the message says what it was built for and what was found."""


def tpcompile_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tpcompile")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class Manifest:
    key: str
    tp: int
    backend: str
    dtype: str
    device: str                 # "cpu" or "cuda": where the engine runs
    pg_name: str                # process-group name baked into the collectives
    graph_hash: str             # the rank graphs' code
    plan_hash: str
    graphs: dict                # graph name ("forward", or "prefill" + "decode") -> {files, inputs}
    params: dict                # fqn -> {style, placement, global, local}
    state: dict = field(default_factory=dict)       # fqn -> {shape (local), dtype}: zeros at load (KV cache)
    generation: dict | None = None                  # max_batch, max_seq, prefill_chunk, vocab_size, ...
    files: dict = field(default_factory=dict)  # file name -> sha256
    changes: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tpcompile_version: str = field(default_factory=tpcompile_version)
    torch_version: str = torch.__version__
    python: str = platform.python_version()
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def rank_file(self, rank: int) -> str:
        return f"rank{rank}.safetensors"

    @property
    def engine_files(self) -> list[str]:
        return [f for g in self.graphs.values() for f in g["files"]]


def cache_key(parts: dict) -> str:
    parts = {**parts, "tpcompile": tpcompile_version(), "torch": torch.__version__, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def staging_dir(root: Path, key: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
    path.mkdir()
    return path


def publish(staging: Path, manifest: Manifest, final: Path) -> Path:
    """Hash every file, write the manifest last, then rename the directory into place (atomic)."""
    manifest.files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST}
    (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1, default=str))
    try:
        os.rename(staging, final)
    except OSError:  # another compile published the same key first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return final


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path}: not an artifact (no {MANIFEST}); compile one with `tpcompile compile`")
    data = json.loads(file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {data.get('format_version')}, this tpcompile reads "
                            f"{FORMAT_VERSION}; recompile it")
    return Manifest(**data)


def check_compatible(m: Manifest, path: Path, *, world_size: int | None = None, device: str | None = None) -> None:
    if m.torch_version.split("+")[0] != torch.__version__.split("+")[0]:
        raise ArtifactError(f"{path}: built with torch {m.torch_version}, found torch {torch.__version__}; "
                            f"recompile the artifact with this torch")
    if world_size is not None and world_size != m.tp:
        raise ArtifactError(f"{path}: built for tp={m.tp}, started with {world_size} ranks; "
                            f"start {m.tp} ranks or compile for tp={world_size}")
    if device is not None and m.device != device:
        raise ArtifactError(f"{path}: built for device {m.device}, asked to run on {device}; "
                            f"compile with runtime.device={device}")


def check_files(m: Manifest, path: Path, names: list[str]) -> None:
    """sha256 of each named file against the manifest, before anything is loaded from it."""
    for name in names:
        file = Path(path) / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing from the artifact; recompile it")
        if name not in m.files:
            raise ArtifactError(f"{file}: not recorded in the manifest; recompile the artifact")
        if sha256_file(file) != m.files[name]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (corrupted or modified); recompile it")
