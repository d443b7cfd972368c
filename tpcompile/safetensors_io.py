"""The safetensors format read and written one tensor at a time, so memory stays near one tensor.

    file = u64 little-endian N | N bytes of JSON {name: {dtype, shape, data_offsets: [a, b]}, "__metadata__": {...}}
           | data (offsets relative to the byte after the header; tensors back to back, no gaps)

safetensors' own `save_file` needs every tensor in memory at once, and its `load_file` copies the whole file;
here a header is parsed once (with checks that name the file and the tensor), a tensor is read with one
pread into its own buffer or mapped from the file, and a file is written from its header out, tensor by
tensor, when every name, shape and dtype is known up front. Nothing here unpickles.
"""
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit


class SafetensorsError(ValueError):
    """A file that is not valid safetensors: the message names the file, the tensor and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple
    start: int   # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path) -> tuple[dict[str, TensorInfo], dict]:
    """name -> TensorInfo, and the file's __metadata__. Every offset is checked against the file size, so a
    truncated or corrupted file fails here, before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit the file of {size} bytes "
                                   f"(truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e.__class__.__name__}: {e}); "
                               f"the file is corrupted") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object; the file is corrupted")
    meta = header.pop("__metadata__", None) or {}
    base, infos, expect = 8 + n, {}, 0
    for name, entry in sorted(header.items(), key=lambda kv: _offsets(path, kv[0], kv[1])[0]):
        a, b = _offsets(path, name, entry)
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name}: unknown dtype {entry.get('dtype')!r}; the file is corrupted "
                                   f"or uses a dtype this tpcompile does not read ({sorted(DTYPES)})")
        shape = tuple(entry.get("shape", ()))
        numel = 1
        for s in shape:
            numel *= s
        if a != expect or b - a != numel * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name}: data_offsets [{a}, {b}] do not match its shape "
                                   f"{list(shape)} {entry['dtype']} after {expect} bytes; the file is corrupted")
        if base + b > size:
            raise SafetensorsError(f"{path}: tensor {name} ends at byte {base + b}, the file has {size} bytes "
                                   f"(truncated)")
        infos[name] = TensorInfo(path, name, dtype, shape, base + a, base + b)
        expect = b
    return infos, meta


def _offsets(path, name, entry) -> tuple[int, int]:
    off = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) and o >= 0 for o in off)
            and off[0] <= off[1]):
        raise SafetensorsError(f"{path}: tensor {name}: bad header entry {entry!r}; the file is corrupted")
    return off[0], off[1]


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """The whole tensor, read with pread into fresh memory (no mmap: freed when dropped)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    own = fd is None
    fd = os.open(info.file, os.O_RDONLY) if own else fd
    try:
        pread_into(fd, buf, info.start)
    finally:
        if own:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


def map_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor as a view of a private (copy-on-write) mapping of its bytes in the file, unmapped when the tensor
    is freed. No copy into fresh memory: the page cache's pages are used as they are, and a tensor written on to
    another file is copied once, by the kernel (a pread into new memory first was ~half the re-shard's time).
    The file must not be truncated while the tensor lives (SIGBUS, as with any mapping)."""
    if info.nbytes < 1 << 20:  # small ones are read: one syscall, no mapping to set up and tear down
        return read_tensor(info)
    base = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    fd = os.open(info.file, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, info.end - base, access=mmap.ACCESS_COPY, offset=base)
    finally:
        os.close(fd)
    mapped.madvise(mmap.MADV_WILLNEED)  # start reading all of it now, not page by page at the first touch
    raw = torch.frombuffer(mapped, dtype=torch.uint8, offset=info.start - base, count=info.nbytes)  # holds `mapped`
    if info.start % info.dtype.itemsize:  # safetensors packs tensors back to back: realign the rare odd one
        raw = raw.clone()
    return raw.view(info.dtype).reshape(info.shape)


def pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill a uint8 CPU tensor from the file at offset (short reads retried; EOF is an error)."""
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsError(f"file descriptor {fd}: unexpected end of file at byte {offset + done} (truncated)")
        done += n


class StreamWriter:
    """A safetensors file written tensor by tensor: `specs` {name: (shape, dtype)} fixes the header (and the
    order) up front; `write(name, tensor)` appends the bytes. A tensor may also come as consecutive blocks of
    its dim 0 (several writes of one name: a fused weight, part by part, without a concatenated copy).
    `close()` checks that everything came."""

    def __init__(self, path, specs: dict[str, tuple], metadata: dict | None = None):
        self.path, self.order, self.next, self.rows = Path(path), list(specs), 0, 0  # rows of order[next] written
        header, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            numel = 1
            for s in shape:
                numel *= s
            n = numel * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.specs = {k: (tuple(s), d) for k, (s, d) in specs.items()}
        if metadata:
            header = {"__metadata__": {k: str(v) for k, v in metadata.items()}, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.file = open(self.path, "wb", buffering=0)  # tensors are written whole: no buffer copy
        self._write(memoryview(struct.pack("<Q", len(raw)) + raw))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise ValueError(f"{self.path}: wrote {name!r}, expected {expected!r} (tensors go in header order)")
        shape, dtype = self.specs[name]
        block = tuple(tensor.shape)
        rows = block[0] if block else 1  # a 0-d tensor is one block
        if tensor.dtype != dtype or len(block) != len(shape) or block[1:] != shape[1:] or \
                self.rows + rows > (shape[0] if shape else 1):
            raise ValueError(f"{self.path}: tensor {name}: got {list(block)} {tensor.dtype}"
                             f"{f' after {self.rows} rows' if self.rows else ''}, the header says {list(shape)} {dtype}")
        self._write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.rows += rows
        if self.rows == (shape[0] if shape else 1):
            self.next, self.rows = self.next + 1, 0

    def _write(self, data) -> None:
        done = 0
        while done < len(data):  # an unbuffered write may be short (over 2 GiB, or a signal)
            done += self.file.write(data[done:])

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensor(s) not written, first "
                             f"{self.order[self.next]!r}")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()
