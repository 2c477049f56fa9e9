"""Serving figures: a bounded load test of `unmask serve` (requests from concurrent clients decoded
together) against the same load decoded one request at a time, and a screenshot of the page.

    nice -n 10 .venv/bin/python benchmarks/serve.py --checkpoint runs/demo/mdm

Writes benchmarks/results/serve_load.{json,md,png} and docs/serve.png (with --screenshot).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from unmask.serve.app import create_app
from unmask.serve.engine import Engine, Limits
from unmask.serve.load import load_test, summary
from unmask.serve.run import serve_in_background

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO.", "JULIET. O Romeo, Romeo!", "KING RICHARD. A horse!", "HAMLET. To be, or not to be", "Enter a Messenger."]


def screenshot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page(viewport={"width": 1000, "height": 480})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('context')")
        page.fill("#prompt", "KING RICHARD. A horse! a horse!")
        page.select_option("#sampler", "ancestral")
        for name, value in {"max_tokens": 64, "steps": 32, "block_length": 0, "temperature": 1.0, "seed": 4}.items():
            page.fill(f"#{name}", str(value))
        page.click("#generate")
        page.wait_for_function("window.unmaskFrames.length >= 20", timeout=120000)  # mid-way: blanks and coloured tokens
        page.screenshot(path=str(out))
        page.wait_for_selector("#status[data-state=done]", timeout=120000)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/mdm")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (auto: the best available)")
    parser.add_argument("--screenshot", action="store_true", help="also save docs/serve.png (needs /usr/bin/chromium and playwright)")
    parser.add_argument("--screenshot-only", action="store_true", help="only save docs/serve.png")
    args = parser.parse_args()
    if args.screenshot_only:
        engine = Engine(args.checkpoint, args.device)
        with serve_in_background(create_app(engine)) as url:
            screenshot(url, ROOT / "docs" / "serve.png")
        return
    body = {"max_tokens": args.max_tokens, "temperature": 1.0}
    runs = {}
    for label, active in (("batched", args.clients), ("one at a time", 1)):
        engine = Engine(args.checkpoint, args.device, Limits(max_active=active, max_queue=args.requests))
        body["model"] = engine.name
        with serve_in_background(create_app(engine)) as url:
            res = load_test(url, body, args.requests, args.clients, vary=[{"prompt": p} for p in PROMPTS])
            print(f"{label}: {summary(res)}")
            runs[label] = res
            if args.screenshot and label == "batched":
                screenshot(url, ROOT / "docs" / "serve.png")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": args.checkpoint, "device": args.device, "body": body, "prompts": PROMPTS, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    (out / "serve_load.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    lines = ["# Serving load test", "", f"{args.requests} completions ({args.max_tokens} tokens, default ancestral sampler with "
             f"{args.max_tokens} steps, 5 prompts, seeds 0..{args.requests - 1}) from {args.clients} concurrent clients, "
             f"`{args.checkpoint}` on {args.device} ({meta['torch_threads']} CPU threads).", "",
             "| decoding | answered | errors | requests/s | p50 latency | p95 latency | requests per forward |", "|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        lat = r["latency_s"]
        lines.append(f"| {label} | {r['answered']}/{r['requests']} | {len(r['errors'])} | {r['requests_per_s']:.2f} | "
                     f"{lat['p50'] * 1000:.0f} ms | {lat['p95'] * 1000:.0f} ms | {r['requests_per_forward']:.2f} |")
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, r in runs.items():
        xs = sorted(r["latencies"])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{label} ({r['requests_per_s']:.1f} req/s)")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{args.requests} requests from {args.clients} clients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve_load.png", dpi=100)


if __name__ == "__main__":
    main()
