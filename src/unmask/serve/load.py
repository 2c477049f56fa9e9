"""A bounded load test of a running server: ``requests`` completions from ``clients`` concurrent
clients (threads with keep-alive connections, standard library only), latency percentiles, and the
batching the server did meanwhile (requests per forward, from /health).

    python -m unmask.serve.load http://127.0.0.1:8000 --requests 200 --clients 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlsplit


def _connection(base_url: str) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=300)


def get_json(base_url: str, path: str) -> dict:
    conn = _connection(base_url)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, linear between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def load_test(base_url: str, body: dict, requests: int = 200, clients: int = 8, vary: list[dict] | None = None) -> dict:
    """Send ``requests`` POST /v1/completions of ``body`` (request i gets seed i and the fields of
    ``vary[i % len(vary)]``) from ``clients`` threads. Returns counts, requests/s, latency
    percentiles (s), batching figures and the health after."""
    before = get_json(base_url, "/health")["batching"]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        conn = _connection(base_url)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            payload = json.dumps({**body, **(vary[i % len(vary)] if vary else {}), "seed": i})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
                res = conn.getresponse()
                data = json.loads(res.read())
                ok = res.status == 200 and len(data.get("choices", [])) == body.get("n", 1)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                conn = _connection(base_url)
                with lock:
                    errors.append(f"request {i}: {exc!r}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                statuses[res.status] = statuses.get(res.status, 0) + 1
                if not ok:
                    errors.append(f"request {i}: status {res.status}: {str(data)[:200]}")
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    health = get_json(base_url, "/health")
    after = health["batching"]
    forwards = after["forwards"] - before["forwards"]
    served = after["requests_per_forward"] - before["requests_per_forward"]
    return {
        "requests": requests, "clients": clients, "answered": len(latencies), "statuses": statuses, "errors": errors,
        "seconds": seconds, "requests_per_s": len(latencies) / seconds,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95), "p99": percentile(latencies, 0.99),
                      "mean": statistics.fmean(latencies), "max": max(latencies)} if latencies else {},
        "forwards": forwards, "requests_per_forward": served / forwards if forwards else 0.0,
        "max_requests_per_forward": after["max_requests_per_forward"], "healthy_after": health["status"] == "ok",
        "latencies": latencies,
    }


def summary(res: dict) -> str:
    lat = res["latency_s"]
    return (f"{res['answered']}/{res['requests']} answered from {res['clients']} clients in {res['seconds']:.1f} s "
            f"({res['requests_per_s']:.1f} requests/s), latency p50 {lat['p50'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, "
            f"p99 {lat['p99'] * 1000:.0f} ms; {res['requests_per_forward']:.2f} requests per forward (max "
            f"{res['max_requests_per_forward']}); errors {len(res['errors'])}; healthy after: {res['healthy_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--body", default='{"prompt": "ROMEO.", "max_tokens": 32}', help="JSON request body (model filled in)")
    args = parser.parse_args()
    body = json.loads(args.body)
    body.setdefault("model", get_json(args.url, "/v1/models")["data"][0]["id"])
    print(summary(load_test(args.url, body, args.requests, args.clients)))


if __name__ == "__main__":
    main()
