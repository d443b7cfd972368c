"""Length-prefixed messages between the launcher and its workers over a local TCP socket.

A message is a dict of JSON data in which torch Tensors may appear at any depth. On the wire:

    header  "TPC1" | json_len (u64) | tensor_len (u64)        20 bytes, network order
    json    the message with every tensor replaced by {"__tensor__": "t<i>"}
    tensors safetensors.torch.save({"t<i>": tensor, ...})     absent when tensor_len == 0

No pickle: a peer can only make us build JSON values and plain tensors.
Every receive has a deadline; EOF and timeouts raise ChannelClosed / ChannelTimeout.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import struct
import threading
import time
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

_MAGIC = b"TPC1"
_HEADER = struct.Struct("!4sQQ")
_TENSOR_KEY = "__tensor__"
HELLO_MAX_BYTES = 64 * 1024  # a hello is a few hundred bytes; anything bigger is not one of ours
DEFAULT_MAX_BYTES = 1 << 40  # sanity bound: a garbage length must not make us allocate forever


class ChannelError(RuntimeError):
    """The connection is unusable: closed, timed out, or sent something that is not a frame."""


class ChannelClosed(ChannelError):
    """The peer closed the connection."""


class ChannelTimeout(ChannelError):
    """No complete message arrived before the deadline."""


# ---------------------------------------------------------------- encoding


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int], path: str) -> Any:
    """Copy `obj` with tensors swapped for references; collects the tensors into `tensors`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (views of one buffer): give repeats their own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {_TENSOR_KEY: key}
    if isinstance(obj, dict):
        if _TENSOR_KEY in obj:
            raise ValueError(f"message key {_TENSOR_KEY!r} at {path} is reserved for tensor references; rename it")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"message keys must be str, got {type(k).__name__} {k!r} at {path}")
            out[k] = _flatten(v, tensors, seen, f"{path}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(
        f"cannot send {type(obj).__name__} at {path}: messages hold JSON data (dict/list/str/int/float/bool/None) "
        f"and torch.Tensor only; convert it first"
    )


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_KEY in obj:
            return tensors[obj[_TENSOR_KEY]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def encode(msg: dict) -> list[bytes]:
    """Message -> [header, json, tensors] byte strings, ready for sendall in order."""
    if not isinstance(msg, dict):
        raise TypeError(f"a message is a dict, got {type(msg).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    body = json.dumps(_flatten(msg, tensors, set(), "message"), separators=(",", ":")).encode()
    blob = _st_save(tensors) if tensors else b""
    return [_HEADER.pack(_MAGIC, len(body), len(blob)), body, blob]


def decode(body: bytes, blob: bytes) -> dict:
    tensors = _st_load(blob) if blob else {}
    return _unflatten(json.loads(body), tensors)


# ---------------------------------------------------------------- the connection


class Channel:
    """One connected socket. send() is thread-safe; recv() is meant for a single reading thread."""

    def __init__(self, sock: socket.socket, *, send_timeout_s: float = 120.0):
        # The socket timeout bounds each sendall as a whole (Python >= 3.5); receives use poll with deadlines
        # instead, so a reader and a sender in two threads never fight over one timeout setting.
        sock.settimeout(send_timeout_s)
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # small frames (status, replies) go out at once
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._send_lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._broken: str | None = None

    def send(self, msg: dict) -> None:
        self.send_encoded(encode(msg))

    def send_encoded(self, parts: list[bytes]) -> None:
        """Send what encode() made: one message to many peers is encoded once."""
        with self._send_lock:
            try:
                for part in parts:
                    if part:
                        self.sock.sendall(part)
            except socket.timeout as e:
                raise ChannelTimeout(f"send of {sum(map(len, parts))} bytes did not finish in "
                                     f"{self.sock.gettimeout()} s: the peer stopped reading") from e
            except OSError as e:
                raise ChannelClosed(f"send failed, the peer is gone: {e}") from e

    def wait_readable(self, timeout_s: float) -> bool:
        """True when bytes (or EOF) are waiting; False after timeout_s."""
        return bool(self._poll.poll(max(0, int(timeout_s * 1000))))

    def recv(self, timeout_s: float, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
        """Next whole message, within timeout_s seconds in total."""
        if self._broken:
            raise ChannelError(f"channel unusable: {self._broken}")
        deadline = time.monotonic() + timeout_s
        magic, n_body, n_blob = _HEADER.unpack(self._recv_exact(_HEADER.size, deadline, timeout_s))
        if magic != _MAGIC:
            self._broken = f"bad frame magic {magic!r}"
            raise ChannelError(f"peer sent {magic!r} where a frame header (b'TPC1') was expected: not a tpcompile peer")
        if n_body + n_blob > max_bytes:
            self._broken = "oversized frame"
            raise ChannelError(f"frame of {n_body + n_blob} bytes exceeds the limit of {max_bytes} bytes")
        body = self._recv_exact(n_body, deadline, timeout_s)
        blob = self._recv_exact(n_blob, deadline, timeout_s)
        try:
            msg = decode(body, blob)
        except Exception as e:  # JSON or safetensors parse errors: the peer is not speaking our protocol
            raise ChannelError(f"undecodable frame ({n_body} + {n_blob} bytes): {type(e).__name__}: {e}") from e
        if not isinstance(msg, dict):
            raise ChannelError(f"a message must be a JSON object, got {type(msg).__name__}")
        return msg

    def _recv_exact(self, n: int, deadline: float, timeout_s: float) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_readable(remaining):
                if got:  # a half-read frame leaves the stream out of step
                    self._broken = "timed out mid-frame"
                raise ChannelTimeout(f"no complete message within {timeout_s:.1f} s (got {got} of {n} bytes)")
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except OSError as e:
                self._broken = str(e)
                raise ChannelClosed(f"receive failed, the peer is gone: {e}") from e
            if k == 0:
                self._broken = "EOF"
                raise ChannelClosed(f"peer closed the connection (got {got} of {n} bytes)")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- connecting and authenticating


def listen() -> socket.socket:
    """A listening socket on 127.0.0.1 with a kernel-chosen free port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    return server


def free_port() -> int:
    """A port that was free a moment ago (for MASTER_PORT; someone else may take it, rarely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accept(server: socket.socket, token: str, timeout_s: float) -> tuple[Channel, dict] | None:
    """Accept one connection and check its hello; None when nothing arrived or the token was wrong."""
    server.settimeout(timeout_s)
    try:
        sock, _ = server.accept()
    except socket.timeout:
        return None
    ch = Channel(sock)
    try:
        hello = ch.recv(timeout_s=10.0, max_bytes=HELLO_MAX_BYTES)
        # compare_digest: constant time, so the token cannot be guessed byte by byte from timings
        ok = hello.get("kind") == "hello" and hmac.compare_digest(str(hello.get("token", "")), token)
    except ChannelError:
        ok = False
    if not ok:
        ch.close()
        return None
    ch.send({"kind": "welcome"})
    return ch, hello


def connect(address: str, token: str, hello: dict, timeout_s: float) -> Channel:
    """Connect to the launcher at "host:port", authenticate with token, wait for its welcome."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    ch = Channel(sock)
    ch.send({**hello, "kind": "hello", "token": token})
    try:
        reply = ch.recv(timeout_s=timeout_s, max_bytes=HELLO_MAX_BYTES)
    except ChannelClosed as e:
        raise ChannelError(f"the launcher at {address} rejected this worker: wrong TPC_TOKEN?") from e
    if reply.get("kind") != "welcome":
        raise ChannelError(f"expected a welcome from the launcher at {address}, got {reply.get('kind')!r}")
    return ch
