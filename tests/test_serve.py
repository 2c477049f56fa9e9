"""The HTTP server against the real app on loopback: OpenAI-style answers, streaming, seeds, stop
strings, batching that leaves every result unchanged, errors that name the field, a freed slot when
a client goes away, the official openai client, and a bounded load test."""

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
httpx = pytest.importorskip("httpx")

from unmask import ModelConfig, TrainConfig, train  # noqa: E402
from unmask.serve.app import create_app  # noqa: E402
from unmask.serve.engine import Engine, Limits  # noqa: E402
from unmask.serve.load import load_test, summary  # noqa: E402
from unmask.serve.run import serve_in_background  # noqa: E402

LIMITS = Limits(max_tokens=48, max_n=4, max_prompts=4, max_steps=64, max_active=8, max_queue=32, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A tiny MDM and AR checkpoint (a few training steps: the tests need a network, not a good one)."""
    root = tmp_path_factory.mktemp("serve_runs")
    for objective in ("mdm", "ar"):
        cfg = ModelConfig.from_name("tiny", context_len=64, vocab_size=512, causal=objective == "ar")
        train(root / objective, cfg, TrainConfig(objective=objective, steps=2, batch_size=4, eval_every=2, checkpoint_every=2),
              small_data, progress=False)
    return root


@pytest.fixture(scope="module")
def mdm(runs):
    engine = Engine(runs / "mdm", "cpu", LIMITS)
    with serve_in_background(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def ar(runs):
    engine = Engine(runs / "ar", "cpu", LIMITS)
    with serve_in_background(create_app(engine)) as url:
        yield url


def post(url, body, path="/v1/completions"):
    return httpx.post(url + path, json=body, timeout=60)


def complete(url, **body):
    res = post(url, {"model": model_id(url), **body})
    assert res.status_code == 200, res.text
    return res.json()


def model_id(url):
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def events(url, body, path="/v1/completions"):
    """The server-sent events of a streamed request: [(event name or None, parsed data or '[DONE]')]."""
    out = []
    with httpx.stream("POST", url + path, json={"model": model_id(url), **body}, timeout=60) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        for block in res.read().decode().split("\n\n"):
            if not block.strip():
                continue
            name, data = None, ""
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]
            out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


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


@pytest.mark.parametrize("server,requests", [("mdm", REQUESTS), ("ar", AR_REQUESTS)])
def test_concurrent_requests_equal_one_at_a_time(request, server, requests):
    """Batching changes which rows share a forward, never a result: every request decoded alongside
    the others gives exactly the text it gives alone (fixed seeds)."""
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
])
def test_bad_input_is_a_4xx_naming_the_field(mdm, body, status, param):
    res = post(mdm, {"model": "mdm", **body})
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("body,param", [({"block_length": 4}, "block_length"), ({"sampler": "confidence"}, "sampler"),
                                        ({"steps": 3}, "steps"), ({"infill": True, "prompt": "a [MASK] b"}, "infill")])
def test_mdm_fields_are_refused_on_an_ar_checkpoint(ar, body, param):
    res = post(ar, {"model": "ar", "prompt": "x", "max_tokens": 8, **body})
    assert res.status_code == 400 and res.json()["error"]["param"] == param


def test_malformed_bodies(mdm):
    for raw in (b'{"model": "mdm",', b"[1, 2]", b"", b'"text"'):
        res = httpx.post(mdm + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert res.status_code == 400 and "error" in res.json(), raw
    assert httpx.get(mdm + "/v1/nothing").json()["error"]["type"] == "invalid_request_error"


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
    with serve_in_background(create_app(engine)) as url:
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

    with serve_in_background(create_app(engine)) as url:
        first, second, third = asyncio.run(three(url))
        assert (first, second, third.status_code) == (200, 200, 429)
        assert third.json()["error"]["type"] == "rate_limit_exceeded"
    engine = Engine(runs / "mdm", "cpu", Limits(timeout=0.2))
    engine.scheduler.model = SlowNetwork(engine.model)
    with serve_in_background(create_app(engine)) as url:
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
    """A server with tight limits: generated requests are refused or decoded quickly."""
    engine = Engine(runs / "mdm", "cpu", Limits(max_tokens=8, max_n=2, max_prompts=2, max_steps=8, max_active=4, max_queue=8, timeout=60))
    with serve_in_background(create_app(engine)) as url:
        yield url


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_property_based_no_5xx(small_mdm, mode):
    """Requests generated from the OpenAPI schema (fitting it, and violating it) never get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(small_mdm + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for operation in operations:
        if mode == "negative" and operation.method.lower() != "post":
            continue  # nothing to violate in a GET without parameters
        strategy = operation.as_strategy(GenerationMode(mode))

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def check(data):
            data.draw(strategy).call_and_validate(checks=[not_a_server_error])

        check()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def drive_page(url, screenshot, prompt, **fields):
    """Open the page in headless Chromium, fill the form, generate; returns the masked count of every
    frame drawn and the masked positions left on the page."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (in the [dev] extra)")
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package when run as root "
                    "(apt-get install -y chromium); browser downloads are not used")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('context')")
            if fields.pop("infill", False):
                page.check("input[value=infill]")
            page.fill("#prompt", prompt)
            for name, value in fields.items():
                if name == "sampler":
                    page.select_option("#sampler", value)
                else:
                    page.fill(f"#{name}", str(value))
            page.click("#generate")
            page.wait_for_selector("#status[data-state=done]", timeout=60000)
            frames = page.evaluate("window.unmaskFrames")
            left = page.locator("#canvas .mask").count()
            text = page.inner_text("#canvas")
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return frames, left, text


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


def test_serve_command_errors(capsys, runs, tmp_path):
    import socket

    from unmask.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", "--checkpoint", str(runs / "mdm"), "--port", str(taken.getsockname()[1])]) == 2
        assert "--port" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["serve", "--checkpoint", str(runs / "mdm"), "--max-n", "0"]) == 2
    assert "--max-n=0" in capsys.readouterr().err
