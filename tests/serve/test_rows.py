"""The rows of runtime/rows.py driven in this process (tp=1, CPU), as the scheduler drives them: requests join
and leave between calls of several decode steps, rows end on a stop id in the middle of a call, a row is
released with a step run ahead. Each request's greedy tokens equal Artifact.generate of its prompt alone, cut
at its end, with the step run ahead (lookahead, as on a GPU) and without."""
import pytest

from tpcompile.api import Artifact
from tpcompile.pipeline import build_generation
from tpcompile.runtime.engine import RankEngine
from tpcompile.runtime.rows import Rows

PROMPTS = [[5, 17, 99, 3, 250, 7, 1], [42] * 20, [200, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
NEW = 24


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tpcompile.config import CONF_DIR, register
    register()
    out = tmp_path_factory.mktemp("rows-engines")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = OmegaConf.to_object(compose("config", overrides=[
            "tp=1", "generation.max_batch=4", "generation.max_seq=64", "generation.prefill_chunk=8",
            f"out_dir={out}"]))
    return build_generation(job, log=lambda *_: None).path


@pytest.fixture(scope="module")
def alone(artifact):
    """Greedy tokens of each prompt alone, from the one-batch generation loop."""
    return [Artifact(artifact).generate([p], NEW)[0] for p in PROMPTS]


def start(max_new: int, stop=()) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "stop": list(stop)}


def prefill(row: int, prompt: list[int], chunk: int, start_: dict) -> list[dict]:
    """The chunks of a prompt, short one first, the last one starting the row (as the scheduler plans them)."""
    first = len(prompt) - (-(-len(prompt) // chunk) - 1) * chunk
    cuts = [0, first] + list(range(first + chunk, len(prompt) + 1, chunk))
    return [{"row": row, "tokens": prompt[a:b], "pos": a, "start": start_ if b == len(prompt) else None}
            for a, b in zip(cuts, cuts[1:])]


def collect(rows: Rows, calls: list[dict]) -> tuple[dict, dict]:
    """Run the calls (each prefill list may hold chunks of several rows for several calls: one chunk per row
    per call); then decode until every row ends. Tokens and end reasons by row; a call never returns more
    tokens of a row than its decode steps (+1 for the first token of a prefill)."""
    made, ended = {}, {}

    def call(payload: dict):
        reply = rows.step(**payload)
        per_row = {}
        for r, t in reply["tokens"]:
            per_row[r] = per_row.get(r, 0) + 1
            made.setdefault(r, []).append(t)
        starting = {c["row"] for c in payload.get("prefill", ()) if c.get("start")}
        for r, count in per_row.items():
            assert count <= int(payload.get("decode", 0)) + (r in starting), (payload, reply)
        for r, reason in reply["ended"]:
            ended[r] = reason
    for payload in calls:
        call(payload)
    while rows.running or getattr(rows, "queued", None) is not None:
        call({"decode": 4})
    return made, ended


@pytest.mark.parametrize("lookahead", [False, True])
def test_rows_join_and_end_mid_call_equal_each_prompt_alone(artifact, alone, lookahead):
    """Row 1 stops on a token it makes in the middle of a 4-step call; row 0 is released (a stop string) while
    a step runs ahead; row 2 reuses row 1 after it ended; every row's tokens are its prompt's alone."""
    rows = Rows(RankEngine(rank=0, world_size=1, device="cpu", artifact=str(artifact)), 0, 1, lookahead=lookahead)
    stop_at = 6  # row 1 ends on its 7th token: a stop id it makes mid-call (the first place that token occurs)
    stop_id = alone[1][stop_at]
    cut = alone[1].index(stop_id)
    a = prefill(0, PROMPTS[0], 8, start(NEW))
    b = prefill(1, PROMPTS[1], 8, start(NEW, stop=[stop_id]))
    calls = [{"prefill": [a[0], b[0]]}, {"decode": 1, "prefill": [b[1]]}, {"decode": 1, "prefill": [b[2]]},
             {"decode": 4}, {"decode": 4}, {"decode": 4}]
    made, ended = collect(rows, calls)
    assert made[1] == alone[1][:cut + 1] and ended[1] == "stop"
    assert made[0] == alone[0][:len(made[0])] and len(made[0]) > cut + 1
    # row 0 released now (its client saw a stop string); row 1, free, takes prompt 2; row 3 takes prompt 3
    kept = len(made[0])
    c, d = prefill(1, PROMPTS[2], 8, start(NEW)), prefill(3, PROMPTS[3], 8, start(10))
    more, ended = collect(rows, [{"release": [0], "decode": 1, "prefill": [c[0], d[0]]},
                                 {"decode": 1, "prefill": [d[1]]}])
    assert more.get(0, []) == [] and not rows.running
    assert more[1] == alone[2] and ended[1] == "length"
    assert more[3] == alone[3][:10] and ended[3] == "length"
    assert len(made[0]) == kept
