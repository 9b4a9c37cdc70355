"""`tl serve` on the real Qwen2.5 0.5B model, driven by the official
`openai` Python client, curl and raw HTTP, as a user would."""
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import QWEN, QWEN_ID, TL, Server

MSGS = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primary colors."},
]


def chat(client, **kw):
    args = dict(model=QWEN_ID, messages=MSGS, max_tokens=16, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**args)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [QWEN_ID]


def test_chat_and_usage(client):
    r = chat(client)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_plain(client):
    plain = chat(client, max_tokens=20).choices[0].message.content
    stream = chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(parts) == plain
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions_equal_tl_generate(client):
    prompt = "def fibonacci(n):"
    r = client.completions.create(model=QWEN_ID, prompt=prompt, max_tokens=24, temperature=0)
    out = subprocess.run(
        [TL, "generate", "-m", QWEN, "-p", prompt, "-n", "24", "--temp", "0", "-t", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    # `tl generate` ends its output with a newline.
    assert r.choices[0].text + "\n" == out


def test_n_and_seed_determinism(client):
    kw = dict(model=QWEN_ID, messages=MSGS, max_tokens=12, temperature=0.9, n=3, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop(client):
    r = client.completions.create(model=QWEN_ID, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                  stop=[" 7"])
    assert r.choices[0].finish_reason == "stop"
    assert " 7" not in r.choices[0].text
    assert r.choices[0].text.startswith(" 5, 6,")


def test_logprobs(client):
    r = chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        # Greedy picks the most likely token.
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4
        assert t.logprob <= 0


def test_batch_gives_same_greedy_output(client):
    prompts = [f"Write a haiku about the number {i}." for i in range(8)]

    def one(p):
        return client.chat.completions.create(
            model=QWEN_ID, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0
        ).choices[0].message.content

    alone = [one(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(one, prompts))
    assert together == alone


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages"),
        (dict(max_tokens=10**6), "max_tokens"),
        (dict(temperature=5), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(n=0), "n"),
    ],
)
def test_bad_requests(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kw)
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_structured_output_parse(client):
    """`chat.completions.parse` with a Pydantic model: the client sends a
    strict JSON schema; the reply parses into the model."""
    from pydantic import BaseModel

    class Colors(BaseModel):
        colors: list[str]
        count: int

    for temperature in (0, 0.9):
        r = client.chat.completions.parse(
            model=QWEN_ID, messages=MSGS, response_format=Colors, max_tokens=80,
            temperature=temperature, seed=3)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", m.content
        assert isinstance(m.parsed, Colors), m.content
        assert json.loads(m.content) == m.parsed.model_dump()


def test_json_object_and_invalid_schema(client):
    r = chat(client, max_tokens=120, response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert e.value.body["param"] == "response_format"
    assert "JSON schema" in e.value.body["message"]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_tool_calls_required_named_streaming_and_results(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=QWEN_ID, messages=ASK, tools=WEATHER,
                                           tool_choice=choice, max_tokens=60, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streaming gives the same call as deltas.
    stream = client.chat.completions.create(model=QWEN_ID, messages=ASK, tools=WEATHER,
                                            tool_choice="required", max_tokens=60,
                                            temperature=0, stream=True)
    name, args, finish = "", "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert (name, json.loads(args)) == ("get_weather", json.loads(call.function.arguments))
    assert finish == "tool_calls"
    # The result goes back as a `tool` message.
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    r = client.chat.completions.create(model=QWEN_ID, messages=msgs, tools=WEATHER,
                                       max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice auto (the default with tools): Qwen2.5-Coder writes the
    # call as a fenced JSON object, which becomes a tool call, streamed or
    # not; a reply that is not a call stays content.
    r = client.chat.completions.create(model=QWEN_ID, messages=ASK, tools=WEATHER,
                                       max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    assert c.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(c.message.tool_calls[0].function.arguments)["city"] == "Paris"
    stream = client.chat.completions.create(model=QWEN_ID, messages=ASK, tools=WEATHER,
                                            max_tokens=60, temperature=0, stream=True)
    names = [tc.function.name for chunk in stream for ch in chunk.choices
             for tc in (ch.delta.tool_calls or []) if tc.function.name]
    assert names == ["get_weather"], names
    r = client.chat.completions.create(
        model=QWEN_ID, tools=WEATHER, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Explain in one sentence what a Python list is."}])
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length"), c.message
    assert c.message.content
    # tool_choice naming an unknown function is a 400.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=QWEN_ID, messages=ASK, tools=WEATHER,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def raw_post(url, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_malformed_and_oversized_bodies(server):
    st, _, body = raw_post(server.url + "/v1/chat/completions", b"{\"messages\": [")
    assert st == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    st, _, body = raw_post(server.url + "/v1/completions",
                           json.dumps({"prompt": "x" * (5 << 20)}).encode())
    assert st == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_curl_sse(server):
    body = json.dumps({"model": QWEN_ID, "messages": MSGS, "max_tokens": 8, "temperature": 0,
                       "stream": True})
    out = subprocess.run(
        ["curl", "-sN", "-H", "Content-Type: application/json", "-d", body,
         server.url + "/v1/chat/completions"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    frames = [f for f in out.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), out
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics(server, client):
    chat(client, max_tokens=4)
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    for name in ["tl_requests_running", "tl_requests_waiting", "tl_prompt_tokens_total",
                 "tl_generation_tokens_total", "tl_time_to_first_token_seconds_bucket",
                 "tl_inter_token_latency_seconds_bucket", "tl_kv_blocks_used", "tl_kv_blocks_free",
                 "tl_prefix_cache_hit_rate"]:
        assert name in text, name


FORECAST = [{"type": "function", "function": {
    "name": "get_forecast", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}]
ROME = [{"role": "user", "content": "What will the weather be in Rome for the next week?"}]


def test_auto_fenced_call_is_constrained_with_and_without_speculation(client):
    """Unconstrained, Qwen2.5-Coder answers ROME with a ```json fence whose
    "days" is 7; under `auto` the fence turns the call grammar on, so the
    call keeps to the schema (1 to 3 days). A server speculating by prompt
    lookup gives the same greedy replies: lazy requests speculate until
    their trigger."""
    asks = [(ROME, FORECAST), (ASK, WEATHER),
            ([{"role": "user", "content": "Explain in one sentence what a Python list is."}],
             WEATHER)]

    def replies(c):
        out = []
        for msgs, tools in asks:
            r = c.chat.completions.create(model=QWEN_ID, messages=msgs, tools=tools,
                                          max_tokens=60, temperature=0)
            m = r.choices[0].message
            calls = [(t.function.name, json.loads(t.function.arguments))
                     for t in m.tool_calls or []]
            out.append((r.choices[0].finish_reason, m.content, calls))
        return out

    plain = replies(client)
    finish, _, calls = plain[0]
    assert finish == "tool_calls" and len(calls) == 1, plain[0]
    name, args = calls[0]
    assert name == "get_forecast" and args["city"] == "Rome", args
    assert args["unit"] in ("C", "F") and 1 <= args["days"] <= 3, args
    assert plain[1][2][0][0] == "get_weather", plain[1]
    assert not plain[2][2] and plain[2][1], plain[2]
    s = Server("--max-batch", "4", "--spec", "ngram")
    try:
        spec = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        assert replies(spec) == plain
        with urllib.request.urlopen(s.url + "/metrics") as r:
            metrics = r.read().decode()
        drafted = [float(l.split()[-1]) for l in metrics.splitlines()
                   if l.startswith("tl_spec_drafted_tokens_total")]
        assert drafted and drafted[0] > 0, metrics
    finally:
        s.stop()


def test_api_key_and_queue_limit():
    s = Server("--api-key", "k-123", "--max-batch", "1", "--max-queue", "1")
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="k-123", max_retries=0, timeout=300)
        assert good.models.list().data[0].id == QWEN_ID

        def one(_):
            try:
                good.completions.create(model=QWEN_ID, prompt="Once upon a time", max_tokens=24,
                                        temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers.get("retry-after") == "1"
                return 429

        with cf.ThreadPoolExecutor(6) as ex:
            codes = list(ex.map(one, range(6)))
        assert 200 in codes and 429 in codes, codes
    finally:
        s.stop()


def test_sigterm_drains_streams():
    s = Server()
    got = {}

    def reader():
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        parts, finish = [], None
        for ch in c.chat.completions.create(model=QWEN_ID, messages=MSGS, max_tokens=24,
                                            temperature=0, stream=True):
            for x in ch.choices:
                parts.append(x.delta.content or "")
                finish = x.finish_reason or finish
        got["text"], got["finish"] = "".join(parts), finish

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    t.join(120)
    rc = s.proc.wait(60)
    s.stop()
    assert got.get("finish") in ("stop", "length"), got
    assert got["text"]
    assert rc == 0
    log = open(s.log_path).read()
    assert "stopped" in log


def test_schema_suite(client):
    """Every schema of tests/e2e/schemas.json (scripts/make_schema_suite.py):
    the reply validates (the `jsonschema` package); the refused ones are
    400s naming what is unsupported."""
    import jsonschema

    suite = json.load(open(os.path.join(os.path.dirname(__file__), "schemas.json")))
    ask = [{"role": "user", "content": "Fill in the requested JSON with realistic values."}]

    def one(i_schema):
        i, schema = i_schema
        r = client.chat.completions.create(
            model=QWEN_ID, messages=ask, max_tokens=400, temperature=0.7, seed=i,
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        return i, r.choices[0]

    # A grammar can't make a model stop: a number's fraction or a free
    # string may run to max_tokens (then the JSON is unfinished, not
    # invalid). Every finished reply must validate; at most 10 may run out.
    failures, ran_out = [], []
    with cf.ThreadPoolExecutor(8) as ex:
        for i, c in ex.map(one, enumerate(suite["schemas"])):
            if c.finish_reason == "length":
                ran_out.append(i)
                continue
            try:
                assert c.finish_reason == "stop", f"finish {c.finish_reason}"
                jsonschema.validate(json.loads(c.message.content), suite["schemas"][i])
            except Exception as e:  # collected, so one report lists them all
                failures.append(f"schema {i}: {e!s:.300}: {c.message.content!r:.300}")
    assert not failures, "\n".join(failures)
    assert len(ran_out) <= 10, f"ran out of tokens: {ran_out}"
    for schema in suite["refused"]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, response_format={"type": "json_schema",
                                           "json_schema": {"name": "x", "schema": schema}})
        assert e.value.body["param"] == "response_format"
        assert "invalid JSON schema" in e.value.body["message"]
