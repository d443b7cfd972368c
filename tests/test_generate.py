"""Generation on the sharded engines against an unsharded reference loop that recomputes the whole
sequence without a cache."""
import pytest
import torch

from tpcompile.api import Artifact
from tpcompile.bench import summarize, table
from tpcompile.pipeline import build_generation, load_model
from tpcompile.runtime.generate import sample
from tpcompile.weights import materialize

PROMPTS = [[5, 17, 99, 3, 250, 7, 1], [42] * 20, [200, 1, 2]]  # three lengths: one, two chunks


@pytest.fixture(scope="module")
def reference():
    """llama_tiny with the same random weights, no cache."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tpcompile.config import CONF_DIR, register
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = OmegaConf.to_object(compose("config"))
    model = load_model(job, seq_len=job.generation.max_seq)
    return materialize(model.module, model.source, model.dtype)


def recompute(model, prompt, n):
    """Greedy tokens and last-position logits, recomputing the whole sequence each step."""
    seq, tokens, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            seq.append(tokens[-1])
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tpcompile.config import CONF_DIR, register
    register()
    out = tmp_path_factory.mktemp("engines")

    def make(tp, *overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            job = OmegaConf.to_object(compose("config", overrides=[f"tp={tp}", f"out_dir={out}", *overrides]))
        return Artifact(build_generation(job).path)
    return make


@pytest.mark.parametrize("tp", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_greedy_64_tokens_match_a_full_recompute(artifacts, reference, tp):
    artifact = artifacts(tp)
    with artifact.session() as s:
        got, logits = s.generate(PROMPTS, 64, return_logits=True, step_tokens=16)
    for row, prompt in enumerate(PROMPTS):
        want, want_logits = recompute(reference, prompt, 64)
        assert got[row] == want, f"row {row} at tp={tp}"
        # decode logits with the cache equal the recompute's at every step
        torch.testing.assert_close(logits[:, row], want_logits, rtol=1e-5, atol=1e-5)


def test_rows_at_different_positions_decode_as_each_alone(reference):
    """Continuous batching on the cached graph: a row joins while another is mid-generation, its prompt
    prefilled chunk by chunk between the other's decode steps (rows not in a call sit at the scratch position);
    a third joins later. Every row's greedy tokens and logits equal its own full recompute."""
    import copy
    model = copy.deepcopy(reference)
    B, S, chunk, n = 3, 64, 8, 12
    model.setup_cache(B, S)
    idle = torch.full((B, chunk), S)
    ids_of = {}  # row -> its tokens so far (prompt + generated)
    got = {row: ([], []) for row in range(B)}
    order = [(0, PROMPTS[0]), (1, PROMPTS[1]), (2, PROMPTS[2])]

    def decode():
        rows = sorted(r for r in ids_of if len(got[r][0]) < n)
        ids, pos = torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), S)
        for r in rows:
            ids[r, 0], pos[r, 0] = ids_of[r][-1], len(ids_of[r]) - 1
        with torch.no_grad():
            logits = model(ids, pos)
        for r in rows:
            token = int(logits[r].argmax())
            got[r][0].append(token), got[r][1].append(logits[r])
            ids_of[r].append(token)

    for row, prompt in order:
        total = -(-len(prompt) // chunk) * chunk
        ids, pos = torch.zeros(B, total, dtype=torch.long), idle.new_full((B, total), S)
        ids[row, total - len(prompt):], pos[row, total - len(prompt):] = torch.tensor(prompt), torch.arange(len(prompt))
        for c in range(0, total, chunk):
            with torch.no_grad():
                logits = model(ids[:, c:c + chunk], pos[:, c:c + chunk])
            if c + chunk < total:
                decode()  # the running rows go on between the chunks of the new prompt
        token = int(logits[row].argmax())
        got[row][0].append(token), got[row][1].append(logits[row])
        ids_of[row] = list(prompt) + [token]
        decode()
    while any(len(t) < n for t, _ in got.values()):
        decode()
    for row, prompt in order:
        want, want_logits = recompute(reference, prompt, n)
        assert got[row][0] == want, f"row {row}"
        torch.testing.assert_close(torch.stack(got[row][1]), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.slow
def test_a_rank_killed_mid_generation_resumes_on_the_restarted_group(artifacts, reference):
    """SIGKILL of rank 1 after the 5th token: the group restarts (max_restarts=1), the prompts plus the tokens
    made so far are prefilled again, and the greedy tokens are those of a full recompute. Without a restart
    left the same kill fails with one line naming the rank."""
    import os
    import signal

    from tpcompile.runtime.launcher import WorkerError
    artifact = artifacts(2)
    for restarts in (1, 0):
        with artifact.session(max_restarts=restarts, heartbeat_timeout_s=5.0) as s:
            seen, pids = [], [r["pid"] for r in s.group.status()]

            def kill_at_5(step):
                seen.append(step)
                if len(seen) == 5:
                    os.kill(pids[1], signal.SIGKILL)
            if restarts == 0:
                with pytest.raises(WorkerError) as e:
                    s.generate(PROMPTS, 20, on_tokens=kill_at_5)
                assert "rank 1 died (killed by SIGKILL)" in str(e.value) and "\n" not in str(e.value)
                continue
            got = s.generate(PROMPTS, 20, on_tokens=kill_at_5)
            assert s.group.restarts == 1 and not set(pids) & {r["pid"] for r in s.group.status()}
        for row, prompt in enumerate(PROMPTS):
            assert got[row] == recompute(reference, prompt, 20)[0], f"row {row}"


def test_seeded_sampling_is_repeatable_and_the_same_at_tp1_and_tp2(artifacts):
    runs, options = [], dict(temperature=0.9, top_k=40, top_p=0.95)
    for tp in (1, 2, 2):
        with artifacts(tp).session() as s:
            runs.append(s.generate(PROMPTS[:2], 24, seed=1234, **options))
            if tp == 1:  # another seed, other tokens
                other = s.generate(PROMPTS[:2], 24, seed=99, **options)
    assert runs[0] == runs[1] == runs[2]
    assert other != runs[0]


def test_eos_stops_a_row(artifacts, reference):
    want, _ = recompute(reference, PROMPTS[0], 10)
    eos = want[3]
    got = artifacts(2).generate([PROMPTS[0]], 10, eos_token_id=eos)[0]
    assert got == want[:want.index(eos) + 1]


def test_bench_reads_one_row_of_the_embedding_table_per_token(artifacts):
    """Bytes read per decode step: every weight and the whole cache, but of a table that is only looked up (the
    embedding), one row per sequence. Recomputed here from the rank file and the manifest's state shapes."""
    from safetensors.torch import load_file
    artifact = artifacts(2)
    m = artifact.manifest
    assert {f for f, p in m.params.items() if p.get("read") == "rows"} == {"embed.weight"}  # not lm_head
    with artifact.session() as s:
        raw = s.group.call("bench", {"prompt_len": 8, "new_tokens": 3, "batch": 4, "profile_steps": 0})[0]
    rank0 = load_file(artifact.path / m.rank_file(0))
    size = {f: t.numel() * t.element_size() for f, t in rank0.items()}
    cache = sum(torch.Size(spec["shape"]).numel() * 4 for spec in m.state.values())  # float32
    table = rank0["embed.weight"]
    want = sum(size.values()) + cache - size["embed.weight"] + 4 * table[0].numel() * table.element_size()
    assert abs(raw["read_bytes"] - want) <= 1 and raw["weight_bytes"] == sum(size.values())
    assert len(raw["step_seconds"]) == 2 and raw["run_step_seconds"] > 0  # per step, and over a whole run
    n_layers = len({f.split(".")[1] for f in m.params if f.startswith("layers.")})
    assert raw["collectives_per_step"] == {"all_reduce": 2 * n_layers, "all_gather": 1}  # o/down; the vocab-cut head


@pytest.mark.parametrize("prompts, n, message", [
    ([[]], 4, "prompt 0 is empty"),
    ([[1] * 200], 4, "longer than max_seq=128"),
    ([[1] * 100], 40, "lower max_new_tokens to 29"),
    ([[1]] * 5, 4, "5 prompts exceed max_batch=4"),
    ([[1, 256]], 4, "token id 256 is outside the vocabulary [0, 256)"),
])
def test_bad_requests_say_the_limit_and_the_setting(artifacts, prompts, n, message):
    with pytest.raises(ValueError) as e:
        artifacts(1).generate(prompts, n)
    assert message in str(e.value)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample(logits, 0.0, 0, 1.0, None).tolist() == [2]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert draws == {2, 3}  # top_k=2 keeps the two largest
    draws = {int(sample(logits, 1.0, 0, 0.5, g)) for _ in range(200)}
    assert draws == {2}  # the top token alone holds > 50% of the mass


@pytest.mark.slow
def test_checkpoint_greedy_tokens_match_transformers_generate(tmp_path):
    """A small Llama checkpoint saved by transformers: our tp=2 engines decode the same greedy tokens as
    transformers' own generate on that checkpoint."""
    transformers = pytest.importorskip("transformers")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tpcompile.config import CONF_DIR, register
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = OmegaConf.to_object(compose("config", overrides=[
            "model=hf", f"model.path={tmp_path / 'ckpt'}", "tp=2", "generation.max_seq=64", "generation.prefill_chunk=8",
            "generation.max_batch=2", f"out_dir={tmp_path / 'engines'}"]))
    prompts = [[3, 77, 12, 5, 9, 100, 41], [8, 8, 1]]
    got = Artifact(build_generation(job).path).generate(prompts, 16)
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == want


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aoti", "onnx"])
def test_compiled_engines_decode_the_same_tokens(artifacts, reference, backend):
    """The KV-cache graphs through AOTInductor (both graphs share the cache tensors bound at load) and
    through onnx (segments between collectives; each cache update an extra output of its segment, written
    over the shared cache tensor in place)."""
    got = artifacts(2, f"backend={backend}", "generation.max_seq=64").generate(PROMPTS, 24)
    for row, prompt in enumerate(PROMPTS):
        assert got[row] == recompute(reference, prompt, 24)[0]


def test_queueing_the_next_step_before_the_token_is_read_changes_no_token(artifacts):
    """On a GPU the next decode step is queued before the host reads the current token; the same logic on the
    CPU (in this process, one rank) gives the tokens of a run without it, however the steps are asked for."""
    from tpcompile.runtime.engine import RankEngine
    from tpcompile.runtime.generate import Generation
    engine = RankEngine(rank=0, world_size=1, device="cpu", artifact=str(artifacts(1).path))
    runs = []
    for lookahead, sizes in ((False, [20]), (True, [1, 1, 5, 13]), (True, [20])):
        gen = Generation(engine, 0, 1)
        gen.lookahead = lookahead
        tokens = gen.start(PROMPTS, 21, temperature=0.8, seed=3)["tokens"]
        for n in sizes:
            tokens += gen.step(n)["tokens"]
        runs.append(tokens)
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 21


def test_generate_from_an_existing_artifact_captures_nothing(artifacts, job_config, capsys):
    """artifact=DIR: generate runs the compiled artifact as it is (no model is built or captured) and gives the
    tokens the Python API gives for the same prompt."""
    from tpcompile.cli import cmd_generate
    art = artifacts(2)
    record = cmd_generate(job_config(f"artifact={art.path}", "generation.prompt=Hello", "generation.max_new_tokens=6"))
    assert record["artifact"] == str(art.path)
    assert record["tokens"] == art.generate([list(b"Hello")], 6)[0]
    assert "Hello" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["eager", "inductor_cudagraphs", "aoti_cudagraphs"])
def test_bench_on_a_gpu_counts_the_kernels_of_a_step_their_time_and_launches(backend, job_config):
    """The profiled decode steps of an engine on the GPU: every layer runs kernels, and their summed time lies between
    nothing and the steps' wall time. Eager launches each kernel from the host; the CUDA-graph backends replay a
    step as a graph, so the host launches a graph and only the few kernels outside it (sampling)."""
    job = job_config(f"backend={backend}", "runtime.device=cuda", "tp=1")
    artifact = Artifact(build_generation(job).path)
    with artifact.session() as s:
        raw = s.group.call("bench", {"prompt_len": 8, "new_tokens": 6, "batch": 1, "profile_steps": 4})[0]
    n_layers = len({f.split(".")[1] for f in artifact.manifest.params if f.startswith("layers.")})
    assert raw["kernels_per_step"] >= 4 * n_layers  # at least the four projections of each layer
    assert 0 < raw["kernel_ms_per_step"] < raw["profiled_ms_per_step"]
    top = raw["top_kernels"]  # the longest kernels first, a part of the step's kernels and of their time
    assert [k["us_per_step"] for k in top] == sorted((k["us_per_step"] for k in top), reverse=True) and top
    assert sum(k["calls_per_step"] for k in top) <= raw["kernels_per_step"] + 1e-9
    assert sum(k["us_per_step"] for k in top) <= raw["kernel_ms_per_step"] * 1e3 + 0.005 * len(top)  # rounded
    record = summarize(raw, batch=1, prompt_len=8, new_tokens=6)
    text = table({**record, "model": "llama_tiny", "tp": 1, "backend": backend, "dtype": "float32"})
    assert top[0]["kernel"][:60] in text and record["top_kernels"] == top  # bench's table names the longest
    # the profiled wall is of a step, not of the profiler starting and collecting (once hundreds of steps)
    assert raw["profiled_ms_per_step"] < 4 * max(raw["step_seconds"]) * 1e3
    if backend == "eager":
        assert raw["graph_launches_per_step"] == 0 and raw["kernel_launches_per_step"] >= 4 * n_layers
    else:
        assert raw["graph_launches_per_step"] >= 1, raw
        assert raw["kernel_launches_per_step"] < raw["kernels_per_step"] / 2, raw
