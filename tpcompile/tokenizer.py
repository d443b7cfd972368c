"""Text in, text out: bytes for the random-weight presets; the checkpoint's own tokenizer (transformers'
AutoTokenizer over the files that travel with the artifact, never the network) for checkpoints.

    tokenizer_for(artifact_dir)    .encode(text) / .decode(ids) / .apply_chat_template(messages) -> ids
    eos_ids(artifact_dir, eos)     the ids that end a row: `eos` when given, else all of generation_config.json's
    prompt_ids(tok, text, chat)    the prompt's ids; chat: as a user message through the chat template
"""
import json
from pathlib import Path

# the tokenizer's files in a checkpoint directory: copied into the artifact with config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class ByteTokenizer:
    """UTF-8 bytes are the token ids 0..255: any model with vocab >= 256 can 'read' text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """The checkpoint's tokenizer through transformers' AutoTokenizer, from local files only."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: its tokenizer files do not load with transformers' AutoTokenizer "
                             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
                             ) from None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int] | None:
        """The chat's ids through the checkpoint's template; None when it has none."""
        if not self.has_chat_template:
            return None
        out = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def tokenizer_for(artifact_dir: Path):
    d = Path(artifact_dir)
    has = (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()
    return HFTokenizer(d) if has else ByteTokenizer()


def eos_ids(artifact_dir: Path, eos: int | None = None) -> list[int]:
    """The token ids that end a row: `eos` when set, else every eos id of the checkpoint's generation_config.json
    (then config.json's), none for the random-weight presets."""
    if eos is not None:
        return [eos]
    for name in ("generation_config.json", "config.json"):
        file = Path(artifact_dir) / name
        found = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
        if found is not None:
            return list(found) if isinstance(found, list) else [found]
    return []


def prompt_ids(tok, text: str, chat: bool = False) -> list[int]:
    """The prompt's token ids; chat: `text` as one user message through the tokenizer's chat template."""
    if not chat:
        return tok.encode(text)
    ids = getattr(tok, "apply_chat_template", lambda m: None)([{"role": "user", "content": text}])
    if ids is None:
        raise ValueError("generation.chat=true: this artifact's tokenizer has no chat template (tokenizer_config.json "
                         "chat_template or chat_template.jinja); drop chat=true or use a checkpoint with one")
    return ids
