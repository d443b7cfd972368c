"""Hugging Face-format checkpoints: config.json + safetensors (one file, or an index over several) in,
per-rank shards out (build.py streams them), and merged back.

    Pretrained(dir)               config.json -> the mapping in conf/checkpoint/ that lists its model_type
      .model(dtype)               the graph on the meta device with config.json's sizes
      .check(model, seq_len)      every graph tensor present with the right shape and dtype, no tensor left over:
                                  all from the file headers, before any work
      .source                     fqn -> global tensor, mapped from its file (memory: that tensor only)
    export_checkpoint(art, out)   rank shards -> HF safetensors, names and dtypes mapped back, config copied

This module knows the file formats, not any model: which graph to build, its arguments and the tensor names
all come from the mapping file. Nothing is ever unpickled.
"""
import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tpcompile.safetensors_io import (DTYPES, NAMES, SafetensorsError, StreamWriter, TensorInfo, map_tensor,
                                      read_header, read_tensor)

CONF_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "conf" / "checkpoint"
INDEX = "model.safetensors.index.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model")  # travel with the artifact, hashed in its manifest
MAP_FILE = "checkpoint.json"  # in the artifact: graph fqn -> checkpoint tensor name and dtype
_UNSET = object()


class CheckpointError(ValueError):
    """A checkpoint that cannot be compiled: one line naming the file, the tensor and the fix."""


def find_tensors(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint from the file headers: the index's weight_map, or all *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        headers = {}
        for name, file in weight_map.items():
            if file not in headers:
                if not (path / file).is_file():
                    raise CheckpointError(f"{index}: tensor {name} is in {file}, which does not exist in {path}")
                headers[file] = _header(path / file)
            if name not in headers[file]:
                raise CheckpointError(f"{path / file}: tensor {name} is listed in {INDEX} but not in the file")
        return {name: headers[file][name] for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise _pickle_error(pickles[0])
        raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX}; a Hugging Face checkpoint directory "
                              f"holds config.json and model*.safetensors")
    tensors = {}
    for file in files:
        for name, info in _header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also in {tensors[name].file.name}; keep one copy")
            tensors[name] = info
    return tensors


def _header(file: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(file)[0]
    except SafetensorsError as e:
        with open(file, "rb") as f:
            magic = f.read(2)
        if magic in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):  # zip or pickle
            raise _pickle_error(file) from None
        raise CheckpointError(str(e)) from None


def _pickle_error(file: Path) -> CheckpointError:
    return CheckpointError(f"{file}: a pickle (torch.save) checkpoint; tpcompile reads safetensors only and never "
                           f"unpickles (loading a pickle can run code): convert it with transformers' "
                           f"save_pretrained(dir, safe_serialization=True) where you trust the file")


def _get(config: dict, key: str):
    """config.json value at a dotted key; _UNSET when absent."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


@dataclass
class Mapping:
    """A conf/checkpoint/*.yaml file: how one model family's checkpoints become one graph."""
    file: Path
    graph: str
    model_types: dict
    args: dict
    require: dict
    seq_limit: list
    vocab_key: str
    names: dict
    ignore: list

    @staticmethod
    def for_config(config: dict, config_file: Path) -> "Mapping":
        from omegaconf import OmegaConf
        model_type, known = config.get("model_type"), {}
        for file in sorted(CONF_CHECKPOINT_DIR.glob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
            known.update({t: file.name for t in data.get("model_types", {})})
            if model_type in data.get("model_types", {}):
                return Mapping(file=file, graph=data["graph"], model_types=data["model_types"], args=data["args"],
                               require=data.get("require", {}), seq_limit=data.get("seq_limit", []),
                               vocab_key=data.get("vocab_key", "vocab_size"), names=data["names"],
                               ignore=data.get("ignore", []))
        raise CheckpointError(f"{config_file}: model_type {model_type!r} has no mapping in {CONF_CHECKPOINT_DIR} "
                              f"(known: {sorted(known)}); add its tensor names and config keys there")

    def graph_args(self, config: dict, config_file: Path) -> dict:
        family = self.model_types[config["model_type"]] or {}
        for key, allowed in {**self.require, **family.get("require", {})}.items():
            value = _get(config, key)
            value = None if value is _UNSET else value
            if value not in allowed:
                raise CheckpointError(f"{config_file}: {key}={value!r} is not supported by {self.graph} (supported: "
                                      f"{allowed}; see {self.file.name})")
        args = {}
        for arg, spec in self.args.items():
            keys = spec["key"] if isinstance(spec["key"], list) else [spec["key"]]
            value = next((v for v in (_get(config, k) for k in keys) if v is not _UNSET and v is not None), _UNSET)
            if value is _UNSET:
                if "default" not in spec:
                    raise CheckpointError(f"{config_file}: no {' or '.join(keys)}; {self.graph} needs it for {arg}")
                value = spec["default"]
            args[arg] = value
        return {**args, **family.get("args", {})}

    def to_checkpoint(self, fqn: str) -> str | None:
        return _translate(fqn, self.names.items())

    def to_graph(self, name: str) -> str | None:
        return _translate(name, ((c, g) for g, c in self.names.items()))

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(_pattern(p), name) for p in self.ignore)


def _pattern(glob: str) -> str:
    return re.escape(glob).replace(r"\*", r"(\d+)")


def _translate(name: str, pairs) -> str | None:
    for src, dst in pairs:
        m = re.fullmatch(_pattern(src), name)
        if m:
            out = dst
            for g in m.groups():
                out = out.replace("*", g, 1)
            return out
    return None


class Pretrained:
    """A Hugging Face checkpoint directory, read from its config and headers only until .source is called."""

    def __init__(self, path):
        self.path = path = Path(path)
        if path.is_file() and path.suffix in PICKLES:
            raise _pickle_error(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory (config.json + *.safetensors)")
        self.config_file = path / "config.json"
        if not self.config_file.is_file():
            raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint directory has one")
        try:
            self.config = json.loads(self.config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config_file}: not valid JSON ({e})") from None
        self.mapping = Mapping.for_config(self.config, self.config_file)
        self.args = self.mapping.graph_args(self.config, self.config_file)
        self.tensors = find_tensors(path)
        self.names: dict[str, str] = {}        # graph fqn (tied ones too) -> checkpoint name read (filled by check)
        self.saved: dict[str, list[str]] = {}  # checkpoint name -> the graph fqns holding it (several when tied)

    @property
    def vocab_size(self) -> int:
        return int(_get(self.config, self.mapping.vocab_key))

    @property
    def dtype(self) -> torch.dtype:
        """config.json's dtype (torch_dtype before transformers 5), else the embedding's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return next(i.dtype for i in self.tensors.values() if i.dtype.is_floating_point)

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        module, _, cls = self.mapping.graph.rpartition(".")
        with torch.device("meta"):
            return getattr(importlib.import_module(module), cls)(**self.args).to(dtype)

    def check(self, model: torch.nn.Module, seq_len: int) -> None:
        """Every parameter of the meta model against the headers; nothing is read. Fills names/aliases."""
        for key in self.mapping.seq_limit:
            limit = _get(self.config, key)
            if isinstance(limit, int) and seq_len > limit:
                raise CheckpointError(f"{self.config_file}: sequence length {seq_len} exceeds {key}={limit}, which "
                                      f"{self.mapping.graph} does not implement; use at most {limit} tokens")
        groups: dict[int, list] = {}  # tied parameters (lm_head = embed) form one group: one tensor, any name
        for fqn, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append((fqn, p))
        expected = self.dtype
        for members in groups.values():
            found = []
            for fqn, p in members:
                name = self.mapping.to_checkpoint(fqn)
                if name is None:
                    raise CheckpointError(f"{self.mapping.file}: graph parameter {fqn} has no checkpoint name; add "
                                          f"it to `names`")
                info = self.tensors.get(name)
                if info is None:
                    continue
                if info.shape != tuple(p.shape):
                    raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, "
                                          f"{self.config_file.name} implies {list(p.shape)} for {fqn}; the config "
                                          f"disagrees with the tensors")
                if info.dtype != expected:
                    raise CheckpointError(f"{info.file}: tensor {name} is {str(info.dtype).removeprefix('torch.')}, "
                                          f"the checkpoint is {str(expected).removeprefix('torch.')} (config.json "
                                          f"dtype); re-save it in one dtype")
                found.append(name)
            if not found:
                fqn, p = members[0]
                raise CheckpointError(f"{self.path}: tensor {self.mapping.to_checkpoint(fqn)} (graph {fqn}, "
                                      f"{list(p.shape)}) is missing from the checkpoint ({len(self.tensors)} tensors "
                                      f"in {self._files()})")
            self.names.update({fqn: found[0] for fqn, _ in members})
            self.saved.update({name: [fqn for fqn, _ in members] for name in found})
        used = set(self.saved)
        for name, info in self.tensors.items():
            if name not in used and not self.mapping.ignored(name):
                raise CheckpointError(f"{info.file}: tensor {name} is not used by {self.mapping.graph} built from "
                                      f"{self.config_file.name} ({self.mapping.to_graph(name) or 'no graph name'}); "
                                      f"the config disagrees with the tensors")

    def _files(self) -> str:
        files = sorted({i.file.name for i in self.tensors.values()})
        return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

    def source(self, fqn: str) -> torch.Tensor:
        return map_tensor(self.tensors[self.names[fqn]])

    def fingerprint(self) -> dict:
        """What identifies the checkpoint for the cache key, without hashing its bytes."""
        files = sorted({i.file for i in self.tensors.values()})
        return {"path": str(self.path.resolve()), "config": self.config,
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}

    def artifact_files(self) -> dict:
        """Files to copy into the artifact: config, generation config and tokenizer, and the name map."""
        out = {name: self.path / name for name in SIDE_FILES if (self.path / name).is_file()}
        order = sorted(self.saved, key=lambda n: (self.tensors[n].file.name, self.tensors[n].start))
        out[MAP_FILE] = json.dumps({"mapping": self.mapping.file.name, "tensors": {  # checkpoint order
            n: {"fqns": self.saved[n], "dtype": NAMES[self.tensors[n].dtype]} for n in order}}, indent=1).encode()
        return out


# ---------------------------------------------------------------------------------------------- export

def parse_size(size) -> int:
    """'5GB' (1e9), '100KB', '2GiB' (2**30) or an int -> bytes, as transformers' max_shard_size reads it."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use a number of bytes or e.g. 100KB, 5GB, 2GiB")
    scale = (1024 if m[3] else 1000) ** " KMGT".index(m[2] or " ")
    return int(float(m[1]) * scale)


def export_checkpoint(artifact, out_dir, max_shard_size="5GB") -> list[Path]:
    """Merge an artifact's rank shards into a Hugging Face checkpoint directory (written aside, then renamed
    into place). Each tensor is merged alone: memory stays near the largest one."""
    from tpcompile.artifact import check_files, read_manifest
    artifact, out_dir = Path(artifact), Path(out_dir)
    m = read_manifest(artifact)
    if not (artifact / MAP_FILE).is_file():
        raise CheckpointError(f"{artifact}: has no {MAP_FILE}; only artifacts compiled from a checkpoint "
                              f"(`tpcompile compile model=hf model.path=DIR`) can be exported")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new directory")
    side = [n for n in SIDE_FILES if n in m.files]
    check_files(m, artifact, [MAP_FILE, *side] + [m.rank_file(r) for r in range(m.tp)])
    table = json.loads((artifact / MAP_FILE).read_text())
    ranks = [read_header(artifact / m.rank_file(r))[0] for r in range(m.tp)]
    entries = []  # (checkpoint name, the fqn the artifact holds it under, checkpoint dtype)
    for name, t in table["tensors"].items():
        held = [f for f in t["fqns"] if f in m.params]
        if not held:
            raise CheckpointError(f"{artifact / MAP_FILE}: tensor {name} (graph {t['fqns']}) is not in the artifact")
        entries.append((name, held[0], DTYPES[t["dtype"]]))

    limit, files, size = parse_size(max_shard_size), [[]], 0
    for entry in entries:  # greedy, in checkpoint order, as transformers splits
        n = _numel(m.params[entry[1]]["global"]) * entry[2].itemsize
        if files[-1] and size + n > limit:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += n
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        total, weight_map = 0, {}
        for file, group in zip(names, files):
            specs = {name: (tuple(m.params[fqn]["global"]), dt) for name, fqn, dt in group}
            with StreamWriter(staging / file, specs, {"format": "pt"}) as w:
                for name, fqn, dt in group:
                    t = _merge(fqn, m.params[fqn]["placement"], lambda f, r: _piece(m, ranks, f, r), m.tp).to(dt)
                    w.write(name, t)
                    total += t.numel() * t.element_size()
                    weight_map[name] = file
        if len(names) > 1:
            (staging / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
        for name in side:
            shutil.copyfile(artifact / name, staging / name)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


def _piece(m, ranks: list[dict], fqn: str, rank: int) -> torch.Tensor:
    """Rank `rank`'s local tensor of `fqn`, also when fuse_linears stored it inside a fused weight."""
    if fqn in ranks[rank]:
        return read_tensor(ranks[rank][fqn])
    for name, parts in m.fused.items():
        if fqn in parts:
            sizes = [m.params[p]["local"][0] for p in parts]
            return read_tensor(ranks[rank][name]).split(sizes, 0)[parts.index(fqn)]
    raise CheckpointError(f"parameter {fqn}: not in rank {rank}'s file; recompile the artifact")


def _merge(fqn: str, placement: str, piece, tp: int) -> torch.Tensor:
    """Rank pieces -> the global tensor. 'S(d)/w': piece p lives on rank p * tp // w; 'R': rank 0 has it all."""
    if placement == "R":
        return piece(fqn, 0)
    m = re.fullmatch(r"S\((-?\d+)\)/(\d+)", placement)
    if not m:
        raise CheckpointError(f"parameter {fqn}: placement {placement!r} cannot be merged into one tensor")
    dim, ways = int(m[1]), int(m[2])
    return torch.cat([piece(fqn, p * tp // ways) for p in range(ways)], dim=dim)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
