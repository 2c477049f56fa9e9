"""The HTTP server against the real app on loopback: OpenAI-style answers, streaming, seeds, stop
strings, batching that leaves every result unchanged, errors that name the field (text a tokenizer
cannot take and strict types included), body limits, /health while a maximal prompt is tokenised,
an OpenAPI document that lists what the server answers, a freed slot when a client goes away, the
official openai client, the page in Chromium, and a bounded load test. (The newer OpenAI features:
test_serve_openai.py.)"""

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
httpx = pytest.importorskip("httpx")

from serving import LIMITS, ar, complete, events, mdm, model_id, post, post_raw, runs, served, statuses_documented  # noqa: E402,F401
from unmask.serve.engine import Engine, Limits  # noqa: E402
from unmask.serve.load import load_test, summary  # noqa: E402


def test_models_health_and_page(mdm):
    models = httpx.get(mdm + "/v1/models").json()
    assert models["data"][0]["id"] == "mdm" and models["data"][0]["objective"] == "mdm"
    assert httpx.get(mdm + "/health").json()["status"] == "ok"
    page = httpx.get(mdm + "/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert httpx.get(mdm + "/static/app.js").status_code == 200
    schema = httpx.get(mdm + "/openapi.json").json()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream",
                 "sampler", "steps", "block_length", "threshold", "cfg_scale", "cache", "stream_canvas"):
        assert name in fields and (name in ("prompt",) or fields[name].get("description")), name


@pytest.mark.parametrize("server", ["mdm", "ar"])
def test_same_seed_same_text_and_n_choices(request, server):
    url = request.getfixturevalue(server)
    body = {"prompt": ["ROMEO.", "Good morrow"], "max_tokens": 12, "n": 3, "seed": 7, "temperature": 1.0}
    a, b = complete(url, **body), complete(url, **body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == list(range(6))
    assert a["object"] == "text_completion" and a["usage"]["completion_tokens"] > 0
    other = complete(url, **{**body, "seed": 8})
    assert [c["text"] for c in other["choices"]] != [c["text"] for c in a["choices"]]
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) > 1  # n choices are different draws, not copies


def test_stop_string_cuts_the_text(mdm):
    for seed in range(3, 20):  # a text long enough to hold a stop string after its start
        body = {"prompt": "KING.", "max_tokens": 32, "seed": seed, "sampler": "confidence", "steps": 8}
        full = complete(mdm, **body)["choices"][0]
        text = full["text"]
        stops = [text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip()]
        if stops:
            break
    assert stops, "no seed gave a text of more than 5 characters"
    cut = complete(mdm, **body, stop=[stops[0], "\u2603never"])["choices"][0]
    assert cut["text"] == text[: text.index(stops[0])] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("server,extra", [("mdm", {"sampler": "confidence", "steps": 6}), ("mdm", {"block_length": 4, "steps": 8}), ("ar", {})])
def test_stream_equals_the_answer(request, server, extra):
    url = request.getfixturevalue(server)
    body = {"prompt": "ROMEO.", "max_tokens": 16, "n": 2, "seed": 11, **extra}
    answer = complete(url, **body)
    got = events(url, {**body, "stream": True})
    assert got[-1] == (None, "[DONE]")
    chunks = [data for _, data in got[:-1]]
    for i, choice in enumerate(answer["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_canvas_frames_show_the_unmasking(mdm):
    got = events(mdm, {"prompt": "ROMEO.", "max_tokens": 16, "seed": 2, "sampler": "confidence", "steps": 8, "stream": True, "stream_canvas": True})
    frames = [data for name, data in got if name == "canvas"]
    assert len(frames) == 8 and [f["step"] for f in frames] == list(range(1, 9))
    masked = [sum(t is None for t in f["choices"][0]["tokens"]) for f in frames]
    assert masked == [14, 12, 10, 8, 6, 4, 2, 0]  # 16 tokens, 8 steps, 2 committed per step (confidence, even allocation)
    last = frames[-1]["choices"][0]
    assert sorted(last["committed_at"]) == [s for s in range(1, 9) for _ in range(2)]
    # a committed token never changes afterwards
    for before, after in zip(frames, frames[1:]):
        for x, y in zip(before["choices"][0]["tokens"], after["choices"][0]["tokens"]):
            assert x is None or x == y


def test_chat_completions(mdm):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}], "max_tokens": 8, "seed": 1}
    res = post(mdm, {"model": "mdm", **body}, "/v1/chat/completions").json()
    assert res["object"] == "chat.completion" and res["choices"][0]["message"]["role"] == "assistant"
    same = complete(mdm, prompt="System: Be brief.\nUser: Who art thou?\nAssistant:", max_tokens=8, seed=1)
    assert res["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    got = events(mdm, {**body, "stream": True}, "/v1/chat/completions")
    text = "".join(d["choices"][0]["delta"].get("content", "") for _, d in got[:-1])
    assert text == res["choices"][0]["message"]["content"] and got[0][1]["object"] == "chat.completion.chunk"


def test_infill_keeps_the_text_around_the_blanks(mdm):
    res = complete(mdm, prompt="To be, [MASK:3] not to be: [MASK:2] the question.", infill=True, seed=5)
    text = res["choices"][0]["text"]
    assert text.startswith("To be, ") and text.endswith(" the question.") and " not to be: " in text
    assert res["usage"]["completion_tokens"] == 5


REQUESTS = [
    {"prompt": "ROMEO.", "max_tokens": 16, "seed": 1},
    {"prompt": "JULIET. O Romeo", "max_tokens": 16, "seed": 2, "temperature": 0.7, "top_p": 0.9},
    {"prompt": ["A", "Good morrow, cousin"], "max_tokens": 16, "n": 2, "seed": 3},
    {"prompt": "KING.", "max_tokens": 16, "seed": 4, "sampler": "confidence", "steps": 8},
    {"prompt": "KING.", "max_tokens": 16, "seed": 5, "sampler": "threshold"},
    {"prompt": "KING.", "max_tokens": 16, "seed": 6, "block_length": 8, "steps": 16},
    {"prompt": "HAMLET.", "max_tokens": 16, "seed": 7, "cfg_scale": 1.5},
    {"prompt": "HAMLET.", "max_tokens": 16, "seed": 8, "cache": "dual", "block_length": 8, "steps": 16},
    {"prompt": "To be [MASK:4] not.", "infill": True, "seed": 9},
    {"prompt": "Lord", "max_tokens": 32, "seed": 10, "sampler": "first-hitting"},
]
AR_REQUESTS = [
    {"prompt": "ROMEO.", "max_tokens": 16, "seed": 1},
    {"prompt": "JULIET. O Romeo", "max_tokens": 16, "seed": 2, "temperature": 0.7, "top_p": 0.9},
    {"prompt": ["A", "Good morrow, cousin"], "max_tokens": 16, "n": 2, "seed": 3},
    {"prompt": "KING.", "max_tokens": 24, "seed": 4},
    {"prompt": "", "max_tokens": 16, "seed": 5, "temperature": 0},
]


@pytest.mark.parametrize("shapes", ["auto", "static"])
@pytest.mark.parametrize("server,requests", [("mdm", REQUESTS), ("ar", AR_REQUESTS)])
def test_concurrent_requests_equal_one_at_a_time(request, monkeypatch, server, requests, shapes):
    """Batching changes which rows share a forward, never a result: every request decoded alongside
    the others gives exactly the text it gives alone (fixed seeds); also with static shapes, the
    GPU's default (:mod:`unmask.sampling.shapes`), whose calls cover every row and position."""
    monkeypatch.setattr("unmask.sampling.shapes.DEFAULT", shapes)
    url = request.getfixturevalue(server)
    name = model_id(url)
    alone = [[c["text"] for c in complete(url, **body)["choices"]] for body in requests]
    before = httpx.get(url + "/health").json()["batching"]

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(body):
                res = await client.post(url + "/v1/completions", json={"model": name, **body})
                assert res.status_code == 200, res.text
                return [c["text"] for c in res.json()["choices"]]
            return await asyncio.gather(*(one(b) for b in requests + requests))

    both = asyncio.run(together())
    assert both == alone + alone
    after = httpx.get(url + "/health").json()["batching"]
    merged = (after["requests_per_forward"] - before["requests_per_forward"]) / (after["forwards"] - before["forwards"])
    assert merged > 1.2 and after["max_requests_per_forward"] >= 2  # the requests did share forwards


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 49}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "sampler": "magic"}, 400, "sampler"),
    ({"prompt": "x", "cache": "huge"}, 400, "cache"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "x", "steps": 65}, 400, "steps"),
    ({"prompt": "x", "max_tokens": 16, "block_length": 5}, 400, "block_length"),
    ({"prompt": "x", "max_tokens": 16, "block_length": 4, "steps": 6}, 400, "steps"),
    ({"prompt": "x", "sampler": "threshold", "steps": 4}, 400, "steps"),
    ({"prompt": "x", "sampler": "ancestral", "threshold": 0.5}, 400, "threshold"),
    ({"prompt": "", "cfg_scale": 2}, 400, "cfg_scale"),
    ({"prompt": "x " * 80, "max_tokens": 8}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 40, "n": 1, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "no blanks", "infill": True}, 400, "prompt"),
    ({"prompt": "x", "stream_canvas": True}, 400, "stream_canvas"),
    ({"prompt": ["a"] * 5}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    # text the tokenizer cannot take: lone surrogates (valid JSON escapes, not Unicode text) and NUL
    ({"prompt": "a\ud800"}, 400, "prompt"),
    ({"prompt": ["fine", "b\udfff c"]}, 400, "prompt"),
    ({"prompt": "a\u0000b"}, 400, "prompt"),
    ({"prompt": "To be [MASK:2] \ud83d", "infill": True}, 400, "prompt"),
    ({"prompt": "x", "stop": ["\ud800"]}, 400, "stop"),
    ({"prompt": "x", "user": "\x00"}, 400, "user"),
    # stop strings cut a continuation; an infilled template has none
    ({"prompt": "To be [MASK:2] not.", "infill": True, "stop": ["x"]}, 400, "stop"),
    # strict types, as the OpenAI API: no strings, booleans or floats for integers, no strings for booleans
    ({"prompt": "x", "max_tokens": "4"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 4.0}, 400, "max_tokens"),
    ({"prompt": "x", "n": "1"}, 400, "n"),
    ({"prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stream": 1}, 400, "stream"),
    ({"prompt": "x", "infill": "false"}, 400, "infill"),
    ({"prompt": "x", "temperature": "0.5"}, 400, "temperature"),
    ({"prompt": "x", "temperature": True}, 400, "temperature"),
])
def test_bad_input_is_a_4xx_naming_the_field(mdm, body, status, param):
    res = post_raw(mdm, json.dumps({"model": "mdm", **body}).encode())
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"], err


@pytest.mark.parametrize("message", [{"role": "user", "content": "a\ud800"}, {"role": "user", "content": "\u0000"},
                                     {"role": "user", "content": [{"type": "text", "text": "\udc00"}]}])
def test_bad_chat_text_is_a_400_naming_messages(mdm, message):
    res = post_raw(mdm, json.dumps({"model": "mdm", "messages": [message]}).encode(), "/v1/chat/completions")
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == "messages" and "messages.0.content" in err["message"], err


def test_temperature_may_be_an_integer(mdm):
    """JSON has one number type: 1 is a valid float, as in the OpenAI API."""
    assert complete(mdm, prompt="x", max_tokens=4, temperature=1, top_p=1)["choices"]


@pytest.mark.parametrize("server,room", [("mdm", 64), ("ar", 65)])
def test_context_error_counts_the_prompt_and_its_separator_once(request, runs, server, room):
    """A canvas is [separator; prompt; max_tokens new]: it must fit the context (an AR model never
    feeds its last new token back, so it takes one position more)."""
    from unmask.checkpoint import checkpoint_tokenizer

    url = request.getfixturevalue(server)
    prompt = "ROMEO. Good morrow, cousin."
    tokens = len(checkpoint_tokenizer(runs / server).encode(prompt))
    fits = room - 1 - tokens
    assert complete(url, prompt=prompt, max_tokens=fits)["choices"]
    res = post(url, {"model": server, "prompt": prompt, "max_tokens": fits + 1})
    assert res.status_code == 400 and res.json()["error"]["param"] == "max_tokens"
    message = res.json()["error"]["message"]
    assert f"prompt of {tokens} tokens + 1 separator + max_tokens {fits + 1} = {room + 1} positions" in message, message
    assert f"at most {room}" in message, message


def test_infill_context_error_counts_the_template_and_its_separator_once(mdm, runs):
    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.sampling.canvas import infill_ids

    template = "ROMEO. Good morrow, cousin. [MASK:30] my love, [MASK:10] the night. JULIET. Good night, good night."
    tokens = len(infill_ids(template, checkpoint_tokenizer(runs / "mdm")))
    assert tokens + 1 > 64 and template.count("MASK") == 2  # 40 blanks: within the server's max_tokens
    res = post(mdm, {"model": "mdm", "prompt": template, "infill": True})
    assert res.status_code == 400 and res.json()["error"]["param"] == "prompt"
    message = res.json()["error"]["message"]
    assert f"template of {tokens} tokens + 1 separator = {tokens + 1} positions" in message, message


@pytest.mark.parametrize("body,param", [({"block_length": 4}, "block_length"), ({"sampler": "confidence"}, "sampler"),
                                        ({"steps": 3}, "steps"), ({"infill": True, "prompt": "a [MASK] b"}, "infill")])
def test_mdm_fields_are_refused_on_an_ar_checkpoint(ar, body, param):
    res = post(ar, {"model": "ar", "prompt": "x", "max_tokens": 8, **body})
    assert res.status_code == 400 and res.json()["error"]["param"] == param


def test_malformed_bodies(mdm):
    for raw in (b'{"model": "mdm",', b"[1, 2]", b"", b'"text"', b'{"model": "mdm", "prompt": "a\x00"}'):
        res = post_raw(mdm, raw)
        assert res.status_code == 400 and "error" in res.json(), raw
    assert httpx.get(mdm + "/v1/nothing").json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b'{"model": "mdm", "prompt": "a\xff"}', b'{"model": "mdm", "prompt": "\xed\xa0\x80"}',
                                 b'{"model": "mdm", "prompt": "\xc3"}', b"\xfe\xff"])
def test_a_body_that_is_not_utf8_is_a_400(mdm, raw):
    res = post_raw(mdm, raw)
    assert res.status_code == 400, res.text
    assert "UTF-8" in res.json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(mdm):
    """Malformed JSON over the limit gets 413, not 400: the body is measured, not parsed, whether its
    size is declared (Content-Length) or only counted as it arrives (chunked)."""
    limit = LIMITS.max_body_bytes
    over = b'{"model": "mdm", "prompt": "' + b"x" * limit
    for content in (over, iter([over[i : i + 65536] for i in range(0, len(over), 65536)])):
        res = httpx.post(mdm + "/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
        assert res.status_code == 413, res.text
        err = res.json()["error"]
        assert str(limit) in err["message"] and "max_body_bytes" in err["message"] and "--" not in err["message"], err
    huge = httpx.post(mdm + "/v1/completions", content=b"{" * (16 << 20), headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413
    at_limit = json.dumps({"model": "mdm", "prompt": "x"}).encode()
    at_limit = at_limit[:-2] + b"x" * (limit - len(at_limit)) + b'"}'
    assert len(at_limit) == limit
    res = post_raw(mdm, at_limit)  # read and parsed: refused for its length in tokens, not its size in bytes
    assert res.status_code == 400 and res.json()["error"]["param"] == "prompt", res.text


class TimedTokenizer:
    """The server's tokenizer, recording when each encode ran (perf_counter seconds)."""

    def __init__(self, inner):
        self.inner, self.calls, self.entered = inner, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text):
        start = time.perf_counter()
        self.entered.set()
        try:
            return self.inner.encode(text)
        finally:
            self.calls.append((start, time.perf_counter()))


def test_health_answers_within_100ms_while_a_maximal_request_is_tokenised(runs):
    """A prompt filling the largest body the server reads takes about a second to tokenise (then is
    refused: too long for the context); /health, asked meanwhile, answers within 100 ms, before the
    tokenisation ends."""
    engine = Engine(runs / "mdm", "cpu", LIMITS)
    engine.tok = timed = TimedTokenizer(engine.tok)
    raw = json.dumps({"model": "mdm", "prompt": ""}).encode()
    fill = LIMITS.max_body_bytes - len(raw)
    raw = raw[:-2] + (b"To be, or not to be. " * fill)[:fill] + b'"}'  # exactly the largest body the server reads
    with served(engine) as url, ThreadPoolExecutor(1) as pool, httpx.Client(timeout=30) as client:
        client.get(url + "/health")  # connected
        pending = pool.submit(post_raw, url, raw)
        assert timed.entered.wait(30)
        asked = time.perf_counter()
        assert client.get(url + "/health").status_code == 200
        answered = time.perf_counter()
        res = pending.result()
    assert res.status_code == 400 and res.json()["error"]["param"] == "prompt"
    (begin, end), = timed.calls
    assert begin <= asked and answered <= end, "/health was not answered while the prompt was tokenised"
    assert answered - asked < 0.1, answered - asked


class SlowNetwork(torch.nn.Module):
    """The network, 50 ms slower per forward: a decode of 64 steps takes seconds, whatever the machine."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, *args, **kwargs):
        time.sleep(0.05)
        return self.inner(*args, **kwargs)


def test_health_answers_while_decoding_and_a_gone_client_frees_its_slot(runs):
    engine = Engine(runs / "mdm", "cpu", LIMITS)
    engine.scheduler.model = SlowNetwork(engine.model)
    body = {"model": "mdm", "prompt": "ROMEO.", "max_tokens": 32, "steps": 64, "stream": True, "stream_canvas": True, "seed": 1}
    with served(engine) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as res:
            lines = res.iter_lines()
            assert next(lines).startswith("event: canvas")
            health = httpx.get(url + "/health", timeout=5).json()  # answered while the request decodes
            assert health["running"] == 1
        # the client went away mid-stream: the server stops the decoding (not run to its end) and frees the slot
        for _ in range(200):
            health = httpx.get(url + "/health").json()
            if health["running"] == 0:
                break
            time.sleep(0.05)
        assert health["running"] == 0 and health["waiting"] == 0 and health["cancelled"] == 1
        assert health["batching"]["forwards"] < 64
        assert engine.scheduler.active == 0


def test_full_queue_gets_429_and_a_slow_request_504(runs):
    engine = Engine(runs / "mdm", "cpu", Limits(max_active=1, max_queue=1, timeout=30))
    engine.scheduler.model = SlowNetwork(engine.model)
    body = {"model": "mdm", "prompt": "ROMEO.", "max_tokens": 32, "steps": 32, "sampler": "confidence", "seed": 1}

    async def three(url):
        async with httpx.AsyncClient(timeout=60) as client:
            async def until(key, value):
                while (await client.get(url + "/health")).json()[key] != value:
                    await asyncio.sleep(0.01)

            first = asyncio.create_task(client.post(url + "/v1/completions", json=body))
            await until("running", 1)  # decoding: 32 forwards of at least 50 ms each
            second = asyncio.create_task(client.post(url + "/v1/completions", json=body))
            await until("waiting", 1)
            third = await client.post(url + "/v1/completions", json=body)
            return (await first).status_code, (await second).status_code, third

    with served(engine) as url:
        first, second, third = asyncio.run(three(url))
        assert (first, second, third.status_code) == (200, 200, 429)
        assert third.json()["error"]["type"] == "rate_limit_exceeded"
    engine = Engine(runs / "mdm", "cpu", Limits(timeout=0.2))
    engine.scheduler.model = SlowNetwork(engine.model)
    with served(engine) as url:
        res = post(url, body)
        assert res.status_code == 504 and res.json()["error"]["type"] == "timeout"
        assert httpx.get(url + "/health").json()["running"] == 0


def test_openai_client(mdm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=mdm + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["mdm"]
    res = client.completions.create(model="mdm", prompt="ROMEO.", max_tokens=12, seed=4, n=2)
    expected = [c["text"] for c in complete(mdm, prompt="ROMEO.", max_tokens=12, seed=4, n=2)["choices"]]
    assert [c.text for c in res.choices] == expected
    parts = {0: "", 1: ""}
    for chunk in client.completions.create(model="mdm", prompt="ROMEO.", max_tokens=12, seed=4, n=2, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
    assert [parts[0], parts[1]] == expected
    chat = client.chat.completions.create(model="mdm", messages=[{"role": "user", "content": "Speak."}], max_tokens=8, seed=2)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="mdm", messages=[{"role": "user", "content": "Speak."}], max_tokens=8, seed=2, stream=True))
    assert streamed == chat.choices[0].message.content
    extra = client.completions.create(model="mdm", prompt="ROMEO.", max_tokens=8, extra_body={"sampler": "confidence", "steps": 4})
    assert extra.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="mdm", prompt="x", temperature=5)


def test_load_200_requests_from_8_clients(mdm):
    res = load_test(mdm, {"model": "mdm", "prompt": "ROMEO.", "max_tokens": 8, "steps": 4}, requests=200, clients=8)
    print("\n" + summary(res))
    assert res["answered"] == 200 and res["statuses"] == {200: 200} and not res["errors"]
    assert res["healthy_after"] and res["requests_per_forward"] > 1



@pytest.fixture(scope="module")
def small_mdm(runs):
    """A server with tight limits: generated requests are refused or decoded quickly (their
    constraints compiled within a second)."""
    engine = Engine(runs / "mdm", "cpu", Limits(max_tokens=16, max_n=2, max_prompts=2, max_steps=8, max_active=4, max_queue=8, timeout=60,
                                                compile_seconds=1))
    with served(engine) as url:
        yield url


# text a JSON string can carry but a tokenizer cannot take: lone surrogates (escaped in JSON; as raw
# bytes they make the body invalid UTF-8) and NUL
HAZARDS = ["\ud800", "\udfff", "\ud83d", "\x00"]


def string_paths(value, path=()):
    """The paths (keys and indices) to the strings of a JSON document, the model id left out (a
    hazard there would only make a 404)."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from string_paths(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            if path or key != "model":
                yield from string_paths(item, (*path, key))


def spiked(data, body):
    """``body`` (a JSON document) with a hazard drawn into one of its strings."""
    from hypothesis import strategies as st

    paths = list(string_paths(body))
    if not paths:
        return body
    path = data.draw(st.sampled_from(paths))

    def spike(value, rest):
        if not rest:
            at = data.draw(st.integers(0, len(value)))
            return value[:at] + data.draw(st.sampled_from(HAZARDS)) + value[at:]
        copy = list(value) if isinstance(value, list) else dict(value)
        copy[rest[0]] = spike(value[rest[0]], rest[1:])
        return copy

    return spike(body, path)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_property_based_no_5xx(small_mdm, mode):
    """Requests generated from the OpenAPI schema (fitting it, and violating it), then the same with
    lone surrogates and NUL drawn into their strings (sent escaped, and as bytes that are not UTF-8),
    never get a 5xx; every answer has a documented status (statuses_documented checks the spiked
    ones), media type and schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(small_mdm + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/health"}
    for operation in operations:
        if mode == "negative" and operation.method.lower() != "post":
            continue  # nothing to violate in a GET without a body
        strategy = operation.as_strategy(GenerationMode(mode))

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def check(data):
            case = data.draw(strategy)
            case.call_and_validate(checks=checks)
            if operation.method.lower() == "post" and not isinstance(case.body, bytes):  # bytes: a body that is not JSON
                body = spiked(data, case.body)
                for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")):
                    res = post_raw(small_mdm, raw, operation.path)
                    assert res.status_code < 500, res.text
                    operation.validate_response(res)

        check()


def test_openapi_document_lists_what_the_server_answers(mdm):
    """Statuses (400, never 422), media types (a streamed 200 is text/event-stream), and a
    description for every field; real answers, streamed ones included, fit the document."""
    schemathesis = pytest.importorskip("schemathesis")
    doc = httpx.get(mdm + "/openapi.json").json()
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            assert "422" not in operation["responses"], (method, path)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "404", "413", "429", "499", "504"}, path
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}, path
    assert set(doc["paths"]["/v1/models/{model}"]["get"]["responses"]) == {"200", "404"}
    schemas = doc["components"]["schemas"]
    assert not {"HTTPValidationError", "ValidationError"} & set(schemas)
    undescribed = [f"{name}.{field}" for name, schema in schemas.items() for field, prop in schema.get("properties", {}).items()
                   if not prop.get("description")]
    assert not undescribed

    api = schemathesis.openapi.from_dict(doc)
    chat = [{"role": "user", "content": "Speak."}]
    answers = [
        ("/v1/completions", {"prompt": ["ROMEO.", "KING."], "max_tokens": 8, "n": 2, "stop": ["\n"], "seed": 1}),
        ("/v1/completions", {"prompt": "ROMEO.", "max_tokens": 8, "stream": True, "stream_canvas": True, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 8}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 8, "n": 2, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 8, "stream": True, "stream_canvas": True}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ]
    for path, body in answers:
        res = post(mdm, {"model": "mdm", **body}, path)
        api[path]["POST"].validate_response(res)
    for route, path in [("/v1/models", "/v1/models"), ("/v1/models/{model}", "/v1/models/mdm"), ("/v1/models/{model}", "/v1/models/gpt-4"),
                        ("/health", "/health")]:
        api[route]["GET"].validate_response(httpx.get(mdm + path))


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


@contextmanager
def browser_page(url, height=620):
    """The page of the server at ``url`` in headless Chromium, once it has loaded the model."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (in the [dev] extra)")
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package when run as root "
                    "(apt-get install -y chromium); browser downloads are not used")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": height})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('context')")
            yield page
        finally:
            browser.close()


def generate(page, prompt, state="done", **fields):
    """Fill the form and generate until the status is ``state``; returns the masked count of every
    frame drawn, the masked positions left on the canvas and its text."""
    if fields.pop("infill", False):
        page.check("input[value=infill]")
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        if name == "sampler":
            page.select_option("#sampler", value)
        else:
            page.fill(f"#{name}", str(value))
    page.click("#generate")
    page.wait_for_selector(f"#status[data-state={state}]", timeout=60000)
    return page.evaluate("window.unmaskFrames"), page.locator("#canvas .mask").count(), page.inner_text("#canvas")


def drive_page(url, screenshot, prompt, **fields):
    """Open the page, generate once and take a screenshot."""
    with browser_page(url) as page:
        out = generate(page, prompt, **fields)
        page.screenshot(path=str(screenshot))
    return out


def test_page_in_headless_chromium(mdm, tmp_path):
    frames, left, text = drive_page(mdm, tmp_path / "mdm.png", "KING RICHARD.", sampler="confidence", max_tokens=16, steps=8,
                                    temperature=0.5, seed=3)
    assert frames == [14, 12, 10, 8, 6, 4, 2, 0] and left == 0  # every intermediate canvas was drawn, the last fully unmasked
    assert text.startswith("KING RICHARD.") and (tmp_path / "mdm.png").stat().st_size > 1000


def test_page_fills_blanks_and_works_for_ar(mdm, ar, tmp_path):
    frames, left, text = drive_page(mdm, tmp_path / "infill.png", "To be, [MASK:3] not to be: [MASK:2] the question.", infill=True,
                                    sampler="confidence", steps=5, seed=1)
    assert frames == [4, 3, 2, 1, 0] and left == 0 and text.startswith("To be, ") and text.endswith(" the question.")
    frames, left, _ = drive_page(ar, tmp_path / "ar.png", "ROMEO.", max_tokens=8, seed=1)
    assert frames == [7, 6, 5, 4, 3, 2, 1, 0] and left == 0  # left to right, one token per step


def test_page_shows_an_error_in_place_of_the_canvas(mdm, tmp_path):
    """A refused request replaces the previous canvas by the error message, in view."""
    with browser_page(mdm, height=480) as page:
        generate(page, "KING RICHARD.", sampler="confidence", max_tokens=40, steps=8, seed=3)
        assert page.locator("#canvas .tok").count() > 0
        _, left, text = generate(page, "KING RICHARD.", state="error", max_tokens=16, block_length=5)
        page.screenshot(path=str(tmp_path / "error.png"))
        error = page.locator("#canvas .error")
        assert error.is_visible() and "block_length" in error.inner_text()
        assert page.locator("#canvas .tok").count() == 0 and left == 0 and "KING" not in text  # the stale canvas is gone
        box, canvas = error.bounding_box(), page.locator("#canvas").bounding_box()
        assert canvas["y"] <= box["y"] and box["y"] + box["height"] <= min(canvas["y"] + canvas["height"], 480)
        generate(page, "KING RICHARD.", max_tokens=16, block_length=0, steps=8)  # the next request draws again
        assert page.locator("#canvas .error").count() == 0 and page.locator("#canvas .tok").count() > 0


def test_a_port_in_use_is_an_option_error_naming_it():
    """The library names the parameters (the command line writes their flags)."""
    import socket

    from unmask.errors import OptionError
    from unmask.serve.run import bind

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OptionError, match=f"host 127.0.0.1 port {port}: cannot listen there .*; pick another port") as caught:
            bind("127.0.0.1", port)
    finally:
        taken.close()
    assert caught.value.param == "port" and "--" not in str(caught.value)


def test_serve_command_errors(capsys, runs, tmp_path):
    import socket

    from unmask.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(runs / "mdm"), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--host 127.0.0.1 --port {port}: cannot listen there" in err and "pick another --port" in err, err
    finally:
        taken.close()
    for flag in ("--max-n", "--max-body-bytes"):
        assert main(["serve", "--checkpoint", str(runs / "mdm"), flag, "0"]) == 2
        assert flag in capsys.readouterr().err
