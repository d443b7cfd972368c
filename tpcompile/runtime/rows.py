"""The rows of the KV cache as independent sequences, for a server that batches requests continuously.

One op, "rows_step", does in order what a scheduler asks between two decode steps:

    {"release": [row, ...],          rows that stop now (a client went away, a stop string was seen)
     "decode": n,                    n decode steps of every running row, each sampled with its own options
     "prefill": [{"row": r, "tokens": [...], "pos": p, "start": {...} | None}, ...]}
                                     one chunk per row: <= prefill_chunk tokens at positions p, p+1, ...;
                                     "start" on a prompt's last chunk: the row samples its first token and runs
    reply (rank 0): {"tokens": [[row, token], ...], "ended": [[row, "stop" | "length"], ...]}

A row ends by itself when it samples one of its stop ids or has made max_new_tokens tokens; it is free for
the next prompt at once. A row not in a call sits at the scratch position (max_seq), so the cache slots of
the others are untouched; a row's logits depend on its own tokens only, so greedy output is the same
whatever else is in the batch. Rank 0 samples and broadcasts the tokens: the rows' stop decisions, taken on
every rank, can never diverge.

The n decode steps of a call run without the host reading a token: each row's end (a stop id, its budget) is
also kept on the device (alive, left), which moves an ended row to the scratch position at once, as the host
would. The host reads the n steps' tokens with one copy and drops a row's tokens after its end. On a GPU
(lookahead) the first step of the next call is queued before that copy is waited for, so the device decodes
while the host answers and the scheduler plans; the next call reads it as its first decode step (a row
released by that call drops its token; the step only wrote the row's own cache slot).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpcompile.runtime.generate import sample


@dataclass
class Row:
    remaining: int                     # tokens still to make
    stop: frozenset                    # token ids that end the row (eos)
    options: tuple                     # (temperature, top_k, top_p)
    generator: torch.Generator | None  # rank 0 only
    pos: int                           # the position its next decode step writes


class Rows:
    def __init__(self, engine, rank: int, world_size: int, lookahead: bool | None = None):
        self.engine, self.rank, self.world_size = engine, rank, world_size
        spec = engine.manifest.generation
        self.B, self.S, self.chunk = spec["max_batch"], spec["max_seq"], spec["prefill_chunk"]
        self.vocab, self.device = spec["vocab_size"], engine.device
        # on the CPU a step queued ahead would not overlap anything
        self.lookahead = self.device.type == "cuda" if lookahead is None else lookahead
        self.tokens = torch.zeros(self.B, dtype=torch.long, device=self.device)  # the next decode input
        self.running: dict[int, Row] = {}
        self.queued: torch.Tensor | None = None  # (B,) tokens of a step run ahead, not read by the host yet
        self._upload()

    def step(self, release: list[int] = (), decode: int = 0, prefill: list[dict] = ()) -> dict:
        """decode: how many decode steps of the running rows (True: one); the rows that end on the way stop."""
        out, ended = [], []
        steps, n = ([self.queued], int(decode) - 1) if self.queued is not None else ([], int(decode))
        self.queued = None
        if [r for r in release if self.running.pop(r, None) is not None]:
            if steps:  # the host's rows must include the step run ahead before the device's are written
                out += self._read(steps, ended)
                steps = []
            self._upload()
        for c in prefill:
            self._check_chunk(c)
        if n > 0 and self.running:  # no step past the largest budget; stop ids end rows on the device
            steps += self._decode(min(n, max(r.remaining for r in self.running.values()) - len(steps)))
        if steps:
            out += self._read(steps, ended, ahead=self.lookahead and not prefill)
        if prefill:
            out += self._prefill(prefill, ended)
            if self.lookahead and self.running:
                self.queued = self._decode(1)[0]
        return {"tokens": out, "ended": ended} if self.rank == 0 else {}

    def _decode(self, n: int) -> list[torch.Tensor]:
        """Queue n decode steps of the running rows; their (B,) tokens stay on the device."""
        rows, made = sorted(self.running), []
        for _ in range(n):
            logits = self.engine.graphs["decode"](self.tokens[:, None], self.positions[:, None])
            self.tokens = self._sample(logits, rows)
            # a row ends after its last budgeted token or on a stop id; an ended row goes to the scratch slot
            self.left = self.left - self.alive.long()
            hit = (self.tokens[:, None] == self.stops).any(dim=-1)  # (B, K) -> (B,)
            self.alive = self.alive & (self.left > 0) & ~hit
            self.positions = torch.where(self.alive, self.positions + 1, self.S)  # new: an engine may keep the old
            made.append(self.tokens)
            if self.device.type != "cuda" and not self.alive.any():  # on the CPU knowing it is free
                break
        return made

    def _read(self, steps: list[torch.Tensor], ended: list, ahead: bool = False) -> list:
        """The tokens of `steps` on the host (one copy), each running row's up to the one that ends it. ahead:
        queue the next decode step before waiting for the copy (if a row has budget left after these)."""
        made = torch.stack(steps)  # (n, B)
        if self.device.type == "cuda":
            host = torch.empty(made.shape, dtype=made.dtype, pin_memory=True)
            host.copy_(made, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if ahead and any(row.remaining > len(steps) for row in self.running.values()):
            self.queued = self._decode(1)[0]
        if self.device.type == "cuda":
            copied.synchronize()
            made = host
        out, live = [], sorted(self.running)
        for tokens in made.tolist():
            for r in live:  # the step wrote the row's input token at pos
                self.running[r].pos += 1
            out += self._advance(live, tokens, ended)
            live = [r for r in live if r in self.running]
        return out

    def _prefill(self, chunks: list[dict], ended: list) -> list:
        ids = torch.zeros(self.B, self.chunk, dtype=torch.long)
        pos = torch.full((self.B, self.chunk), self.S, dtype=torch.long)
        for c in chunks:  # left-padded: the last token of the chunk is real, its logits are the ones returned
            n = len(c["tokens"])
            ids[c["row"], self.chunk - n:] = torch.tensor(c["tokens"], dtype=torch.long)
            pos[c["row"], self.chunk - n:] = torch.arange(c["pos"], c["pos"] + n)
        logits = self.engine.graphs["prefill"](ids.to(self.device), pos.to(self.device))
        starting = sorted((c for c in chunks if c.get("start")), key=lambda c: c["row"])
        if not starting:
            return []
        for c in starting:
            s = c["start"]
            gen = torch.Generator(device=self.device).manual_seed(s["seed"]) if self.rank == 0 else None
            self.running[c["row"]] = Row(s["max_new_tokens"], frozenset(s.get("stop", ())),
                                         (s["temperature"], s["top_k"], s["top_p"]), gen, c["pos"] + len(c["tokens"]))
        rows = [c["row"] for c in starting]
        first = self._sample(logits, rows)
        index = torch.tensor(rows, device=self.device)
        self.tokens = self.tokens.index_copy(0, index, first[index])
        out = self._advance(rows, first.tolist(), ended)
        self._upload()
        return out

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """(B,) tokens: each of `rows` sampled with its own options and generator on rank 0, then broadcast."""
        if self.rank == 0:
            tokens = logits.argmax(dim=-1)
            for r in rows:
                row = self.running[r]
                if row.options[0] > 0:
                    tokens[r] = sample(logits[r:r + 1], *row.options, row.generator)[0]
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.long, device=self.device)
        if self.world_size > 1:
            dist.broadcast(tokens, src=0)
        return tokens

    def _advance(self, rows: list[int], tokens: list[int], ended: list) -> list:
        """Count each row's new token (tokens: one per row of the batch); end rows that hit a stop id or their
        budget (every rank alike)."""
        for r in rows:
            row, t = self.running[r], tokens[r]
            row.remaining -= 1
            if t in row.stop or row.remaining <= 0:
                ended.append([r, "stop" if t in row.stop else "length"])
                del self.running[r]
        return [[r, tokens[r]] for r in rows]

    def _upload(self) -> None:
        """The device's copy of the rows' state, from the host's (after rows join or leave): positions (B,),
        alive (B,), tokens left (B,) and stop ids (B, K), -1 padded. A free row sits at the scratch position."""
        positions = torch.full((self.B,), self.S, dtype=torch.long)
        left = torch.zeros(self.B, dtype=torch.long)
        stops = torch.full((self.B, max([len(r.stop) for r in self.running.values()] + [1])), -1, dtype=torch.long)
        for r, row in self.running.items():
            positions[r], left[r] = row.pos, row.remaining
            stops[r, :len(row.stop)] = torch.tensor(sorted(row.stop), dtype=torch.long)
        self.positions, self.left, self.stops = (t.to(self.device) for t in (positions, left, stops))
        self.alive = self.left > 0

    def _check_chunk(self, c: dict) -> None:
        """The scheduler's contract; a breach is a bug there, refused before any graph runs."""
        row, n, pos = c["row"], len(c["tokens"]), c["pos"]
        if not 0 <= row < self.B or row in self.running:
            raise ValueError(f"prefill of row {row}: not a free row of max_batch={self.B}")
        if not 0 < n <= self.chunk or pos < 0 or pos + n > self.S:
            raise ValueError(f"prefill of row {row}: {n} tokens at position {pos} do not fit a chunk of "
                             f"{self.chunk} below max_seq={self.S}")
        if c.get("start") and pos + n + c["start"]["max_new_tokens"] - 1 > self.S:
            raise ValueError(f"row {row}: {pos + n} prompt tokens + max_new_tokens="
                             f"{c['start']['max_new_tokens']} pass max_seq={self.S}")
        if any(not 0 <= t < self.vocab for t in c["tokens"]):
            raise ValueError(f"prefill of row {row}: a token id outside the vocabulary [0, {self.vocab})")
