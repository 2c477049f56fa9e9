"""Block diffusion (BD3-LM) on the embedded corpus: validation bound vs block size, and decoding
quality vs speed next to the AR model with its KV cache and the MDM.

Every model has the same preset, data order, recipe and training tokens (steps x batch x
context; the block model's forward runs over 2L positions, so it spends about twice the FLOPs
per token of the others: "equal training compute" here is equal tokens, as 6ND counts them):

* AR (exact NLL), block models L' in --block-sizes (by default 1, 4, 16 and L; bound by t-DCE and
  by k-DCE per block, and the exact block chain rule for L' <= 16), the MDM (bounds). All scored on the same validation windows, spread evenly
  over the held-out works, the bounds with the same seed and draws (t over the full range).
* Decoding: --samples x --length tokens after the EOS separator at temperature 1. AR with its
  exact KV cache; each block model with first-hitting (exact inside a block), confidence (2 tokens
  per call) and threshold (tau 0.9) inside the blocks, with the exact block cache and without it;
  the MDM with the fast-decoding benchmark's best configuration (confidence, 2 tokens per call,
  semi-AR blocks of 32 or the largest divisor of the length below) and exact first-hitting. Generated tokens/s (median of --repeats), NFE,
  gen-PPL under the AR model as judge and unigram entropy of the samples.

Writes block_diffusion.json, .md and .png to --out (training runs in --runs; finished runs are reused).

    nice -n 10 python benchmarks/block_diffusion.py --out benchmarks/results --context 64 --steps 250 --length 56 --draws 16
        # the README's figures: about 30 min on a 2-core CPU shared with other work
    OUT=runs/gpu-bd3 bash benchmarks/gpu_block_diffusion.sh                               # the same on one CUDA GPU
    python benchmarks/block_diffusion.py --out /tmp/bd3-quick --runs /tmp/bd3-quick/runs --quick   # smoke test, ~4 min
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from unmask.block_diffusion import block_chain_rule_nll, block_elbo
from unmask.checkpoint import load_model
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset, default_dataset
from unmask.evaluation.genppl import judge_nll, quality_report
from unmask.evaluation.infill import spread_windows
from unmask.likelihood import ar_nll, mc_elbo
from unmask.sampling import ARConfig, SamplerSpec, ar_sample, make_canvas
from unmask.schedule import Schedule
from unmask.train import train


def train_run(out: Path, name: str, objective: str, block: int, args) -> Path:
    run_dir = Path(args.runs) / name
    if (run_dir / "checkpoints").exists():
        return run_dir
    vocab = TokenDataset(default_dataset(), "train").tokenizer.vocab_size
    model = ModelConfig.from_name(args.preset, vocab_size=vocab, causal=objective == "ar", block_causal=block, context_len=args.context)
    cfg = TrainConfig(objective=objective, block_size=block, flex_attention=args.flex_attention and objective == "bd3", steps=args.steps, batch_size=args.batch, seed=args.seed,
                      eval_every=args.steps, eval_windows=4, eval_draws=2, checkpoint_every=args.steps, keep_checkpoints=1, log_every=10)
    start = time.perf_counter()
    train(run_dir, model, cfg, default_dataset(), device=args.device, progress=False)
    (run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def median_time(fn, repeats: int):
    times, result = [], None
    for r in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(r)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/bench-bd3", help="folder of the training runs (reused when finished)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-sizes", default="1,4,16,0", help="comma-separated L'; 0 = the context length")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (training, scoring and decoding)")
    parser.add_argument("--flex-attention", action="store_true", help="train the block models through FlexAttention (CUDA)")
    parser.add_argument("--quick", action="store_true", help="40 steps, 16 windows, 4 draws, 1 repeat: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.windows, args.draws, args.repeats = 40, 16, 4, 1
    out = Path(args.out)
    sizes = [int(s) or args.context for s in args.block_sizes.split(",")]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    windows, prev = spread_windows(default_dataset(), "val", args.context, args.windows)

    rows = []
    runs = {"ar": train_run(out, "ar", "ar", 0, args), "mdm": train_run(out, "mdm", "mdm", 0, args)}
    for size in sizes:
        runs[f"bd3 L'={size}"] = train_run(out, f"bd3-{size}", "bd3", size, args)
    models = {}
    for name, run_dir in runs.items():
        model, cfg = load_model(run_dir, device)
        models[name] = model
        row = {"model": name, "train_seconds": float((run_dir / "train_seconds.txt").read_text())}
        if name == "ar":
            res = ar_nll(model, windows, prev)
            row |= {"bound": res.nats_per_token, "stderr": 0.0, "bound_k": res.nats_per_token, "stderr_k": 0.0, "exact": res.nats_per_token}
        elif name == "mdm":
            res = mc_elbo(model, windows, draws=args.draws, estimator="t-dce", schedule=Schedule(), seed=1)
            k_res = mc_elbo(model, windows, draws=args.draws, estimator="k-dce", seed=1)
            row |= {"bound": res.nats_per_token, "stderr": res.stderr, "bound_k": k_res.nats_per_token, "stderr_k": k_res.stderr, "exact": None}
        else:
            size = cfg.model.block_causal
            res = block_elbo(model, windows, size, draws=args.draws, seed=1)
            k_res = block_elbo(model, windows, size, draws=args.draws, seed=1, estimator="k-dce")
            exact = block_chain_rule_nll(model, windows, size).nats_per_token if size <= 16 else None
            row |= {"bound": res.nats_per_token, "stderr": res.stderr, "bound_k": k_res.nats_per_token, "stderr_k": k_res.stderr,
                    "exact": exact, "block_size": size}
        rows.append(row)
        print(json.dumps(row), flush=True)

    judge = models["ar"]
    eos, n, length = 0, args.samples, args.length
    decode_rows = []

    def record(label: str, fn) -> None:
        seconds, (tokens, nfe) = median_time(fn, args.repeats)
        row = {"configuration": label, "nfe": nfe, "tokens_per_s": n * length / seconds,
               **quality_report(tokens.tolist(), judge_nll(judge, tokens, eos))}
        decode_rows.append(row)
        print(json.dumps(row), flush=True)

    def ar_once(seed):
        out_ = ar_sample(judge, torch.full((n, 1), eos, device=device), torch.Generator(device=device).manual_seed(seed), ARConfig(max_new_tokens=length))
        return out_.tokens[:, 1:], out_.nfe

    record("ar kv-cache", ar_once)
    policies = {"first-hitting": {}, "confidence": {"steps": length // 2}, "threshold": {"tau": 0.9, "temperature": 1.0}}
    for name, model in models.items():
        x, cond, width = make_canvas([[]] * n, length, model.config.mask_id, 0, separator=eos)
        x, cond = x.to(device), cond.to(device)
        if name == "mdm":
            block = max(d for d in range(1, 33) if length % d == 0)  # semi-AR blocks of 32, or the largest divisor below
            specs = [(f"mdm confidence k=2 block {block}", SamplerSpec.from_options("confidence", block_len=block, steps=length // 2)),
                     (f"mdm first-hitting block {block}", SamplerSpec.from_options("first-hitting", block_len=block))]
        elif name.startswith("bd3") and model.config.block_causal > 1 and model.config.block_causal < args.context:
            specs = [(f"{name} {policy} {cache}", SamplerSpec.from_options(policy, cache=cache, **opts))
                     for policy, opts in policies.items() for cache in ("block", "none")]
        elif name.startswith("bd3") and model.config.block_causal == 1:
            specs = [(f"{name} first-hitting block", SamplerSpec.from_options("first-hitting", cache="block"))]
        else:
            continue
        for label, spec in specs:
            def once(seed, spec=spec, model=model, x=x, cond=cond, width=width):
                gen = torch.Generator(device=device).manual_seed(seed)
                out_ = spec.run(model, x, gen, cond, start=width)  # a block model on its own grid, with its cache or none
                return out_.tokens[:, width:], out_.nfe

            record(label, once)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    machine = {"cpu": name, "threads": torch.get_num_threads(), "torch": torch.__version__}
    settings = {k: v for k, v in vars(args).items()}
    (out / "block_diffusion.json").write_text(json.dumps({"machine": machine, "settings": settings, "likelihood": rows, "decoding": decode_rows}, indent=2) + "\n")
    md = report(rows, decode_rows, machine, args)
    (out / "block_diffusion.md").write_text(md)
    print(md)
    plot(rows, decode_rows, out / "block_diffusion.png")


def report(rows, decode_rows, machine, args) -> str:
    lines = [f"Block diffusion, {args.preset} preset, context {args.context}, {args.steps} steps x {args.batch} sequences each "
             f"({machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}); {args.windows} validation windows, {args.draws} draws.", "",
             "| model | val bound t-DCE nats/token | +- SE | val bound k-DCE | +- SE | exact (chain rule) | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = "" if r["exact"] is None else f"{r['exact']:.4f}"
        lines.append(f"| {r['model']} | {r['bound']:.4f} | {r['stderr']:.4f} | {r['bound_k']:.4f} | {r['stderr_k']:.4f} | {exact} | {r['train_seconds']:.0f} |")
    lines += ["", f"Decoding {args.samples} x {args.length} tokens at temperature 1 (AR judge):", "",
              "| configuration | NFE | tokens/s | gen-PPL | entropy |", "|---|---|---|---|---|"]
    for r in decode_rows:
        lines.append(f"| {r['configuration']} | {r['nfe']} | {r['tokens_per_s']:.1f} | {r['gen_ppl']:.1f} | {r['unigram_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows, decode_rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    blocks = [r for r in rows if "block_size" in r]
    a.errorbar([r["block_size"] for r in blocks], [r["bound_k"] for r in blocks], yerr=[2 * r["stderr_k"] for r in blocks], marker="o",
               label="block model bound (k-DCE, +- 2 SE)")
    exact = [r for r in blocks if r["exact"] is not None]
    a.plot([r["block_size"] for r in exact], [r["exact"] for r in exact], "s--", label="block model exact (chain rule)")
    for r in rows:
        if r["model"] in ("ar", "mdm"):
            a.axhline(r["bound_k"], linestyle=":", color="gray" if r["model"] == "ar" else "red", label=f"{r['model']} ({'exact' if r['model'] == 'ar' else 'bound'})")
    a.set_xscale("log", base=2)
    a.set_xlabel("block size L'")
    a.set_ylabel("validation nats/token")
    a.legend()
    for r in decode_rows:
        b.scatter(r["tokens_per_s"], r["gen_ppl"], s=20 + 30 * max(r["unigram_entropy"] - 2, 0))
        b.annotate(r["configuration"], (r["tokens_per_s"], r["gen_ppl"]), fontsize=6)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("generated tokens/s")
    b.set_ylabel("gen-PPL (AR judge); marker size ~ entropy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
