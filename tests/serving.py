"""Shared by the server tests: tiny checkpoints, servers on loopback whose every answer is checked
against the server's own OpenAPI document, and request helpers."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from starlette.routing import Match

from unmask import ModelConfig, TrainConfig, train
from unmask.serve.app import create_app
from unmask.serve.engine import Engine, Limits
from unmask.serve.run import serve_in_background

LIMITS = Limits(max_tokens=48, max_n=4, max_prompts=4, max_steps=64, max_active=8, max_queue=32, timeout=120)

# (method, route, status) answers a server gave that its OpenAPI document does not list for that route
UNDOCUMENTED: list[tuple[str, str, int]] = []


class DocumentedStatuses:
    """ASGI wrapper of the app: the status of every answer to a documented route and method is looked
    up in the app's own /openapi.json; the ones missing there are recorded in UNDOCUMENTED."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        route = self.route(scope) if scope["type"] == "http" else None

        async def checked(message):
            if route is not None and message["type"] == "http.response.start":
                documented = self.app.openapi()["paths"][route].get(scope["method"].lower(), {}).get("responses")
                if documented is not None and str(message["status"]) not in documented:
                    UNDOCUMENTED.append((scope["method"], route, message["status"]))
            await send(message)

        await self.app(scope, receive, checked)

    def route(self, scope) -> str | None:
        """The documented path template the request goes to (None: an undocumented path)."""
        paths = self.app.openapi()["paths"]
        for candidate in self.app.routes:
            if candidate.matches(scope)[0] == Match.FULL and getattr(candidate, "path", None) in paths:
                return candidate.path
        return None


@pytest.fixture(autouse=True)
def statuses_documented():
    """After every test: every status the servers answered with is documented for its route."""
    UNDOCUMENTED.clear()
    yield
    assert not UNDOCUMENTED, f"answers with a status /openapi.json does not list for the route: {sorted(set(UNDOCUMENTED))}"


@contextmanager
def served(engine: Engine) -> Iterator[str]:
    """The app of ``engine`` on loopback (answers checked against its OpenAPI document); yields the base URL."""
    with serve_in_background(DocumentedStatuses(create_app(engine))) as url:
        yield url


# the checkpoints of `runs`, by data folder: trained once per session (every module that imports the
# fixture gets a fixture of its own, and the tests only read them)
TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A tiny MDM and AR checkpoint (a few training steps: the tests need a network, not a good one)."""
    if str(small_data) not in TRAINED:
        root = tmp_path_factory.mktemp("serve_runs")
        for objective in ("mdm", "ar"):
            cfg = ModelConfig.from_name("tiny", context_len=64, vocab_size=512, causal=objective == "ar")
            train(root / objective, cfg, TrainConfig(objective=objective, steps=2, batch_size=4, eval_every=2, checkpoint_every=2),
                  small_data, progress=False)
        TRAINED[str(small_data)] = root
    return TRAINED[str(small_data)]


@pytest.fixture(scope="module")
def mdm(runs):
    with served(Engine(runs / "mdm", "cpu", LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def ar(runs):
    with served(Engine(runs / "ar", "cpu", LIMITS)) as url:
        yield url


def post(url, body, path="/v1/completions"):
    return httpx.post(url + path, json=body, timeout=60)


def post_raw(url, raw: bytes, path="/v1/completions"):
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)


def model_id(url):
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def complete(url, **body):
    res = post(url, {"model": model_id(url), **body})
    assert res.status_code == 200, res.text
    return res.json()


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
