"""Sampler speed vs quality, measured side by side in one run.

For each configuration: NFE, median wall seconds over repeats, generated tokens/s (prompt
excluded), generative perplexity under the AR model trained on the same data, mean unigram entropy
of the samples, and peak RSS. Then the ratios the sampler suite is judged by (all from this run):
cached vs plain ancestral at n = 4L, first-hitting vs ancestral at n = 4L, float32 vs float64,
and the best MDM configuration vs AR with KV cache. Writes a Pareto plot (gen-PPL vs tokens/s).

Reproduce (checkpoints made with the repository's own commands):

    unmask train --run-dir runs/bench/mdm-small --preset small --objective mdm --steps 2000
    unmask train --run-dir runs/bench/ar-small  --preset small --objective ar  --steps 2000
    python benchmarks/sampling.py --mdm runs/bench/mdm-small --ar runs/bench/ar-small
    python benchmarks/sampling.py --mdm runs/demo/mdm --ar runs/demo/ar --quick     # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from unmask.checkpoint import load_model
from unmask.evaluation.genppl import judge_nll, unigram_entropy
from unmask.sampling import ARConfig, ar_sample
from unmask.sampling.generate import SamplerSpec


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", default="runs/bench/mdm-small")
    parser.add_argument("--ar", default="runs/bench/ar-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=0, help="generated tokens (default: the context length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and 1 repeat")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    mdm, mdm_cfg = load_model(args.mdm)
    ar, ar_cfg = load_model(args.ar)
    length = args.length or mdm_cfg.model.context_len
    repeats = 1 if args.quick else args.repeats
    eos = 0
    n = 4 * length
    configs: list[tuple[str, SamplerSpec | None]] = [
        ("ar+kv-cache", None),
        (f"ancestral n={n}", SamplerSpec("ancestral", steps=n)),
        (f"cached n={n}", SamplerSpec("cached", steps=n)),
        (f"ancestral n={n} float32", SamplerSpec("ancestral", steps=n, precision="float32")),
        ("first-hitting", SamplerSpec("first-hitting")),
        (f"ancestral n={length}", SamplerSpec("ancestral", steps=length)),
        (f"cached n={length}", SamplerSpec("cached", steps=length)),
        ("first-hitting k=2", SamplerSpec("first-hitting", k=2)),
        (f"confidence n={length // 2} T=0", SamplerSpec("confidence", steps=length // 2, temperature=0.0)),
        ("threshold tau=0.9 block=32", SamplerSpec("threshold", tau=0.9, block_len=min(32, length))),
        (f"confidence n={length // 4} T=1", SamplerSpec("confidence", steps=length // 4)),
    ]
    if args.quick:
        configs = configs[:7]
    rows = []
    for name, spec in configs:
        times, result = [], None
        for r in range(repeats):
            gen = torch.Generator().manual_seed(r)
            start = time.perf_counter()
            if spec is None:
                out = ar_sample(ar, torch.full((args.batch, 1), eos), gen, ARConfig(max_new_tokens=length))
                tokens = out.tokens[:, 1:]
            else:
                x = torch.full((args.batch, length), mdm_cfg.model.mask_id)
                out = spec.run(mdm, x, gen)
                tokens = out.tokens
            times.append(time.perf_counter() - start)
            result = (out, tokens)
        out, tokens = result
        nfe = out.nfe if out.row_nfe is None else out.row_nfe.double().mean().item()
        wall = statistics.median(times)
        nll = judge_nll(ar, tokens, eos)
        rows.append({
            "config": name, "nfe": nfe, "wall_s": wall, "tokens_per_s": args.batch * length / wall, "gen_ppl": float(torch.tensor(nll).exp()),
            "entropy": unigram_entropy(tokens.tolist()), "peak_rss_mib": peak_rss_mib(),
        })
        r = rows[-1]
        print(f"{name:32} NFE {r['nfe']:8.1f}  {r['wall_s']:8.2f} s  {r['tokens_per_s']:9.1f} tok/s  gen-PPL {r['gen_ppl']:8.1f}  entropy {r['entropy']:.3f}  RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    by = {r["config"]: r for r in rows}
    print(f"\nbatch={args.batch} length={length} repeats={repeats} mdm={args.mdm} ar={args.ar}")
    print("| sampler | NFE | wall s (median) | tokens/s | gen-PPL | entropy | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['nfe']:.1f} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | {r['peak_rss_mib']:.0f} |")
    anc, cac = by[f"ancestral n={n}"], by[f"cached n={n}"]
    nfe_ratio, speed = anc["nfe"] / cac["nfe"], anc["wall_s"] / cac["wall_s"]
    print(f"\ncached vs ancestral at n=4L: NFE ratio {nfe_ratio:.2f} (per row), wall-clock speedup {speed:.2f} = {speed / nfe_ratio:.2f} x the NFE ratio (goal >= 0.9)")
    fh = by["first-hitting"]
    print(f"first-hitting vs ancestral at n=4L: speedup {anc['wall_s'] / fh['wall_s']:.2f}x (goal >= 5x)")
    f32 = by[f"ancestral n={n} float32"]
    print(f"float32 vs float64 (ancestral n=4L): entropy {f32['entropy']:.3f} vs {anc['entropy']:.3f}, gen-PPL {f32['gen_ppl']:.1f} vs {anc['gen_ppl']:.1f}")
    ar_row = by["ar+kv-cache"]
    ok = [r for r in rows if r["config"] != "ar+kv-cache" and r["gen_ppl"] <= ar_row["gen_ppl"] and r["entropy"] >= ar_row["entropy"]]
    if ok:
        best = max(ok, key=lambda r: r["tokens_per_s"])
        print(f"best MDM at AR's gen-PPL and entropy or better: {best['config']}, {best['tokens_per_s'] / ar_row['tokens_per_s']:.2f}x AR tokens/s (goal >= 1.5x)")
    else:
        best = min((r for r in rows if r["config"] != "ar+kv-cache"), key=lambda r: r["gen_ppl"])
        print(f"no MDM configuration reaches AR's gen-PPL {ar_row['gen_ppl']:.1f} with its entropy; best gen-PPL: {best['config']} {best['gen_ppl']:.1f}"
              f" at {best['tokens_per_s'] / ar_row['tokens_per_s']:.2f}x AR tokens/s")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampling.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5))
        for r in rows:
            ax.scatter(r["tokens_per_s"], r["gen_ppl"], color="tab:red" if r["config"].startswith("ar") else "tab:blue")
            ax.annotate(f"{r['config']} (H={r['entropy']:.2f})", (r["tokens_per_s"], r["gen_ppl"]), fontsize=7)
        ax.set(xscale="log", xlabel="generated tokens/s", ylabel="gen-PPL (AR judge)", title="sampler speed vs quality (entropy in brackets)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "sampling_pareto.png", dpi=110)
        print(f"wrote {out_dir / 'sampling.json'} and {out_dir / 'sampling_pareto.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
