"""The OpenAI request bodies the server accepts, and their errors as one line.

Fields of the OpenAI API that the engines do not implement are accepted at their neutral value and refused
(400, naming the field) otherwise; a field the API does not have is refused too. Extensions: top_k (0 or -1:
off), return_token_ids (the generated token ids in each choice), and vLLM's ignore_eos and
stream_options.continuous_usage_stats (usage in every chunk), which load generators send.
"""
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class BadRequest(ValueError):
    """400: the message names the field, the value and the limit; param is the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    user: Optional[str] = None
    # accepted only at their neutral value
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict] = None

    def unsupported(self) -> list[str]:
        bad = [f for f in ("frequency_penalty", "presence_penalty") if getattr(self, f)]
        return bad + (["logit_bias"] if self.logit_bias else []) + (["n"] if self.n != 1 else [])


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> list[str]:
        extra = [f for f in ("echo", "logprobs", "suffix") if getattr(self, f)]
        return super().unsupported() + extra + (["best_of"] if self.best_of not in (None, 1) else [])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + (["logprobs"] if self.logprobs else []) + \
            (["top_logprobs"] if self.top_logprobs else [])


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's first error as one line, and the field it is about."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    if e.get("type") == "extra_forbidden":
        return f"unknown field {field!r}; this server accepts the OpenAI fields plus top_k, return_token_ids and " \
               f"ignore_eos", field
    if e.get("type") == "missing":
        return f"missing field {field!r}", field
    got = e.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{field or 'body'}: {e.get('msg')} (got {shown[:80]})", field
