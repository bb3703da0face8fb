"""`cake serve` as a real process on loopback, spoken to by the real `openai` client."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest

from tests.netutil import tiny_model
from tests.serving import get, smollm_server, start_server

KEY = "test-key"
NAME = "smol"
# `make run`'s prompt: to the bare question this Q4_1 file answers "L'Etoile, ..."
# (so does llama.cpp, see test_real_model.test_chat_answers_paris)
ASK = [
    {
        "role": "user",
        "content": "What is the capital of France? Answer in one sentence.",
    }
]


@pytest.fixture(scope="module")
def server():
    yield from smollm_server(KEY, NAME, context=512, parallel=4)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY)


def chat(client, **kw):
    kw.setdefault("messages", ASK)
    return client.chat.completions.create(model=NAME, **kw)


def test_models_health_and_the_greedy_answer(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert json.loads(get(server, "/health"))["status"] == "ok"
    r = chat(client, temperature=0, max_tokens=24)
    c = r.choices[0]
    assert "Paris" in c.message.content and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(client):
    whole = chat(client, temperature=0, max_tokens=20)
    parts, usage, finish = [], None, None
    for ch in chat(
        client, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    # the second run found the first one's prompt in a parked sequence
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_stop_strings_end_the_text_before_them(client):
    r = client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    full = r.choices[0].text
    word = full.split()[1]  # stop at the second word
    r2 = client.completions.create(
        model=NAME,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stop=["@@", word],
    )
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == full[: full.index(word)]


def test_a_seed_reproduces_and_n_choices_differ(client):
    # A short prompt: every chunk of it goes through the same product (the CPU
    # kernels); a prompt of 64+ tokens whose prefix is reused (or fed in other
    # chunks) may differ in the last bits (docs/serving.md, reproducibility).
    kw = dict(
        model=NAME, prompt="Once upon a time", temperature=1.0, max_tokens=16,
        seed=1234, n=2,
    )  # fmt: skip
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    ta = [c.text for c in a.choices]
    assert ta == [c.text for c in b.choices]
    assert ta[0] != ta[1] and [c.index for c in a.choices] == [0, 1]
    # usage counts the prompt once and the tokens of both choices
    assert 2 <= a.usage.completion_tokens <= 32
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_logprobs_are_sorted_and_greedy_takes_the_top(client):
    r = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert (
            t.logprob == pytest.approx(tops[0]) and t.token == t.top_logprobs[0].token
        )
        assert sum(2.718281828**x for x in tops) <= 1.0 + 1e-6
    r = client.completions.create(
        model=NAME, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs) == 4


def test_concurrent_requests_are_batched_and_each_gets_its_answer(client, server):
    prompts = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a city."]

    def ask(q):
        msgs = [{"role": "user", "content": q}]
        return chat(client, messages=msgs, temperature=0, max_tokens=24)

    alone = [ask(q).choices[0].message.content for q in prompts]
    got = [None] * 4

    def worker(i):
        got[i] = ask(prompts[i]).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone
    metrics = get(server, "/metrics", KEY)
    sums = dict(
        line.split()
        for line in metrics.splitlines()
        if line.startswith(
            ("cake_decode_batch_size_sum", "cake_decode_batch_size_count")
        )
    )
    mean = float(sums["cake_decode_batch_size_sum"]) / float(
        sums["cake_decode_batch_size_count"]
    )
    assert mean > 1.2  # steps carried several sequences
    assert 'cake_requests_total{endpoint="chat",finish="max_tokens"}' in metrics


def test_a_client_that_leaves_frees_its_sequence(client, server):
    stream = chat(client, max_tokens=400, stream=True, temperature=1.0)
    next(iter(stream)), next(iter(stream))
    assert json.loads(get(server, "/health"))["running"] == 1
    stream.close()
    t0 = time.monotonic()
    while json.loads(get(server, "/health"))["running"] and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert json.loads(get(server, "/health"))["running"] == 0
    assert 'finish="cancelled"' in get(server, "/metrics", KEY)


def test_errors_are_openai_error_objects(client, server):
    bad_key = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        chat(bad_key, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=ASK)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="word " * 600, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="", max_tokens=2)
    assert e.value.body["param"] == "prompt"
    req = urllib.request.Request(
        f"http://127.0.0.1:{server}/v1/chat/completions",
        data=b"{not json",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())


def test_a_full_server_answers_429(tmp_path):
    model = tiny_model(tmp_path / "tiny")
    p, port = start_server(
        "--model", str(model), "--backend", "numpy", "--parallel", "1",
        "--max-queue", "0",
    )  # fmt: skip
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        name = c.models.list().data[0].id
        long = c.completions.create(
            model=name, prompt="w1 w2", max_tokens=100000, stream=True
        )
        next(iter(long))
        with pytest.raises(openai.RateLimitError):
            c.with_options(max_retries=0).completions.create(
                model=name, prompt="w3", max_tokens=2
            )
        long.close()
    finally:
        p.terminate(30)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_json_mode_and_a_json_schema_give_output_that_parses(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    r = chat(client, messages=ask, response_format=fmt, temperature=1.2, seed=7,
             n=2, max_tokens=64)  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
    stream = chat(client, messages=ask, response_format=fmt, temperature=0,
                  max_tokens=64, stream=True)  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = chat(client, messages=ask, response_format={"type": "json_object"},
             temperature=0, max_tokens=200)  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # else max_tokens cut the object
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="nowhere") as e:
        bad = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
        chat(client, response_format={"type": "json_schema",
             "json_schema": {"name": "x", "schema": bad}})  # fmt: skip
    assert e.value.body["param"] == "response_format"


def test_a_required_tool_call_comes_back_in_openai_shape(client):
    import jsonschema

    params = WEATHER["function"]["parameters"]
    for choice in ({"type": "function", "function": {"name": "get_weather"}},
                   "required"):  # fmt: skip
        r = chat(client, messages=PARIS, tools=[WEATHER], tool_choice=choice,
                 parallel_tool_calls=False, temperature=0, max_tokens=80)  # fmt: skip
        c = r.choices[0]
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)
    stream = chat(client, messages=PARIS, tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, temperature=0, max_tokens=80,
                  stream=True)  # fmt: skip
    calls, finish, content = [], None, ""
    for ch in stream:
        d = ch.choices[0].delta
        calls += d.tool_calls or []
        content += d.content or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert [t.function.name for t in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(
        c.message.tool_calls[0].function.arguments
    )  # the same greedy call as without streaming


def test_a_tool_result_goes_back_to_the_model(client):
    r = chat(client, messages=PARIS, tools=[WEATHER], tool_choice="required",
             parallel_tool_calls=False, temperature=0, max_tokens=80)  # fmt: skip
    call = r.choices[0].message.tool_calls[0]
    turn = PARIS + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'},
    ]
    r = chat(client, messages=turn, tools=[WEATHER], temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.content
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, tools=[WEATHER], tool_choice={"type": "function",
             "function": {"name": "nope"}})  # fmt: skip
    assert e.value.body["param"] == "tool_choice"
