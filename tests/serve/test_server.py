"""`tpcompile serve` driven by the official openai client: completions, chat, streaming, continuous batching
against Artifact.generate alone, bad requests, a disconnect. One server for the module (max_queue=2)."""
import threading

import openai
import pytest

from tpcompile.api import Artifact

pytestmark = pytest.mark.slow
MODEL = "llama_tiny"
TARGET = [7, 1, 99, 250, 3, 17, 42, 42, 8, 200, 5, 61, 13, 77, 90, 2, 33, 4]  # 18 tokens: two prefill chunks


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("server.max_queue=2")


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_completion_and_usage(server):
    r = server.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (16, 8, 24)  # bytes


def test_chat_completion_uses_the_fallback_template(server):
    """The byte tokenizer of a preset has no chat template: 'role: content' lines, then 'assistant:'."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("system: Be brief.\nuser: Hi\nassistant:") and r.usage.completion_tokens == 5


def test_streamed_completion_equals_the_whole_one(server):
    client = server.client()
    args = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0,
                extra_body={"return_token_ids": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    per_chunk = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
    assert per_chunk == token_ids(whole.choices[0]) and len(chunks) == 24 + 2  # a chunk per token, end, usage
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-2].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_text_before_it(server):
    """The stop is taken from the middle of the greedy text of the same prompt: the reply is what precedes it,
    streamed or not."""
    client, args = server.client(), dict(model=MODEL, prompt="Stop here", temperature=0)
    full = client.completions.create(max_tokens=30, **args).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.index(stop)]
    r = client.completions.create(max_tokens=30, stop=[stop], **args)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(max_tokens=30, stop=stop, stream=True,
                                                                           **args))
    assert streamed == want


def test_greedy_tokens_equal_artifact_generate_while_7_others_run(server):
    """Seven requests of other lengths (some sampled, some streamed) are in flight when the greedy one
    arrives; its tokens equal Artifact.generate of its prompt alone."""
    client, results, errors = server.client(), {}, []

    def other(i: int):
        try:
            prompt = [(13 * i + j) % 256 for j in range(3 + 9 * i)]  # 3..57 tokens
            kw = dict(model=MODEL, prompt=prompt, max_tokens=70 - 2 * i, temperature=0.8 * (i % 2), seed=i)
            if i % 3 == 0:
                results[i] = sum(1 for c in client.completions.create(stream=True, **kw) if c.choices[0].text)
            else:
                results[i] = client.completions.create(**kw).usage.completion_tokens
        except Exception as e:  # reported below, with the others' outcome
            errors.append(repr(e))
    threads = [threading.Thread(target=other, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    server.wait(lambda: errors or server.health()["running_rows"] >= 5, what="5 rows running")
    r = client.completions.create(model=MODEL, prompt=TARGET, max_tokens=40, temperature=0,
                                  extra_body={"return_token_ids": True})
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 7, errors
    alone = Artifact(server.artifact).generate([TARGET], 40)[0]
    assert token_ids(r.choices[0]) == alone


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "llama_tiny", "prompt": "x",', 400, "the request body is not valid JSON"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens: Input should be a valid integer"),
    ({"model": MODEL, "prompt": "x", "temperature": [1]}, 400, "temperature: Input should be a valid number"),
    ({"model": MODEL, "prompt": "x", "best_of_n": 3}, 400, "unknown field 'best_of_n'"),
    ({"model": MODEL, "prompt": "x" * 100, "max_tokens": 40}, 400, "at most 29 new tokens fit"),
    ({"model": MODEL, "prompt": "x" * 129}, 400, "more than max_seq=128"),
    ({"model": MODEL, "prompt": [1, 256]}, 400, "token id 256 is outside the vocabulary [0, 256)"),
    ({"model": MODEL, "prompt": ""}, 400, "the prompt is empty"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n is not supported"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "send one per request"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model 'gpt-4' is not served here; use 'llama_tiny'"),
])
def test_bad_requests_are_refused_with_the_reason(server, body, status, message):
    pids = [r["pid"] for r in server.health()["ranks"]]
    code, reply = server.post("/v1/completions", body)
    assert code == status and message in reply["error"]["message"], reply
    assert reply["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert [r["pid"] for r in server.health()["ranks"]] == pids and server.health()["status"] == "ok"


def test_bad_chat_and_the_client_sees_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert e.value.status_code == 400 and "messages" in e.value.message


def test_a_full_queue_answers_429(server):
    """8 rows busy, 2 waiting (max_queue=2): the next request is refused; the held streams are then dropped."""
    client = server.client()
    streams = [client.completions.create(model=MODEL, prompt="hold", max_tokens=120, stream=True)
               for _ in range(10)]
    try:
        server.wait(lambda: server.health()["queued"] == 2, what="2 queued")
        code, reply = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert code == 429 and "the queue is full (2 requests wait for a row of max_batch=8)" in \
            reply["error"]["message"]
    finally:
        for s in streams:
            s.close()
    server.wait(lambda: server.health()["running_rows"] == 0 and server.health()["queued"] == 0, what="idle")


def test_a_disconnect_mid_stream_frees_the_row(server):
    stream = server.client().completions.create(model=MODEL, prompt="disconnect me", max_tokens=110, stream=True,
                                                extra_body={"return_token_ids": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    server.wait(lambda: server.health()["running_rows"] == 0, what="the row freed")
    gone = [r for r in server.log() if r.get("finish") == "cancelled" and r["prompt_tokens"] == 13]
    assert gone and gone[-1]["completion_tokens"] < 60  # stopped within a few steps, not run to max_tokens
    r = server.client().completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_models_health_and_metrics(server):
    assert server.client().models.list().data[0].id == MODEL
    h = server.health()
    assert h["status"] == "ok" and [r["alive"] for r in h["ranks"]] == [True, True] and h["max_batch"] == 8
    code, text = server.get("/metrics")
    assert code == 200
    for name in ("tpcompile_time_to_first_token_seconds_bucket", "tpcompile_time_per_output_token_seconds_count",
                 "tpcompile_e2e_request_latency_seconds_sum", "tpcompile_queue_time_seconds_count",
                 "tpcompile_running_rows", "tpcompile_queue_length", "tpcompile_prompt_tokens_total",
                 "tpcompile_generation_tokens_total", 'tpcompile_errors_total{kind="bad_request"}'):
        assert name in text, name
    line = [r for r in server.log() if r.get("event") == "request"][0]
    assert {"id", "finish", "prompt_tokens", "completion_tokens", "queue_s", "ttft_s", "tpot_s", "e2e_s"} <= set(line)
