"""Serving: an OpenAI-compatible HTTP server that decodes concurrent requests together, and a page
that shows the denoising.

    engine.py    a checkpoint, the checks a request passes, its canvas, its decoding and its text
    batcher.py   the scheduler: every request's sampler loop calls a proxy; calls of one shape share a forward
    schemas.py   request/response bodies (the OpenAPI schema)
    compiler.py  structured output: requests' constraints compiled in a worker process, within a time limit, each once
    app.py       the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, the page
    run.py       uvicorn in the foreground or in a background thread
    load.py      a bounded load test of a running server
    static/      the page (plain HTML/CSS/JS)
"""
