"""End to end on real gloo workers: compile, run on tp processes, compare with the unsharded model."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import tpcompile
from tpcompile.cli import cmd_verify


# inductor at tp=2 only (~10 s per compile): tp=4 has the same ops and collectives with smaller shapes
@pytest.mark.parametrize("model, tp, backend", [
    *[pytest.param(model, tp, "eager", marks=[pytest.mark.slow] if tp == 4 else [])  # tp=2 runs the same passes
      for model in ("llama_tiny", "mlp") for tp in (1, 2, 4)],
    *[pytest.param(model, 2, "inductor", marks=pytest.mark.slow) for model in ("llama_tiny", "mlp")]])
def test_sharded_matches_unsharded(job_config, model, tp, backend):
    record = cmd_verify(job_config(f"model={model}", f"tp={tp}", f"backend={backend}"))
    assert record["ok"], record
    assert record["max_rel_err"] <= 1e-5
    assert (record["max_abs_err"] > 0) == (tp > 1 or backend == "inductor") or record["max_abs_err"] < 1e-6


@pytest.mark.slow
def test_rerun_reuses_the_artifact(job_config):
    first = cmd_verify(job_config("tp=2"))
    second = cmd_verify(job_config("tp=2"))
    assert first["artifact"] == second["artifact"]
    other = cmd_verify(job_config("tp=2", "model.seed=7"))
    assert other["artifact"] != first["artifact"] and other["ok"]


@pytest.mark.parametrize("tp, plan", [(1, "megatron"), (2, "auto")])  # auto cuts lm_head by vocabulary
def test_tied_embeddings_stay_tied(job_config, tp, plan):
    """lm_head.weight is embed.weight: the graph reads the one tensor under one name (the lookup and the head),
    so every rank file holds it once, cut by its placement, with the values of the unsharded model's table."""
    from tpcompile.pipeline import load_model
    job = job_config("model.graph.tie_embeddings=true", f"tp={tp}", f"plan={plan}")
    record = cmd_verify(job)
    assert record["ok"] and record["max_rel_err"] <= 1e-5, record
    path = Path(record["artifact"])
    params = json.loads((path / "manifest.json").read_text())["params"]
    assert "embed.weight" not in params  # not a second copy
    placement = params["lm_head.weight"]["placement"]
    model = load_model(job, seq_len=16)
    table = model.source("embed.weight")  # (V, C): the unsharded model's one table
    for r in range(tp):
        head = load_file(path / f"rank{r}.safetensors")["lm_head.weight"]  # (V / tp or V, C)
        rows = len(head) * r if placement.startswith("S(0)") else 0
        assert table.shape == (256, 64) and torch.equal(head, table[rows:rows + len(head)]), (r, placement)


class GPTish(nn.Module):
    """Not from graphs/: biased Linear layers, LayerNorm, learned position embeddings, its own attention."""

    def __init__(self, vocab=50, dim=32, heads=4, ctx=8):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        B, T = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        h = self.ln1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, -1))
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.head(self.ln_f(x))


PLAN = {"q.*": "colwise", "k.*": "colwise", "v.*": "colwise", "o.weight": "rowwise",
        "up.*": "colwise", "down.weight": "rowwise"}


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_user_module_through_the_python_api(tmp_path, tp):
    torch.manual_seed(0)
    model = GPTish().eval()
    ids = torch.randint(0, 50, (2, 8))
    report = tpcompile.verify(model, (ids,), tp=tp, plan=PLAN, out_dir=tmp_path)
    assert report.ok and report.max_rel_err <= 1e-5, report


@pytest.mark.slow
def test_session_keeps_workers_between_calls(tmp_path):
    torch.manual_seed(0)
    model = GPTish().eval()
    ids = torch.randint(0, 50, (2, 8))
    artifact = tpcompile.compile(model, (ids,), tp=2, plan=PLAN, out_dir=tmp_path)
    assert tpcompile.load(artifact.path).tp == 2
    with artifact.session() as session:
        pids = [s["pid"] for s in session.group.status()]
        for seed in range(3):
            x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(session(x), model(x), rtol=1e-5, atol=1e-5)
        assert [s["pid"] for s in session.group.status()] == pids
    with pytest.raises(Exception, match=r"input arg0: expected shape \[2, 8\] int64, got \[2, 9\]"):
        artifact.run(torch.zeros(2, 9, dtype=torch.long))


def test_per_layer_names_the_first_block_that_diverges(job_config):
    """A wrong weight on one rank in block 1 only: block 0 still matches, block 1 is named."""
    from safetensors.torch import save_file

    from tpcompile.artifact import sha256_file
    good = cmd_verify(job_config("tp=2", "verify.per_layer=true"))
    assert good["ok"] and good["first_divergent"] is None and set(good["per_layer"]) == {"layers.0", "layers.1"}
    path = Path(good["artifact"])
    tensors = load_file(path / "rank1.safetensors")
    tensors["layers.1.mlp.w_down.weight"] += 0.05  # what a wrong slice or rewrite would do to rank 1
    save_file(tensors, path / "rank1.safetensors", {"format": "pt"})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["rank1.safetensors"] = sha256_file(path / "rank1.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    bad = cmd_verify(job_config("tp=2", "verify.per_layer=true"))
    assert bad["artifact"] == good["artifact"] and not bad["ok"]
    assert bad["first_divergent"] == "layers.1" and bad["per_layer"]["layers.0"]["ok"]
