"""Decoding and training speed on one GPU against the card's own floors, every figure in one run.

The floors are measured in the same run: the memory bandwidth by a large device-to-device copy
(read + write bytes over the best time; the table of known cards is printed next to it), the
compute peak by the best of repeated square bf16 matmuls (``train_scale.peak_matmul``). Then:

* weight-read floor of a forward = its weight bytes (every parameter but the input embedding, a
  lookup, in the decoding dtype) / bandwidth; compute floor = 2 (N + V d) B L + 4 n_layer L^2 d B
  FLOPs / peak (the matmuls of N non-embedding weights and the V x d head, and the attention
  scores and values over all L keys);
* AR decoding with its KV cache at batch 1 (``decoding_for`` + ``Decoding.run``): ms per
  generated token and tokens/s, vs the weight-read floor of one token;
* one MDM network call at batch 1 and at batch 64 (CUDA events around ``model(x)``), vs both floors;
* the confidence sampler (semi-AR blocks) without a cache and with the prefix and dual caches at
  batch 16 on a canvas of 1024: tokens/s and the caches' speed-ups;
* the sampler's overhead, the share of wall time spent outside the network's forward
  (``sampling.measure``), at batch 1 and 8, without a cache and with the dual cache;
* static vs dynamic shapes (``unmask.sampling.shapes``) on the same decodes, which give the same
  tokens: the confidence sampler without a cache and with the dual cache, and AR decoding, at the
  overhead rows' batches: tokens/s of each layout and its host reads per network call;
* with ``--compiled-decode``: the same decodes eager and compiled (``unmask.compiled``: torch.compile
  at bucketed shapes, CUDA graphs without a cache), the confidence sampler at each batch of the
  overhead rows and AR decoding at the same batches: tokens/s of each and the compiled/eager ratio, after
  one untimed decode that compiles every shape;
* training tokens/s and MFU of the MDM and the AR model, compiled, at the 85m and 350m presets,
  through the loop's own ``Trainer.step`` (``train_step_profile.build_trainer``), MFU with the
  attention FLOPs as made: full for the MDM, causal (half) for the AR model (``train_scale.flops_per_token``).

The networks are randomly initialised (speed only), in bf16 for decoding; training uses the loop's
precision (bf16 autocast on a GPU). ``--smoke`` runs every part on the CPU at tiny shapes (under a
minute), to check the script before a GPU is lent. Goals: docs/benchmarks.md, 'GPU speed'.

    OUT=runs/gpu-speed bash benchmarks/gpu_speed.sh          # one GPU; sized for under 8 minutes on an H100
    python benchmarks/gpu_speed.py --smoke --out /tmp/speed   # CPU, tiny shapes
    python benchmarks/gpu_speed.py --device cpu --cpu-shapes --out benchmarks/results/gpu_speed_cpu   # the GPU batches, tiny preset
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sampling import measure, random_network
from train_scale import cpu_isa, flops_per_token, peak_matmul
from train_step_profile import PhaseClock, build_trainer, timed_steps

from unmask.compiled import CompiledModel
from unmask.host_reads import HostReads
from unmask.sampling import decoding_for, make_canvas
from unmask.sampling.shapes import decode_shapes

# memory bandwidth of known cards, bytes/s (vendors' data sheets)
KNOWN_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12), ("GH200", 4.0e12),
                   ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12))


@dataclass(frozen=True)
class Shapes:
    """What each part measures (GPU defaults; :meth:`smoke` for the CPU check)."""

    preset: str = "85m"  # the decoding networks
    ar_tokens: int = 256
    call_canvas: int = 256
    call_batches: tuple[int, ...] = (1, 64)
    cache_batch: int = 16
    cache_canvas: int = 1024
    block: int = 32
    overhead_batches: tuple[int, ...] = (1, 8)
    overhead_length: int = 256
    train_presets: tuple[str, ...] = ("85m", "350m")
    train_batches: tuple[int, ...] = (64, 32)
    train_context: int | None = None
    train_warmup: int = 10  # compilation, and the slow steps after it (the earlier 20-step table's MDM sped up after step 15)
    train_steps: int = 10
    phase_steps: int = 3
    compile: bool = True
    repeats: int = 3
    call_reps: int = 20
    copy_mib: int = 2048
    matmul_size: int = 8192

    @classmethod
    def cpu(cls) -> "Shapes":
        """The GPU run's batches on the tiny preset (context 128, so the caches' canvas is 128, not 1024)."""
        return cls(preset="tiny", ar_tokens=64, call_canvas=128, cache_canvas=128, overhead_length=64, train_presets=("tiny",),
                   train_batches=(16,), train_warmup=2, train_steps=6, compile=False, call_reps=5, copy_mib=256, matmul_size=1024)

    @classmethod
    def smoke(cls) -> "Shapes":
        return cls(preset="tiny", ar_tokens=8, call_canvas=32, call_batches=(1, 4), cache_batch=2, cache_canvas=64, block=16,
                   overhead_batches=(1, 2), overhead_length=16, train_presets=("tiny",), train_batches=(2,), train_context=32,
                   train_warmup=1, train_steps=2, phase_steps=1, compile=False, repeats=1, call_reps=2, copy_mib=16, matmul_size=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_info(device: torch.device) -> dict:
    """The card (torch's name and nvidia-smi's line) and the software."""
    info = {"device": device.type, "torch": torch.__version__, "name": f"{cpu_isa()['model']} (1 thread)"}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
    return info


def copy_bandwidth(device: torch.device, mib: int, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy of ``mib`` MiB (read + write counted), best of ``reps``."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * mib * 2**20 / best


def table_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in KNOWN_BANDWIDTH if key.lower() in name.lower()), None)


def weight_bytes(model) -> int:
    """Bytes a forward reads of the weights: every parameter but the input embedding (a lookup of a few rows)."""
    skip = model.embed.weight.numel() if model.head is not None else 0  # tied: the embedding is the head, read whole
    return sum(p.numel() * p.element_size() for p in model.parameters()) - skip * model.embed.weight.element_size()


def forward_flops(config, batch: int, length: int) -> float:
    """2 (N + V d) B L + 4 n_layer L^2 d B: the matmul FLOPs of one bidirectional forward of B x L tokens."""
    linear = 2 * (config.non_embedding_params() + config.vocab_size * config.n_embd) * batch * length
    return linear + 4 * config.n_layer * length**2 * config.n_embd * batch


def timed(run, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``run()`` over ``repeats`` calls after one untimed call."""
    run()
    walls = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def ar_decode(ar, shapes: Shapes, device: torch.device, bandwidth: float) -> dict:
    """AR decoding with its exact KV cache at batch 1 (the public decoding path), vs one token's weight-read floor."""
    decoding = decoding_for(ar.config, shapes.ar_tokens, {})
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)  # EOS (id 0) starts unconditional text
    made = []

    def run() -> None:
        out = decoding.run(ar, prompt, torch.Generator(device=device).manual_seed(0))
        made.append(out.tokens.shape[1] - prompt.shape[1])

    wall = timed(run, device, shapes.repeats)
    ms = 1e3 * wall / made[-1]
    floor = 1e3 * weight_bytes(ar) / bandwidth
    return {"preset": shapes.preset, "batch": 1, "tokens": made[-1], "ms_per_token": ms, "tokens_per_s": made[-1] / wall,
            "weight_read_floor_ms": floor, "ratio_to_weight_read_floor": ms / floor}


def mdm_calls(mdm, shapes: Shapes, device: torch.device, bandwidth: float, peak: float) -> list[dict]:
    """One network call of the MDM on a half-masked canvas at each batch size, vs its weight-read and compute floors."""
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in shapes.call_batches:
        x = torch.randint(0, mdm.config.vocab_size, (batch, shapes.call_canvas), device=device, generator=generator)
        x[:, shapes.call_canvas // 2:] = mdm.config.mask_id
        ms = 1e3 * timed(lambda: mdm(x), device, shapes.call_reps)
        weight, compute = 1e3 * weight_bytes(mdm) / bandwidth, 1e3 * forward_flops(mdm.config, batch, shapes.call_canvas) / peak
        rows.append({"preset": shapes.preset, "batch": batch, "canvas": shapes.call_canvas, "ms": ms, "weight_read_floor_ms": weight,
                     "compute_floor_ms": compute, "ratio_to_weight_read_floor": ms / weight, "ratio_to_compute_floor": ms / compute,
                     "ratio_to_roofline": ms / max(weight, compute)})
    return rows


def sampler_rows(mdm, device: torch.device, batch: int, length: int, block: int, caches: tuple[str, ...], repeats: int,
                 separator: int | None) -> list[dict]:
    """The confidence sampler (length / 4 steps, blocks of ``block``) on an unconditional canvas, once per cache:
    tokens/s and the share of wall time outside the network (``sampling.measure``)."""
    x, cond, start = make_canvas([[]] * batch, length, mdm.config.mask_id, 0, separator=separator, device=device)
    rows = []
    for cache in caches:
        decoding = decoding_for(mdm.config, length, {"sampler": "confidence", "steps": length // 4, "block_len": block, "cache": cache})

        def once(seed: int, decoding=decoding):
            out = decoding.run(mdm, x, torch.Generator(device=device).manual_seed(seed), cond, start=start)
            return out.tokens[:, start:], out.nfe

        row = measure(f"confidence {cache}", once, mdm, None, 0, batch, length, repeats, device)
        rows.append({key: row[key] for key in ("config", "batch", "length", "nfe", "wall_s", "tokens_per_s", "overhead")}
                    | {"cache": cache, "canvas": x.shape[1]})
    return rows


def caches(mdm, shapes: Shapes, device: torch.device) -> dict:
    """Prefix and dual caches vs no cache at batch ``cache_batch`` on a canvas of ``cache_canvas`` (no prompt)."""
    rows = sampler_rows(mdm, device, shapes.cache_batch, shapes.cache_canvas, shapes.block, ("none", "prefix", "dual"), shapes.repeats, None)
    base = rows[0]["tokens_per_s"]
    return {"rows": rows, "speedup": {r["cache"]: r["tokens_per_s"] / base for r in rows[1:]}}


def overhead(mdm, shapes: Shapes, device: torch.device) -> list[dict]:
    """The sampler's share of wall time outside the network at each batch of ``overhead_batches``."""
    rows = []
    for batch in shapes.overhead_batches:
        rows += sampler_rows(mdm, device, batch, shapes.overhead_length, shapes.block, ("none", "dual"), shapes.repeats, 0)
    return rows


def decodes(mdm, ar, shapes: Shapes, device: torch.device, caches: tuple[str, ...]) -> list[tuple]:
    """The decodes the layout and compiled rows time, at each batch of ``overhead_batches``: the confidence sampler
    (length / 4 steps, blocks of ``block``) once per cache of ``caches``, then AR decoding with its KV cache:
    (name, network, decoding, canvas, conditioning, start, generated tokens)."""
    length, cases = shapes.overhead_length, []
    for cache in caches:
        for batch in shapes.overhead_batches:
            x, cond, start = make_canvas([[]] * batch, length, mdm.config.mask_id, 0, separator=0, device=device)
            decoding = decoding_for(mdm.config, length, {"sampler": "confidence", "steps": length // 4, "block_len": shapes.block,
                                                         "cache": cache})
            cases.append((f"confidence {cache}", mdm, decoding, x, cond, start, batch * length))
    for batch in shapes.overhead_batches:
        prompt = torch.zeros((batch, 1), dtype=torch.long, device=device)
        cases.append(("ar kv-cache", ar, decoding_for(ar.config, shapes.ar_tokens, {}), prompt, None, 0, batch * shapes.ar_tokens))
    return cases


def layouts(mdm, ar, shapes: Shapes, device: torch.device) -> list[dict]:
    """Static vs dynamic shapes (:mod:`unmask.sampling.shapes`; static is a GPU's default) on the same decodes, which
    give the same tokens: :func:`decodes` without a cache and with the dual cache; median tokens/s of each layout and
    its host reads per network call (:class:`unmask.host_reads.HostReads`, in one more, untimed decode)."""
    rows = []
    for name, model, decoding, x, cond, start, tokens in decodes(mdm, ar, shapes, device, ("none", "dual")):
        def run(model=model, decoding=decoding, x=x, cond=cond, start=start):
            return decoding.run(model, x, torch.Generator(device=device).manual_seed(0), cond, start=start)

        row = {"decode": name, "batch": x.shape[0]}
        for layout in ("static", "dynamic"):
            with decode_shapes(layout):
                row[f"{layout}_tokens_per_s"] = tokens / timed(run, device, shapes.repeats)
                with HostReads() as reads:
                    calls = run().nfe
            row[f"{layout}_reads_per_call"] = reads.count / max(calls, 1)
        rows.append(row | {"ratio": row["static_tokens_per_s"] / row["dynamic_tokens_per_s"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compiled_decode(mdm, ar, shapes: Shapes, device: torch.device) -> list[dict]:
    """Eager vs compiled decoding (:mod:`unmask.compiled`): :func:`decodes` without a cache; median tokens/s over
    ``repeats`` decodes (one seed, so every decode meets the same shapes) after one untimed decode, which
    compiles them; the compiled wrapper's counts of this case's compiled and eager calls and of the shapes it added."""
    rows, wrappers = [], {id(mdm): CompiledModel(mdm), id(ar): CompiledModel(ar)}  # one per network: its graphs are kept
    for name, model, decoding, x, cond, start, tokens in decodes(mdm, ar, shapes, device, ("none",)):
        row = {"decode": name, "batch": x.shape[0], "canvas": x.shape[1] + (tokens // x.shape[0] if start == 0 else 0), "tokens": tokens}
        compiled = wrappers[id(model)]
        before = dict(compiled.stats)
        for path, network in (("eager", model), ("compiled", compiled)):
            wall = timed(lambda: decoding.run(network, x, torch.Generator(device=device).manual_seed(0), cond, start=start), device,
                         shapes.repeats)
            row[f"{path}_tokens_per_s"] = tokens / wall
        calls = {key: compiled.stats[key] - before[key] for key in before}  # this case's calls; shapes: the new ones it met
        rows.append(row | {"ratio": row["compiled_tokens_per_s"] / row["eager_tokens_per_s"], "calls": calls})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def train_row(objective: str, preset: str, batch: int, shapes: Shapes, device: torch.device, peak: float) -> dict:
    """Tokens/s (median step) and MFU of ``objective`` (mdm, ar, or mdm-host-noise: the MDM with its masks drawn on
    the host as before) on ``preset`` through the loop's Trainer.step; then the step's phases, each timed with
    the device synchronised around it (``train_step_profile.PhaseClock``)."""
    torch._dynamo.reset()  # each row compiles afresh, as its own process would: no shapes made dynamic by an earlier row
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(objective, preset, Path(tmp), batch_size=batch, precision="auto" if device.type == "cuda" else "fp32",
                                device=str(device), compile=shapes.compile, context=shapes.train_context)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(shapes.train_warmup):  # compilation, allocator
            trainer.step(step)
        warmup_s, times = time.perf_counter() - start, []
        for step in range(shapes.train_warmup, shapes.train_warmup + shapes.train_steps):
            sync(device)
            start = time.perf_counter()
            trainer.step(step)  # ends with the loss read back: the step is done
            times.append(time.perf_counter() - start)
        first = shapes.train_warmup + shapes.train_steps
        phases = timed_steps(trainer, PhaseClock(trainer, device), first, shapes.phase_steps)
        cfg, tokens = trainer.model.config, trainer.global_batch * trainer.data.length
        row = {"objective": objective, "preset": preset, "batch": batch, "context": cfg.context_len, "n_layer": cfg.n_layer,
               "n_embd": cfg.n_embd, "vocab": cfg.vocab_size, "non_embedding": cfg.non_embedding_params(), "compile": shapes.compile,
               "precision": str(trainer.amp or torch.float32).replace("torch.", ""), "warmup_s": warmup_s,
               "step_ms": 1e3 * statistics.median(times), "step_ms_each": [1e3 * t for t in times], "tokens_per_s": tokens / statistics.median(times),
               "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
               "phases_ms": {key: statistics.median(p[key] for p in phases) for key in phases[0]}}
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["flops_per_token"] = flops_per_token(row)
    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
    return row


def training(shapes: Shapes, device: torch.device, peak: float) -> list[dict]:
    """MDM and AR at every preset; at the first also the MDM with its noise drawn on the host, as the loop did before."""
    rows = []
    for i, (preset, batch) in enumerate(zip(shapes.train_presets, shapes.train_batches)):
        for objective in ("mdm", "ar") + (("mdm-host-noise",) if i == 0 else ()):
            rows.append(train_row(objective, preset, batch, shapes, device, peak))
            r = rows[-1]
            print(f"train {preset} {objective}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%", flush=True)
    return rows


def goals(res: dict) -> list[dict]:
    """The goals of docs/benchmarks.md, 'GPU speed', each with its measured value and whether it is met."""
    calls = {r["batch"]: r for r in res["mdm_calls"]}
    first, last = min(calls), max(calls)
    out = [
        {"goal": "AR decoding, batch 1 (KV cache)", "target": "<= 0.5 ms/token", "value": res["ar_decode"]["ms_per_token"], "unit": "ms/token",
         "met": res["ar_decode"]["ms_per_token"] <= 0.5},
        {"goal": f"MDM call, batch {first}", "target": "<= 3x the weight-read floor", "value": calls[first]["ratio_to_weight_read_floor"],
         "unit": "x floor", "met": calls[first]["ratio_to_weight_read_floor"] <= 3},
        {"goal": f"MDM call, batch {last}", "target": "<= 1.3x the compute floor", "value": calls[last]["ratio_to_compute_floor"],
         "unit": "x floor", "met": calls[last]["ratio_to_compute_floor"] <= 1.3},
    ]
    for cache, speedup in res["caches"]["speedup"].items():
        out.append({"goal": f"{cache} cache vs none, batch {res['shapes']['cache_batch']}, canvas {res['shapes']['cache_canvas']}",
                    "target": ">= 2x tokens/s", "value": speedup, "unit": "x", "met": speedup >= 2})
    for batch in res["shapes"]["overhead_batches"]:
        worst = max((r for r in res["sampler_overhead"] if r["batch"] == batch), key=lambda r: r["overhead"])
        out.append({"goal": f"sampler overhead, batch {batch} ({worst['config']}, the larger)", "target": "<= 10% of wall time",
                    "value": 100 * worst["overhead"], "unit": "%", "met": worst["overhead"] <= 0.10})
    train = {(r["preset"], r["objective"]): r for r in res["training"]}
    for preset in res["shapes"]["train_presets"]:
        ratio = train[preset, "mdm"]["tokens_per_s"] / train[preset, "ar"]["tokens_per_s"]
        out.append({"goal": f"MDM / AR training tokens/s, {preset}", "target": ">= 0.9", "value": ratio, "unit": "x", "met": ratio >= 0.9})
    big = res["shapes"]["train_presets"][-1]
    for objective in ("mdm", "ar"):
        mfu = 100 * train[big, objective]["mfu"]
        out.append({"goal": f"{objective.upper()} training MFU, {big}", "target": ">= 45%", "value": mfu, "unit": "%", "met": mfu >= 45})
    return out


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown(res: dict) -> str:
    m, f = res["machine"], res["floors"]
    table_bw = "unknown card" if f["table_bandwidth_gbs"] is None else f"{f['table_bandwidth_gbs']:,.0f} GB/s"
    title = "# GPU speed" + ("" if m["device"] == "cuda" else " (the benchmark run on a CPU)")
    lines = [title, "", f"Card: {m['name']}" + (f" (nvidia-smi: {m['nvidia_smi']})" if m.get("nvidia_smi") else "")
             + f"; torch {m['torch']}{'; SMOKE RUN (CPU, tiny shapes): not a GPU figure' if res['smoke'] else ''}.",
             f"Floors measured in this run: copy bandwidth {f['bandwidth_gbs']:,.0f} GB/s (data sheet: {table_bw}), "
             f"matmul peak {f['peak_tflops']:.3g} TFLOP/s ({f['dtype']}). Random networks ({res['shapes']['preset']}), "
             f"{f['dtype']} for decoding; weights read per forward {f['weight_mib']:,.0f} MiB.", "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['value']:.3g} {g['unit']} | {'yes' if g['met'] else 'no'} |" for g in res["goals"]]
    a = res["ar_decode"]
    lines += ["", f"AR with KV cache, batch 1: {a['ms_per_token']:.3f} ms/token, {a['tokens_per_s']:,.0f} tokens/s "
              f"(weight-read floor {a['weight_read_floor_ms']:.4f} ms/token: {a['ratio_to_weight_read_floor']:.1f}x).", "",
              "| MDM call | canvas | ms | weight-read floor ms | compute floor ms | x roofline |", "|---|---|---|---|---|---|"]
    lines += [f"| batch {r['batch']} | {r['canvas']} | {r['ms']:.3f} | {r['weight_read_floor_ms']:.4f} | {r['compute_floor_ms']:.4f} | "
              f"{r['ratio_to_roofline']:.1f} |" for r in res["mdm_calls"]]
    lines += ["", "| sampler (confidence, blocks) | batch | canvas | NFE | tokens/s | outside the network |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['canvas']} | {r['nfe']} | {r['tokens_per_s']:,.1f} | {100 * r['overhead']:.1f}% |"
              for r in res["caches"]["rows"] + res["sampler_overhead"]]
    lines += ["", "| decode, static vs dynamic shapes | batch | static tokens/s | dynamic tokens/s | ratio | host reads per call, static | "
              "dynamic |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['decode']} | {r['batch']} | {r['static_tokens_per_s']:,.1f} | {r['dynamic_tokens_per_s']:,.1f} | {r['ratio']:.2f} | "
              f"{r['static_reads_per_call']:.2f} | {r['dynamic_reads_per_call']:.2f} |" for r in res.get("layouts", [])]
    lines += ["", "| decode, eager vs compiled | batch | canvas | eager tokens/s | compiled tokens/s | ratio | new shapes |",
              "|---|---|---|---|---|---|---|"] if res.get("compiled_decode") else []
    lines += [f"| {r['decode']} | {r['batch']} | {r['canvas']} | {r['eager_tokens_per_s']:,.1f} | {r['compiled_tokens_per_s']:,.1f} | "
              f"{r['ratio']:.2f} | {r['calls']['shapes']} |" for r in res.get("compiled_decode", [])]
    lines += ["", "| training | batch x L | precision | compile | step ms | tokens/s | MFU | peak GPU MiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} {r['objective']} | {r['batch']} x {r['context']} | {r['precision']} | {r['compile']} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {mib(r['peak_gpu_mib'])} |"
              for r in res["training"]]
    phases = [k for k in res["training"][0]["phases_ms"]] if res["training"] else []
    lines += ["", "Phases of a training step, ms (each timed with the device synchronised around it):", "",
              "| training | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    lines += [f"| {r['preset']} {r['objective']} | " + " | ".join(f"{r['phases_ms'][k]:.2f}" for k in phases) + " |" for r in res["training"]]
    lines += ["", "MFU: FLOPs per token 6 (N + V d) + 12 n_layer L d for the MDM, + 6 n_layer L d for the AR model (causal attention "
              "makes half the score and value products) over the matmul peak above."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny shapes (checks the script; not a GPU figure)")
    parser.add_argument("--cpu-shapes", action="store_true", help="the GPU run's batches on the tiny preset (a CPU's figures)")
    parser.add_argument("--skip-training", action="store_true", help="decoding figures only")
    parser.add_argument("--compiled-decode", action="store_true", help="also the decodes compiled (torch.compile, CUDA graphs) beside eager")
    parser.add_argument("--out", default="benchmarks/results/gpu_speed")
    args = parser.parse_args()
    shapes = Shapes.smoke() if args.smoke else Shapes.cpu() if args.cpu_shapes else Shapes()
    device = torch.device("cpu" if args.smoke else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = {"smoke": args.smoke, "shapes": asdict(shapes), "machine": machine_info(device)}
    print(json.dumps(res["machine"]), flush=True)
    bandwidth = copy_bandwidth(device, shapes.copy_mib)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared CPU; the peak below is one thread's too
    peak = peak_matmul(device.type, str(dtype).replace("torch.", ""), size=shapes.matmul_size, reps=20 if device.type == "cuda" else 3,
                       threads=1)
    table = table_bandwidth(res["machine"]["name"]) if device.type == "cuda" else None
    with torch.no_grad():
        mdm, ar = (random_network(shapes.preset, causal, device).to(dtype) for causal in (False, True))
        res["floors"] = {"bandwidth_gbs": bandwidth / 1e9, "table_bandwidth_gbs": None if table is None else table / 1e9,
                         "peak_tflops": peak / 1e12, "dtype": str(dtype).replace("torch.", ""), "weight_mib": weight_bytes(mdm) / 2**20}
        print(json.dumps(res["floors"]), flush=True)
        res["ar_decode"] = ar_decode(ar, shapes, device, bandwidth)
        print(json.dumps(res["ar_decode"]), flush=True)
        res["mdm_calls"] = mdm_calls(mdm, shapes, device, bandwidth, peak)
        res["caches"] = caches(mdm, shapes, device)
        res["sampler_overhead"] = overhead(mdm, shapes, device)
        print(json.dumps({"caches": res["caches"]["speedup"], "overhead": [r["overhead"] for r in res["sampler_overhead"]]}), flush=True)
        res["layouts"] = layouts(mdm, ar, shapes, device)
        if args.compiled_decode:
            res["compiled_decode"] = compiled_decode(mdm, ar, shapes, device)
    del mdm, ar
    res["training"] = [] if args.skip_training else training(shapes, device, peak)
    res["goals"] = goals(res) if res["training"] else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
