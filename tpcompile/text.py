"""Text around the token ids: incremental detokenizing with stop strings, and chat prompts.

A streamed response and a whole one are made by the same TextStream, so their texts are equal: a delta is
released only once it is final (no trailing half of a multi-byte character, no tail that may still grow into
a stop string).
"""


class TextStream:
    """Tokens in, text deltas out. decode() of a window of tokens: the text of the tokens read so far minus
    the text of those before them (a tokenizer may merge a token with its neighbours when decoding)."""

    def __init__(self, tokenizer, stop: list[str], skip: frozenset = frozenset()):
        self.tok, self.stop, self.skip = tokenizer, [s for s in stop if s], skip
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the text already taken
        self.text = ""               # all final text so far (may hold a held-back tail)
        self.sent = 0                # len of text released
        self.stopped = False

    def add(self, token: int) -> str:
        """The delta this token releases ("" if none yet). After a stop string, nothing more."""
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not half a character
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest at the end (a trailing partial character decodes as U+FFFD)."""
        if not self.stopped:
            tail = self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix:self.read])):]
            self.text += tail
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:  # the stop string and what follows are not part of the output
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that may be the start of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat: through the tokenizer's chat template when it has one (apply_chat_template, a
    checkpoint's own); otherwise a plain fallback for models without a template (the random-weight presets):

        system: You are terse.
        user: Hello
        assistant:
    """
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None:
        out = apply(messages, add_generation_prompt=True)
        if out is not None:
            return list(out) if not isinstance(out, str) else tokenizer.encode(out)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return tokenizer.encode("\n".join(lines + ["assistant:"]))
