"""Artifacts: outputs/engines/<key>/ with manifest.json, engine file(s), rank{r}.safetensors, report.txt.

Written into a temporary sibling directory and renamed into place, so a directory under its final name is
always complete. The key hashes everything that changes the result, so a rerun reuses the artifact.
"""
import functools
import hashlib
import json
import os
import platform
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT_VERSION = 2  # 2: files hashed in chunks (HASH); 1: one sha256 over each whole file
MANIFEST = "manifest.json"
HASH_CHUNK = 64 << 20
HASH = "sha256-chunks-64MiB"  # manifest "hash": how each digest in "files" was computed (sha256_files)
_HASH_READ = 8 << 20  # bytes per pread into a thread's buffer: hashing holds at most 8 x 8 MiB


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
    fused: dict = field(default_factory=dict)       # fused weight -> the fqns concatenated (dim 0, local pieces)
    generation: dict | None = None                  # max_batch, max_seq, prefill_chunk, vocab_size, ...
    files: dict = field(default_factory=dict)  # file name -> digest, computed as `hash` says
    hash: str = HASH
    changes: dict = field(default_factory=dict)
    backend_versions: dict = field(default_factory=dict)  # package the engine needs at load -> version at compile
    device_capability: str | None = None  # engines of native code: "x86_64 AVX512" (cpu) or "sm_90" (cuda)
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


@functools.cache
def source_hash(root: Path = Path(__file__).parent) -> str:
    """sha256 over the .py files of the tpcompile package (names and bytes), once per process: the weight and
    pass code that made an artifact is not in its other key parts, and the version does not move with an edit."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(parts: dict) -> str:
    parts = {**parts, "tpcompile": tpcompile_version(), "source": source_hash(), "torch": torch.__version__,
             "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_files(paths: list[Path]) -> list[str]:
    """Each file's digest as the manifest records it (HASH): sha256 of every 64 MiB chunk, then sha256 over the
    chunk digests in order. One flipped byte changes its chunk's digest, hence the file's.

    The chunks of all the files are hashed on min(8, cores) threads: hashlib releases the GIL on large buffers
    and os.preadv while it reads, so n cores hash at ~n GB/s where one sha256 over a whole file runs at ~1 GB/s."""
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY))
        sizes = [os.fstat(fd).st_size for fd in fds]
        jobs = [(i, offset, min(HASH_CHUNK, size - offset))  # an empty file is one empty chunk
                for i, size in enumerate(sizes) for offset in range(0, max(size, 1), HASH_CHUNK)]
        buffer_bytes = min(_HASH_READ, max((n for *_, n in jobs), default=0))
        local = threading.local()

        def chunk(job) -> bytes:
            i, offset, n = job
            if not hasattr(local, "buf"):
                local.buf = memoryview(bytearray(buffer_bytes))
            h, done = hashlib.sha256(), 0
            while done < n:
                got = os.preadv(fds[i], [local.buf[:min(buffer_bytes, n - done)]], offset + done)
                if got == 0:
                    raise ArtifactError(f"{paths[i]}: ended at byte {offset + done} of {sizes[i]} while being hashed "
                                        f"(written to meanwhile?)")
                h.update(local.buf[:got])
                done += got
            return h.digest()

        workers = min(8, os.cpu_count() or 1, len(jobs))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="tpcompile-hash") as pool:
                digests = list(pool.map(chunk, jobs))
        else:
            digests = [chunk(job) for job in jobs]
    finally:
        for fd in fds:
            os.close(fd)
    files = [hashlib.sha256() for _ in fds]
    for (i, _, _), digest in zip(jobs, digests):
        files[i].update(digest)
    return [h.hexdigest() for h in files]


def sha256_file(path: Path) -> str:
    return sha256_files([path])[0]


def staging_dir(root: Path, key: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    path = root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
    path.mkdir()
    return path


def clean_stale(root: Path) -> list[str]:
    """Remove .tmp-<key>-<pid>-<ns> staging dirs whose compile process is gone (killed mid-compile).
    A live pid's dir is left alone, even if the pid was reused: at worst a dead dir stays a little longer."""
    removed = []
    for path in Path(root).glob(".tmp-*-*-*"):
        try:
            pid = int(path.name.split("-")[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def publish(staging: Path, manifest: Manifest, final: Path) -> Path:
    """Hash every file, write the manifest last, then rename the directory into place (atomic: a directory
    under its final name is always complete; a compile killed before the rename leaves only .tmp-*)."""
    files = [p for p in sorted(staging.iterdir()) if p.name != MANIFEST]
    manifest.files = dict(zip((p.name for p in files), sha256_files(files)))
    (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1, default=str))
    try:
        os.rename(staging, final)
    except OSError:  # another compile published the same key first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / MANIFEST).is_file():
            raise ArtifactError(f"{final}: exists but is not a complete artifact (no {MANIFEST}); "
                                f"delete it and compile again") from None
    return final


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path}: not an artifact (no {MANIFEST}); compile one with `tpcompile compile`")
    broken = f"{file}: corrupted or hand-edited ({{}}); delete {path} and compile again"
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(broken.format(f"not JSON: {e}")) from None
    if not isinstance(data, dict):
        raise ArtifactError(broken.format(f"a JSON {type(data).__name__}, not an object"))
    if data.get("format_version") != FORMAT_VERSION:  # before the keys: an older format has other ones
        raise ArtifactError(f"{path}: built with artifact format {data.get('format_version')}, this tpcompile "
                            f"({tpcompile_version()}) reads format {FORMAT_VERSION}; recompile it with this tpcompile")
    try:
        m = Manifest(**data)
    except TypeError as e:  # missing or unknown keys
        raise ArtifactError(broken.format(str(e).removeprefix("Manifest.__init__() "))) from None
    if not isinstance(m.files, dict) or not isinstance(m.tp, int) or m.tp < 1:
        raise ArtifactError(broken.format(f"tp={m.tp!r}, files of type {type(m.files).__name__}"))
    if m.hash != HASH:
        raise ArtifactError(broken.format(f"hash {m.hash!r}; format {FORMAT_VERSION} records {HASH!r}"))
    try:
        names = list(m.files) + m.engine_files
    except (AttributeError, KeyError, TypeError) as e:
        raise ArtifactError(broken.format(f"engine file list: {e!r}")) from None
    for name in names:  # plain names only: a manifest must not point the loader outside its directory
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(broken.format(f"file name {name!r} is not a plain file name"))
    return m


def check_compatible(m: Manifest, path: Path, *, world_size: int | None = None, device: str | None = None,
                     pg_name: str | None = None) -> None:
    """Refuse an artifact this process cannot run: one message with what it was built for, what was found
    and what to do. Checked before any engine file is opened."""
    def refuse(built: str, found: str, fix: str):
        raise ArtifactError(f"{path}: built for {built}, found {found}; {fix}")

    if m.torch_version.split("+")[0] != torch.__version__.split("+")[0]:
        refuse(f"torch {m.torch_version}", f"torch {torch.__version__}",
               f"install torch=={m.torch_version.split('+')[0]} or recompile the artifact with this torch")
    if world_size is not None and world_size != m.tp:
        refuse(f"tp={m.tp}", f"{world_size} ranks", f"start {m.tp} ranks or compile for tp={world_size}")
    if device is not None and m.device != device:
        refuse(f"device {m.device}", f"device {device}", f"run it on {m.device} or compile with "
               f"runtime.device={device}")
    for package, built in m.backend_versions.items():
        found = package_versions([package])[package]
        if found != built:
            refuse(f"{m.backend} with {package} {built}", f"{package} {found or 'not installed'}",
                   f"pip install {package}=={built} or recompile the artifact here")
    if m.device_capability is not None and (device is None or device == m.device):
        found = device_capability(m.device)
        if not _can_run(m.device_capability, found):
            refuse(f"{m.device} {m.device_capability} ({m.backend} holds machine code)", f"{m.device} {found}",
                   "recompile the artifact on this kind of machine")
    if pg_name is not None and pg_name != m.pg_name:
        refuse(f"process group {m.pg_name!r} (its name is compiled into the collectives)",
               f"process group {pg_name!r}", "run it in the default process group, created first")


def package_versions(names: list[str]) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is missing."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


_CPU_ISAS = ("DEFAULT", "AVX2", "AVX512")  # each runs the code built for those before it


def device_capability(device: str) -> str | None:
    """What native code built here targets: the CPU's architecture and vector ISA, or the GPU's sm."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        return f"sm_{major}{minor}"
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def _can_run(built: str, found: str | None) -> bool:
    if found is None or built == found:
        return built == found
    arch_b, _, isa_b = built.partition(" ")
    arch_f, _, isa_f = found.partition(" ")
    return arch_b == arch_f and isa_b in _CPU_ISAS and isa_f in _CPU_ISAS and \
        _CPU_ISAS.index(isa_b) <= _CPU_ISAS.index(isa_f)


def check_files(m: Manifest, path: Path, names: list[str]) -> None:
    """Each named file's digest (sha256_files, all of them at once) against the manifest, before anything is
    loaded from it."""
    files = [Path(path) / name for name in names]
    for name, file in zip(names, files):
        if not file.is_file():
            raise ArtifactError(f"{file}: missing from the artifact; delete {path} and compile again")
        if name not in m.files:
            raise ArtifactError(f"{file}: not recorded in the manifest; delete {path} and compile again")
    for name, file, digest in zip(names, files, sha256_files(files)):
        if digest != m.files[name]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (corrupted or modified); "
                                f"delete {path} and compile again")


def check_no_pickle(file: Path) -> None:
    """Refuse a torch.export archive (.pt2) that would make torch.export.load unpickle.

    torch.export.load runs torch.load(weights_only=False) on weights/constants marked use_pickle,
    pickle.loads on custom-object constants, and falls back to weights_only=False when the sample inputs do
    not load with weights_only=True. Our engines hold none of these (weights are meta; the real ones come from
    safetensors), so any of them means the file was not written by tpcompile."""
    import io
    import zipfile
    try:
        with zipfile.ZipFile(file) as z:
            for name in z.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(z.read(name)).get("config", {})
                    # constants that are not plain tensors ("custom_obj_*", "opaque_obj_*") are unpickled too
                    pickled = [k for k, v in config.items() if v.get("use_pickle") or
                               (name.endswith("_constants_config.json") and
                                not str(v.get("path_name", "")).startswith("tensor_"))]
                    if pickled:
                        raise ArtifactError(f"{file}: {name} asks to unpickle {pickled[:3]}; tpcompile engines "
                                            f"never hold pickled objects: refusing to load it, compile again")
                elif "/data/sample_inputs/" in name:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)  # the safe unpickler, or raise
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{file}: not a readable torch.export archive ({type(e).__name__}: {e}); "
                            f"delete the artifact and compile again") from None
