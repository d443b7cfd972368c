"""Tokenizers for `tpcompile generate`: bytes for random-weight presets; a local HF tokenizer.json when the
artifact carries one (checkpoints)."""
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes are the token ids 0..255: any model with vocab >= 256 can 'read' text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def tokenizer_for(artifact_dir: Path):
    path = Path(artifact_dir) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else ByteTokenizer()
