"""``unmask serve``: an OpenAI-compatible HTTP server (and a page that animates the decoding) for a
trained MDM or AR checkpoint. Needs the ``[serve]`` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app
from unmask.cli.sampler_options import COMPILE_HELP


@app.command()
def serve(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder (MDM or AR)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free port)."),
    device: str = typer.Option("auto"),
    name: Optional[str] = typer.Option(None, help="Model id clients pass as `model` (default: the run folder's name)."),
    max_tokens: int = typer.Option(256, min=1, help="Most tokens a request may ask for per choice."),
    max_n: int = typer.Option(8, min=1, help="Most choices per prompt (n)."),
    max_steps: int = typer.Option(1024, min=1, help="Most MDM steps per request."),
    max_active: int = typer.Option(16, min=1, help="Requests decoded together (calls of the same shape share one forward per step)."),
    max_queue: int = typer.Option(64, min=1, help="Requests waiting for a slot before new ones get 429."),
    timeout: float = typer.Option(300.0, help="Seconds a request may take from arrival (waiting included)."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body read (bytes); larger ones get 413 before they are parsed."),
    compile_seconds: float = typer.Option(20.0, help="Longest a structured-output constraint may take to compile; longer ones get 400."),
    reward: Optional[list[str]] = typer.Option(None, help="A reward guided requests may name: NAME=SPEC, SPEC one of ar:RUN, "
                                               "regex:PATTERN, classifier:RUN:LABEL, python:MODULE:FUNCTION (repeat the flag)."),
    max_particles: int = typer.Option(8, min=1, help="Most particles (or candidates per step) a guided request may ask for."),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
) -> None:
    """Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health, and a page at /."""
    from unmask.errors import UnmaskError

    try:
        import uvicorn  # noqa: F401

        from unmask.serve.app import create_app
    except ImportError as exc:
        raise UnmaskError(f"unmask serve needs the [serve] extra ({exc.name} is missing): pip install 'unmask[serve]'") from None
    from unmask.serve.engine import Engine, Limits
    from unmask.serve.run import bind, serve_forever, url_of

    limits = Limits(max_tokens, max_n, 8, max_steps, max_active, max_queue, timeout, max_body_bytes=max_body_bytes,
                    compile_seconds=compile_seconds, max_particles=max_particles)
    engine = Engine(checkpoint, device, limits, name, configured_rewards(reward or [], device), compile=compile)
    if compile:  # the default request's shapes compiled before the first request meets them
        typer.echo(f"compiled the default request's shapes in {engine.warm_up():.1f} s", err=True)
    sock = bind(host, port)
    url = url_of(sock)
    typer.echo(f"serving {engine.name!r} ({engine.config.train.objective}, {engine.device}{', compiled' if compile else ''}) at {url}/ "
               f"(OpenAI base URL {url}/v1; API docs at {url}/docs)")
    serve_forever(create_app(engine), sock)


def configured_rewards(given: list[str], device: str) -> dict:
    """The server's rewards from ``NAME=SPEC`` strings, each loaded once, here (a request names one)."""
    import re

    from unmask.device import pick_device
    from unmask.errors import OptionError
    from unmask.steering.rewards import parse_score

    rewards = {}
    for item in given:
        name, _, spec = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or not spec:
            raise OptionError("reward", "{reward} {_item!r} must read NAME=SPEC, NAME of letters, digits, '_', '.' and '-'", _item=item)
        if name in rewards:
            raise OptionError("reward", "{reward} {_name!r} is given twice", _name=name)
        rewards[name] = parse_score(spec, "reward", pick_device(device))
    return rewards
