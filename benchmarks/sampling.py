"""MDM vs AR decoding at matched quality, measured side by side in one run.

For the AR model with its exact KV cache and for every MDM configuration (no cache / prefix / dual /
delayed x confidence / threshold / first-hitting, semi-autoregressive blocks), at each batch size:
generated tokens/s (prompt excluded; median over repeats), NFE (network calls over the batch), the
share of wall time spent outside the network call (sampler overhead), gen-PPL under the AR judge
and the unigram entropy of the samples (always both), and peak memory (CUDA: per configuration;
CPU: the process's peak RSS so far). Then the ratios the decoding engine is judged by: each cache
vs the uncached sampler with the same policy, and the fastest MDM configuration whose gen-PPL and
entropy are within tolerance of the AR model's vs AR with KV cache. Writes JSON + Markdown + a
Pareto plot (gen-PPL vs tokens/s) to --out.

``--shapes both`` runs every configuration with static and with dynamic shapes
(:mod:`unmask.sampling.shapes`; default: auto, static on CUDA), reports the host reads per network
call of each (:class:`unmask.host_reads.HostReads`, in an untimed run) and the static/dynamic
tokens/s ratio: the two draw the same tokens, so the ratio is the price or gain of the layout alone.

Checkpoints: ``benchmarks/train_sampling_pair.py`` trains the AR model at budget C and MDMs at C
and at a multiple of C (an MDM needs more training compute to reach an AR model's quality).

    python benchmarks/train_sampling_pair.py --out runs/bench                    # small preset, CPU budget
    python benchmarks/sampling.py --mdm runs/bench/mdm-small-4x --ar runs/bench/ar-small
    python benchmarks/sampling.py --mdm runs/demo/mdm --ar runs/demo/ar --length 64 --quick   # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from unmask.checkpoint import load_model
from unmask.evaluation.genppl import judge_nll, unigram_entropy
from unmask.host_reads import HostReads
from unmask.sampling import ARConfig, SamplerSpec, ar_sample, make_canvas
from unmask.sampling.shapes import decode_shapes

POLICIES = ("confidence", "threshold", "first-hitting")
CACHES = ("none", "prefix", "dual", "delayed")


def random_network(preset: str, causal: bool, device: torch.device):
    """A randomly initialised network of ``preset`` with the default tokenizer's vocabulary (speed only)."""
    from unmask.config import ModelConfig
    from unmask.data import default_tokenizer
    from unmask.model import Transformer

    config = ModelConfig.from_name(preset, vocab_size=default_tokenizer().vocab_size, causal=causal)
    return Transformer(config).to(device).eval()


class NetworkTimer:
    """Wall seconds spent inside the model's forward calls (CUDA: synchronised at both ends)."""

    def __init__(self, model) -> None:
        self.seconds, self._start = 0.0, 0.0
        self._cuda = next(model.parameters()).is_cuda
        self._hooks = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave)]

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _enter(self, *_) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def mdm_configs(length: int, block: int, quick: bool) -> list[tuple[str, SamplerSpec]]:
    """(label, spec) for every policy x cache, all at temperature 1, semi-AR blocks of ``block``."""
    policy_options = {
        "confidence": {"steps": length // 2},  # two tokens per network call
        "threshold": {"tau": 0.9, "temperature": 1.0},
        "first-hitting": {"k": 1},  # the exact first-hitting sampler inside each block
    }
    out = []
    for policy in POLICIES:
        for cache in CACHES[:2] if quick else CACHES:
            spec = SamplerSpec.from_options(policy, block_len=block, cache=cache, **policy_options[policy])
            out.append((f"{policy} {cache}", spec))
    out.append(("threshold none T=0", SamplerSpec.from_options("threshold", block_len=block, tau=0.9)))  # its own default: greedy
    return out


LAYOUTS = {"both": ["static", "dynamic"]}


def host_reads_per_call(run_once) -> float:
    """Host reads of device data per network call of one (untimed) run."""
    with HostReads() as reads:
        _, nfe = run_once(0)
    return reads.count / max(nfe, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(label, run_once, model, judge, eos, batch, length, repeats, device) -> dict:
    """Median timing over ``repeats`` seeded runs; quality over all their samples."""
    walls, network, samples, nfe = [], [], [], 0
    run_once(0)  # warm-up (allocator, kernels): not timed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for r in range(repeats):
        timer = NetworkTimer(model)
        sync(device)
        start = time.perf_counter()
        tokens, nfe = run_once(r + 1)
        sync(device)
        walls.append(time.perf_counter() - start)
        network.append(timer.seconds)
        timer.close()
        samples.append(tokens.cpu())
    tokens = torch.cat(samples)
    wall = statistics.median(walls)
    overhead = statistics.median(1 - n / w for n, w in zip(network, walls))
    nll = float("nan") if judge is None else judge_nll(judge, tokens.to(next(judge.parameters()).device), eos)
    return {
        "config": label, "batch": batch, "length": length, "nfe": nfe, "wall_s": wall, "tokens_per_s": batch * length / wall,
        "overhead": overhead, "gen_ppl": math.exp(nll), "entropy": float("nan") if judge is None else unigram_entropy(tokens.tolist()),
        "samples": tokens.shape[0], "peak_mem_mib": peak_memory_mib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", default="runs/bench/mdm-small-4x")
    parser.add_argument("--ar", default="runs/bench/ar-small")
    parser.add_argument("--judge", default=None, help="AR run that scores the samples (default: --ar)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--length", type=int, default=256, help="generated tokens per sample")
    parser.add_argument("--block", type=int, default=32, help="semi-AR block length of the MDM configurations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32: the networks' weights")
    parser.add_argument("--ppl-tolerance", type=float, default=0.05, help="matched quality: gen-PPL within this fraction of AR's")
    parser.add_argument("--entropy-tolerance", type=float, default=0.05, help="matched quality: entropy within this many nats of AR's")
    parser.add_argument("--quick", action="store_true", help="caches none and prefix only, 1 repeat")
    parser.add_argument("--configs", default="", help="comma-separated configuration labels to run (default: all)")
    parser.add_argument("--from-json", default="", help="only rewrite the Markdown and the plot from a sampling.json of an earlier run")
    parser.add_argument("--random-preset", default="", help="speed only: randomly initialised networks of this preset instead of "
                        "checkpoints (no gen-PPL or entropy)")
    parser.add_argument("--shapes", default="auto", choices=["auto", "static", "dynamic", "both"],
                        help="decode layout (auto: static on CUDA); both: every configuration in both, side by side")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["rows"], saved["machine"], argparse.Namespace(**{**saved["settings"], "out": args.out}), Path(args.out))
        return
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.random_preset:
        mdm, ar = (random_network(args.random_preset, causal, device) for causal in (False, True))
        mdm_cfg = ar_cfg = judge = None
    else:
        mdm, mdm_cfg = load_model(args.mdm, device)
        ar, ar_cfg = load_model(args.ar, device)
        judge = load_model(args.judge or args.ar, device)[0].float()  # scores in fp32 whatever the samplers ran in
    mdm, ar = mdm.to(dtype), ar.to(dtype)
    eos, length, repeats = 0, args.length, 1 if args.quick else args.repeats
    batches = [int(b) for b in args.batches.split(",")]
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "mdm_params": mdm.num_params(),
    }
    if args.random_preset:
        machine |= {"mdm": f"random {args.random_preset}", "ar": f"random {args.random_preset}", "mdm_train_steps": 0, "ar_train_steps": 0}
    else:
        machine |= {"mdm": args.mdm, "ar": args.ar, "mdm_train_steps": mdm_cfg.train.steps, "ar_train_steps": ar_cfg.train.steps}
    print(json.dumps(machine), flush=True)
    rows = []
    for batch in batches:
        def ar_once(seed: int, batch=batch):
            gen = torch.Generator(device=device).manual_seed(seed)
            out = ar_sample(ar, torch.full((batch, 1), eos, device=device), gen, ARConfig(max_new_tokens=length))
            return out.tokens[:, 1:], out.nfe

        runs = [("ar kv-cache", ar_once, ar)]
        x, cond, width = make_canvas([[]] * batch, length, mdm.config.mask_id, 0, separator=eos)
        x = x.to(device)
        for label, spec in mdm_configs(length, args.block, args.quick):
            def mdm_once(seed: int, spec=spec, x=x):
                out = spec.run(mdm, x, torch.Generator(device=device).manual_seed(seed), cond, start=width)
                return out.tokens[:, width:], out.nfe

            runs.append((label, mdm_once, mdm))
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        for (label, once, model), shapes in [(run, s) for run in runs for s in LAYOUTS.get(args.shapes, [args.shapes])]:
            if wanted and label not in wanted:
                continue
            with decode_shapes(shapes):
                row = measure(label + ("" if args.shapes != "both" else f" [{shapes}]"), once, model, judge, eos, batch, length, repeats, device)
                row["host_reads_per_call"] = host_reads_per_call(once)
            rows.append(row)
            print(f"batch {batch}  {row['config']:24} reads/call {row['host_reads_per_call']:5.2f}  NFE {row['nfe']:6d}  {row['tokens_per_s']:9.1f} tok/s  overhead {100 * row['overhead']:5.1f}%  "
                  f"gen-PPL {row['gen_ppl']:8.1f}  entropy {row['entropy']:.3f}  mem {row['peak_mem_mib']:.0f} MiB", flush=True)
    report(rows, machine, args, Path(args.out))


def summary(rows: list[dict], args) -> list[str]:
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["config"]: r for r in rows if r["batch"] == batch}
        for label, static in by.items():
            dynamic = by.get(label.replace("[static]", "[dynamic]"))
            if label.endswith("[static]") and dynamic:
                lines.append(f"batch {batch}: {label[:-9]}: static/dynamic shapes {static['tokens_per_s'] / dynamic['tokens_per_s']:.2f}x "
                             f"tokens/s, host reads per call {static['host_reads_per_call']:.2f} vs {dynamic['host_reads_per_call']:.2f}")
        for policy in POLICIES:
            base = by.get(f"{policy} none")
            for cache in CACHES[1:]:
                r = by.get(f"{policy} {cache}")
                if base and r:
                    lines.append(
                        f"batch {batch}: {policy} {cache} cache vs none: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                        f"gen-PPL {100 * (r['gen_ppl'] / base['gen_ppl'] - 1):+.1f}%, entropy {r['entropy'] - base['entropy']:+.3f} "
                        "(goal >= 3x at <= 5% gen-PPL change)"
                    )
        mdm_rows = [r for r in by.values() if r["config"] != "ar kv-cache"]
        if mdm_rows:
            worst = max(mdm_rows, key=lambda r: r["overhead"])
            lines.append(f"batch {batch}: largest sampler overhead {100 * worst['overhead']:.1f}% ({worst['config']}; goal <= 10%)")
        ar_row = by.get("ar kv-cache")
        if ar_row is None or not mdm_rows:
            continue
        if math.isnan(ar_row["gen_ppl"]):  # speed only (random networks)
            fast = max(mdm_rows, key=lambda r: r["tokens_per_s"])
            lines.append(f"batch {batch}: fastest MDM configuration {fast['config']}: {fast['tokens_per_s'] / ar_row['tokens_per_s']:.2f}x "
                         "AR+KV tokens/s (speed only: random networks, quality not measured)")
            continue
        matched = [
            r for r in by.values() if r is not ar_row and r["gen_ppl"] <= ar_row["gen_ppl"] * (1 + args.ppl_tolerance)
            and abs(r["entropy"] - ar_row["entropy"]) <= args.entropy_tolerance
        ]
        if matched:
            best = max(matched, key=lambda r: r["tokens_per_s"])
            lines.append(f"batch {batch}: fastest MDM at AR's quality: {best['config']}, {best['tokens_per_s'] / ar_row['tokens_per_s']:.2f}x "
                         f"AR+KV tokens/s (gen-PPL {best['gen_ppl']:.1f} vs {ar_row['gen_ppl']:.1f}, entropy {best['entropy']:.3f} vs "
                         f"{ar_row['entropy']:.3f}; goal >= 1.4x)")
        else:
            fast = max((r for r in by.values() if r is not ar_row), key=lambda r: r["tokens_per_s"])
            good = min((r for r in by.values() if r is not ar_row), key=lambda r: r["gen_ppl"])
            lines.append(f"batch {batch}: no MDM configuration matches AR's gen-PPL {ar_row['gen_ppl']:.1f} (+{100 * args.ppl_tolerance:.0f}%) "
                         f"and entropy {ar_row['entropy']:.3f} (+-{args.entropy_tolerance}); best gen-PPL {good['config']} {good['gen_ppl']:.1f} "
                         f"(entropy {good['entropy']:.3f}); fastest {fast['config']} {fast['tokens_per_s'] / ar_row['tokens_per_s']:.2f}x AR+KV tokens/s")
    return lines


def report(rows: list[dict], machine: dict, args, out_dir: Path) -> None:
    lines = summary(rows, args)
    table = ["| batch | configuration | NFE | tokens/s | overhead | host reads / call | gen-PPL | entropy | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['batch']} | {r['config']} | {r['nfe']} | {r['tokens_per_s']:.1f} | {100 * r['overhead']:.1f}% | "
              f"{r.get('host_reads_per_call', float('nan')):.2f} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | {r['peak_mem_mib']:.0f} |" for r in rows]
    settings = (f"{machine['device']}, {machine['dtype']}, {machine['threads']} threads; generation length {args.length}, "
                f"semi-AR blocks of {args.block}, median of {1 if args.quick else args.repeats} repeats; MDM {machine['mdm']} "
                f"({machine['mdm_train_steps']} steps), AR {machine['ar']} ({machine['ar_train_steps']} steps)")
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampling.json").write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows, "summary": lines}, indent=2) + "\n")
    (out_dir / "sampling.md").write_text(f"# Decoding speed vs quality\n\n{settings}\n\n" + "\n".join(table) + "\n\n" + "\n".join(f"- {l}" for l in lines) + "\n")
    if all(math.isnan(r["gen_ppl"]) for r in rows):
        print(f"wrote {out_dir / 'sampling.json'} and {out_dir / 'sampling.md'} (speed only: no quality plot)")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 5.5), squeeze=False)
    colours = {"ar": "tab:red", "confidence": "tab:blue", "threshold": "tab:green", "first-hitting": "tab:purple"}
    for ax, batch in zip(axes[0], batches):
        for r in (r for r in rows if r["batch"] == batch):
            ax.scatter(r["tokens_per_s"], r["gen_ppl"], color=colours[r["config"].split()[0]])
            ax.annotate(f"{r['config']} (H={r['entropy']:.2f})", (r["tokens_per_s"], r["gen_ppl"]), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="generated tokens/s", ylabel="gen-PPL (AR judge)", title=f"batch {batch}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"decoding speed vs quality ({machine['device']}, {machine['dtype']}; entropy in brackets)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "sampling_pareto.png", dpi=110)
    print(f"wrote {out_dir / 'sampling.json'}, {out_dir / 'sampling.md'} and {out_dir / 'sampling_pareto.png'}")


if __name__ == "__main__":
    main()
