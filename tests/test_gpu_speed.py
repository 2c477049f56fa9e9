"""benchmarks/gpu_speed.sh --smoke runs every part of the GPU speed benchmark on the CPU at tiny
shapes and writes every figure the GPU run reports, with its floors and MFU computed as documented
(docs/benchmarks.md, 'GPU speed'). Timing itself is not tested."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_smoke_run_writes_every_figure(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_speed.sh"), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# GPU speed")
    assert res["smoke"] and res["machine"]["device"] == "cpu"
    floors = res["floors"]
    assert all(floors[k] > 0 for k in ("bandwidth_gbs", "peak_tflops", "weight_mib"))
    ar = res["ar_decode"]
    assert ar["tokens"] == res["shapes"]["ar_tokens"] and ar["ms_per_token"] > 0 and ar["tokens_per_s"] > 0
    assert math.isclose(ar["ratio_to_weight_read_floor"], ar["ms_per_token"] / ar["weight_read_floor_ms"])
    calls = {r["batch"]: r for r in res["mdm_calls"]}
    assert sorted(calls) == sorted(res["shapes"]["call_batches"])
    small, large = (calls[b] for b in sorted(calls))
    assert small["weight_read_floor_ms"] == large["weight_read_floor_ms"]  # the weights are read once per call at any batch
    assert math.isclose(large["compute_floor_ms"] / small["compute_floor_ms"], max(calls) / min(calls))
    assert [r["cache"] for r in res["caches"]["rows"]] == ["none", "prefix", "dual"] and set(res["caches"]["speedup"]) == {"prefix", "dual"}
    assert all(r["canvas"] == res["shapes"]["cache_canvas"] and r["batch"] == res["shapes"]["cache_batch"] for r in res["caches"]["rows"])
    assert {r["batch"] for r in res["sampler_overhead"]} == set(res["shapes"]["overhead_batches"])
    assert all(0 <= r["overhead"] < 1 and r["nfe"] > 0 for r in res["caches"]["rows"] + res["sampler_overhead"])
    layouts = {(r["decode"], r["batch"]): r for r in res["layouts"]}
    assert set(layouts) == {(d, b) for d in ("confidence none", "confidence dual", "ar kv-cache") for b in res["shapes"]["overhead_batches"]}
    for r in layouts.values():  # no step reads the device with static shapes; only a block's start does
        assert r["static_reads_per_call"] < 1 <= r["dynamic_reads_per_call"], r
        assert math.isclose(r["ratio"], r["static_tokens_per_s"] / r["dynamic_tokens_per_s"])
    train = {(r["preset"], r["objective"]): r for r in res["training"]}
    presets = res["shapes"]["train_presets"]
    assert set(train) == {(p, o) for p in presets for o in ("mdm", "ar")} | {(presets[0], "mdm-host-noise")}
    assert all(r["phases_ms"]["step_ms"] > 0 for r in train.values())
    for (preset, objective), r in train.items():
        assert r["tokens_per_s"] > 0 and math.isclose(r["mfu"], r["tokens_per_s"] * r["flops_per_token"] / (1e12 * floors["peak_tflops"]))
        # 6 (N + V d) + 12 n_layer L d (bidirectional) or 6 n_layer L d (causal)
        attention = (6 if objective == "ar" else 12) * r["n_layer"] * r["context"] * r["n_embd"]
        assert r["flops_per_token"] == 6 * (r["non_embedding"] + r["vocab"] * r["n_embd"]) + attention
    assert len(res["goals"]) == 3 + 2 + len(res["shapes"]["overhead_batches"]) + len(res["shapes"]["train_presets"]) + 2
