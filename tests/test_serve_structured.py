"""Structured output through the server on loopback: response_format (json_schema through the
official openai client, json_object), regex and choice on an MDM, a block model and an AR
checkpoint, with n > 1, streamed and beside free requests; each constraint compiled once; bad
constraints refused naming their field (the schema's compile time bounded too)."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from serving import LIMITS, ar, complete, events, mdm, model_id, post, runs, served, statuses_documented  # noqa: E402,F401
from unmask import ModelConfig, TrainConfig  # noqa: E402
from unmask.serve.engine import Engine, Limits  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                                           "role": {"enum": ["king", "fool"]}}, "required": ["name", "age", "role"]}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
CODE = "[0-9]{3}-[a-z]{2,5}"
CHOICES = ["yes", "no", "perhaps"]
CHAT = [{"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def bd3(runs, tmp_path_factory):
    """A block model (bd3, blocks of 4 tokens) with untrained weights and the runs' tokenizer."""
    from unmask.checkpoint import TrainerState, resolve_checkpoint, save_checkpoint
    from unmask.config import RunConfig
    from unmask.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", context_len=64, vocab_size=512, block_causal=4)
    run = tmp_path_factory.mktemp("bd3")
    tokenizer = (resolve_checkpoint(runs / "mdm") / "tokenizer.json").read_text(encoding="utf-8")
    save_checkpoint(run, Transformer(config), RunConfig(config, TrainConfig(objective="bd3", block_size=4)), TrainerState(0, 0), tokenizer)
    with served(Engine(run, "cpu", LIMITS)) as url:
        yield url


def texts(answer: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in answer["choices"]]


def test_json_schema_through_the_openai_client(mdm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=mdm + "/v1", api_key="unused")
    res = client.chat.completions.create(model="mdm", messages=CHAT, max_tokens=40, n=2, seed=1, response_format=PERSON_FORMAT,
                                         extra_body={"sampler": "confidence", "steps": 10})
    assert len(res.choices) == 2
    for choice in res.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    free = client.chat.completions.create(model="mdm", messages=CHAT, max_tokens=40, seed=1, response_format={"type": "text"})
    same = client.chat.completions.create(model="mdm", messages=CHAT, max_tokens=40, seed=1)
    assert free.choices[0].message.content == same.choices[0].message.content  # text: no constraint
    with pytest.raises(openai.BadRequestError, match="max_tokens=8 is too short for the constraint: it needs at least"):
        client.chat.completions.create(model="mdm", messages=CHAT, max_tokens=8, response_format=PERSON_FORMAT)


@pytest.mark.parametrize("server,extra", [("mdm", {"steps": 6}), ("mdm", {"block_length": 4, "steps": 6, "temperature": 0}),
                                          ("bd3", {}), ("ar", {})])
def test_regex_choice_and_json_object_are_matched(request, server, extra):
    url = request.getfixturevalue(server)
    body = {"prompt": ["ROMEO.", "KING."], "max_tokens": 12, "n": 2, "seed": 5, **extra}
    for text in texts(complete(url, **body, regex=CODE)):
        assert re.fullmatch(CODE, text), text
    assert set(texts(complete(url, **body, choice=CHOICES))) <= set(CHOICES)
    for text in texts(complete(url, **{**body, "max_tokens": 24}, response_format={"type": "json_object"})):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("server,path", [("mdm", "/v1/chat/completions"), ("ar", "/v1/completions")])
def test_streamed_constrained_text_is_the_answer(request, server, path):
    url = request.getfixturevalue(server)
    body = {"max_tokens": 12, "n": 2, "seed": 7, "regex": CODE, **({"messages": CHAT} if "chat" in path else {"prompt": "ROMEO."})}
    answer = post(url, {"model": server, **body}, path).json()
    got = events(url, {**body, "stream": True}, path)
    assert got[-1] == (None, "[DONE]")
    for i, text in enumerate(texts(answer)):
        parts = [c["choices"][0] for _, c in got[:-1] if c["choices"][0]["index"] == i]
        assert "".join(p["delta"]["content"] if "delta" in p else p["text"] for p in parts) == text
        assert re.fullmatch(CODE, text), text


def test_constrained_and_free_requests_share_forwards_and_keep_their_texts(mdm):
    """A constrained and a free request decoded at once: the same texts as one at a time (the
    constraint is the constrained rows' own), and forwards that served both."""
    common = {"prompt": "ROMEO.", "max_tokens": 16, "sampler": "confidence", "steps": 16, "seed": 3}
    bodies = [{**common, "regex": CODE}, common]
    alone = [texts(complete(mdm, **body)) for body in bodies]
    before = httpx.get(mdm + "/health").json()["batching"]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda body: texts(complete(mdm, **body)), bodies))
    after = httpx.get(mdm + "/health").json()["batching"]
    assert together == alone and re.fullmatch(CODE, together[0][0])
    assert after["calls"] - before["calls"] > after["forwards"] - before["forwards"]  # some forward served both


def test_a_constraint_is_compiled_once(mdm):
    pattern = f"[a-z]{{2}}{time.time_ns()}"  # a pattern no other request has used
    counts = [httpx.get(mdm + "/health").json()["constraints"]]
    for seed in (1, 2):
        complete(mdm, prompt="x", max_tokens=30, seed=seed, regex=pattern)
        counts.append(httpx.get(mdm + "/health").json()["constraints"])
    assert counts[1]["compiled"] == counts[0]["compiled"] + 1
    assert counts[2]["compiled"] == counts[1]["compiled"] and counts[2]["reused"] == counts[1]["reused"] + 1


@pytest.mark.parametrize("body,param,words", [
    ({"regex": "("}, "regex", "does not compile"),
    ({"regex": CODE, "choice": ["a"]}, "choice", "regex and choice: give one constraint"),
    ({"regex": CODE, "response_format": {"type": "json_object"}}, "response_format", "regex and response_format"),
    ({"choice": []}, "choice", "at least 1 item"),
    ({"choice": ["a", 1]}, "choice", "choice.1"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format",
     "response_format is not a valid JSON Schema"),
    ({"response_format": PERSON_FORMAT, "max_tokens": 8}, "max_tokens", "max_tokens=8 is too short for the constraint: it needs at least"),
    ({"regex": "[0-9]{20}", "max_tokens": 8}, "max_tokens", "it needs at least"),
    ({"regex": CODE, "stop": ["-"]}, "stop", "stop cannot be combined with a constraint"),
])
def test_bad_constraints_are_a_400_naming_the_field(mdm, body, param, words):
    res = post(mdm, {"model": "mdm", "prompt": "x", "max_tokens": 12, **body})
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_chat_names_max_completion_tokens(mdm):
    res = post(mdm, {"model": "mdm", "messages": CHAT, "max_completion_tokens": 3, "regex": "[0-9]{5}"}, "/v1/chat/completions")
    assert res.status_code == 400 and res.json()["error"]["param"] == "max_completion_tokens", res.text
    assert "max_completion_tokens=3 is too short for the constraint" in res.json()["error"]["message"]


def test_a_schema_too_large_to_compile_in_time_is_refused(runs):
    """The schema {} (any JSON value) compiles for minutes: past compile_seconds the compile is
    stopped and the request refused, naming response_format; the refusal is kept (no second try)."""
    with served(Engine(runs / "mdm", "cpu", Limits(max_tokens=16, compile_seconds=0.5))) as url:
        body = {"model": model_id(url), "prompt": "x", "max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {
            "name": "anything", "schema": {}}}}
        res = post(url, body)
        assert res.status_code == 400 and res.json()["error"]["param"] == "response_format", res.text
        assert "takes more than 0.5 s to compile" in res.json()["error"]["message"]
        started = time.perf_counter()
        assert post(url, body).json() == res.json() and time.perf_counter() - started < 0.5
        fresh = f"[0-9]{{2}}{time.time_ns() % 1000}"  # not compiled before: a new worker compiles it
        assert re.fullmatch(fresh, complete(url, prompt="x", max_tokens=8, regex=fresh)["choices"][0]["text"])


def test_openapi_shows_the_constraint_fields(mdm):
    schemas = httpx.get(mdm + "/openapi.json").json()["components"]["schemas"]
    for request in ("CompletionRequest", "ChatRequest"):
        fields = schemas[request]["properties"]
        assert {"response_format", "regex", "choice"} <= set(fields)
        assert "json_schema" in fields["response_format"]["description"] and "nested at most 2 deep" in fields["response_format"]["description"]
    kinds = {schemas[name]["properties"]["type"]["const"] for name in ("TextFormat", "JsonObjectFormat", "JsonSchemaFormat")}
    assert kinds == {"text", "json_object", "json_schema"}
    assert "nested at most 2 deep" in schemas["JsonObjectFormat"]["properties"]["type"]["description"]
    assert set(schemas["JsonSchema"]["required"]) == {"name", "schema"}
