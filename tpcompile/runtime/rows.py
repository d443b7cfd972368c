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


class Rows:
    def __init__(self, engine, rank: int, world_size: int):
        self.engine, self.rank, self.world_size = engine, rank, world_size
        spec = engine.manifest.generation
        self.B, self.S, self.chunk = spec["max_batch"], spec["max_seq"], spec["prefill_chunk"]
        self.vocab, self.device = spec["vocab_size"], engine.device
        self.positions = torch.full((self.B,), self.S, dtype=torch.long, device=self.device)  # next position
        self.tokens = torch.zeros(self.B, dtype=torch.long, device=self.device)  # the next decode input
        self.running: dict[int, Row] = {}
        self.step_mask = torch.zeros(self.B, dtype=torch.long, device=self.device)  # 1 for running rows

    def step(self, release: list[int] = (), decode: int = 0, prefill: list[dict] = ()) -> dict:
        """decode: how many decode steps of the running rows (True: one); the rows that end on the way stop."""
        for row in release:
            self._end(row)
        for c in prefill:
            self._check_chunk(c)
        out, ended = [], []
        for _ in range(int(decode)):
            if not self.running:
                break
            logits = self.engine.graphs["decode"](self.tokens[:, None], self.positions[:, None])
            self.positions = self.positions + self.step_mask  # a new tensor: an engine may keep the old one
            rows = sorted(self.running)
            self.tokens = self._sample(logits, rows)
            out += self._advance(rows, self.tokens, ended)
        if prefill:
            out += self._prefill(prefill, ended)
        return {"tokens": out, "ended": ended} if self.rank == 0 else {}

    def _prefill(self, chunks: list[dict], ended: list) -> list:
        ids = torch.zeros(self.B, self.chunk, dtype=torch.long)
        pos = torch.full((self.B, self.chunk), self.S, dtype=torch.long)
        for c in chunks:  # left-padded: the last token of the chunk is real, its logits are the ones returned
            n = len(c["tokens"])
            ids[c["row"], self.chunk - n:] = torch.tensor(c["tokens"], dtype=torch.long)
            pos[c["row"], self.chunk - n:] = torch.arange(c["pos"], c["pos"] + n)
        logits = self.engine.graphs["prefill"](ids.to(self.device), pos.to(self.device))
        starting = [c for c in chunks if c.get("start")]
        if not starting:
            return []
        for c in starting:
            s = c["start"]
            gen = torch.Generator(device=self.device).manual_seed(s["seed"]) if self.rank == 0 else None
            self.running[c["row"]] = Row(s["max_new_tokens"], frozenset(s.get("stop", ())),
                                         (s["temperature"], s["top_k"], s["top_p"]), gen)
        rows = sorted(c["row"] for c in starting)
        first = self._sample(logits, rows)
        index = torch.tensor(rows, device=self.device)
        self.tokens = self.tokens.index_copy(0, index, first[index])
        next_pos = torch.tensor([c["pos"] + len(c["tokens"]) for c in sorted(starting, key=lambda c: c["row"])],
                                device=self.device)
        self.positions = self.positions.index_copy(0, index, next_pos)
        self._update_mask()
        return self._advance(rows, first, ended)

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

    def _advance(self, rows: list[int], tokens: torch.Tensor, ended: list) -> list:
        """Count each row's new token; end rows that hit a stop id or their budget (every rank alike)."""
        values = tokens[rows].tolist()
        for r, t in zip(rows, values):
            row = self.running[r]
            row.remaining -= 1
            if t in row.stop or row.remaining <= 0:
                ended.append([r, "stop" if t in row.stop else "length"])
                self._end(r)
        return [[r, t] for r, t in zip(rows, values)]

    def _end(self, row: int) -> None:
        if self.running.pop(row, None) is not None:
            self.positions = self.positions.index_fill(0, torch.tensor([row], device=self.device), self.S)
            self._update_mask()

    def _update_mask(self) -> None:
        mask = torch.zeros(self.B, dtype=torch.long)
        mask[list(self.running)] = 1
        self.step_mask = mask.to(self.device)

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
