"""Reward- and energy-guided decoding: what each guide buys for what it costs, measured in one run.

Part 1, reward vs compute. Unconditional samples of --length tokens from the MDM (ancestral, --steps
steps) under best-of-N, SVDD (M candidates a step, alpha 0) and SMC (N particles, --smc-alpha, ESS
0.5), for two rewards: the AR run's mean log-likelihood per token (``ar:RUN``) and a regex score
(1 when the text holds the word "the"). Per configuration: the mean reward of the kept samples, the
MDM's network rows per sample (every particle's and candidate's row of every call, the estimates
included), the sequences the reward scored per sample, and the wall seconds per sample. Compute is
counted in forward rows: the MDM's, plus one AR forward per sequence the ``ar:`` reward scores (the
AR run is as large as the MDM); a regex costs no forward. For every best-of-N point the table gives
the least compute at which SVDD and SMC reach its reward (linear between their measured points),
as a fraction of best-of-N's.

Part 2, EDLM. At several step counts, the plain ancestral sampler and EDLM (K candidates, the AR run
as energy, window --window): generative perplexity under a judge AR run that is NOT the energy model
(--judge; trained here with another seed when absent), unigram entropy, network calls and wall time.

Writes guided.json, guided.md and guided.png to --out.

    python benchmarks/guided.py                                   # the tiny pair of benchmarks/structured.py, a judge trained here
    python benchmarks/guided.py --mdm RUN --ar RUN --judge RUN
    python benchmarks/guided.py --from-json benchmarks/results/guided/guided.json   # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.evaluation.genppl import judge_nll, unigram_entropy
from unmask.sampling import AncestralConfig, SamplerSpec, make_canvas
from unmask.steering import BestOfConfig, EDLMConfig, SMCConfig, SVDDConfig, parse_score, steer

REGEX = r"(?s).*\bthe\b.*"


def finished(run: Path) -> bool:
    return (run / "checkpoints" / "LATEST").exists()


def train_ar(run: Path, args) -> None:
    """A tiny AR run (the judge) with the repository's own command; skipped when finished."""
    if finished(run):
        return
    cmd = [sys.executable, "-m", "unmask", "train", "--run-dir", str(run), "--preset", args.preset, "--objective", "ar",
           "--steps", str(args.train_steps), "--batch-size", "8", "--seed", str(args.judge_seed), "--context-len", str(args.context),
           "--eval-every", str(args.train_steps), "--checkpoint-every", str(args.train_steps), "--device", args.device]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def checkpoints(args) -> tuple[Path, Path, Path]:
    """--mdm, --ar (reward and energy) and --judge; the pair of benchmarks/structured.py by default."""
    mdm, ar = Path(args.mdm), Path(args.ar)
    if not (finished(mdm) and finished(ar)):
        subprocess.run([sys.executable, "benchmarks/structured.py", "--tasks", "date", "--configs", "ar kv-cache", "--out",
                        "/tmp/guided-structured"], check=True)  # trains the pair into runs/bench-structured
    judge = Path(args.judge)
    train_ar(judge, args)
    return mdm, ar, judge


def canvas(tok, rows: int, length: int, device):
    """``rows`` unconditional canvases [EOS ; MASK x length]."""
    return make_canvas([[]] * rows, length, tok.mask_id, tok.pad_id, tok.eos_id, device=device)


def decode(mdm, tok, args, guide, score, seed: int, steps: int | None = None, key: str = "reward") -> dict:
    """One guided (or plain: guide None) decoding of --samples rows; its tokens, counts and seconds."""
    x, cond, start = canvas(tok, args.samples, args.length, next(mdm.parameters()).device)
    spec = SamplerSpec("ancestral", AncestralConfig(steps=steps or args.steps))
    cond = cond if guide is None else steer(cond, guide, tokenizer=tok, **{key: score})
    started, cpu = time.perf_counter(), time.process_time()
    out = spec.run(mdm, x, torch.Generator(device=x.device).manual_seed(seed), cond, start=start)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    rows = int(out.row_nfe.sum()) if out.row_nfe is not None else out.nfe * args.samples
    return {"tokens": out.tokens[:, start:].cpu(), "nfe": out.nfe, "rows": rows, "scored": getattr(out, "scored_sequences", 0),
            "score_seconds": getattr(out, "score_seconds", 0.0), "seconds": seconds, "cpu_seconds": cpu}


def rewards_of(tokens: torch.Tensor, tok, scores: dict) -> dict:
    """Each reward of the kept samples (mean and standard error)."""
    from unmask.steering import Candidates

    cands = Candidates(tokens, torch.ones_like(tokens, dtype=torch.bool), tokenizer=tok)
    out = {}
    for name, score in scores.items():
        values = score(cands).double()
        out[name] = {"mean": values.mean().item(), "se": (values.std() / math.sqrt(len(values))).item()}
    return out


def part_rewards(args, mdm, tok, scores: dict) -> list[dict]:
    """Reward vs compute for every guide, particle count and reward."""
    grid = [("best-of", n, BestOfConfig(particles=n)) for n in args.best_of]
    grid += [("svdd", m, SVDDConfig(particles=m, alpha=0.0)) for m in args.svdd]
    grid += [("smc", n, SMCConfig(particles=n, alpha=args.smc_alpha)) for n in args.smc]
    rows = []
    decode(mdm, tok, args, None, None, seed=args.seed)  # untimed: the first batch of a shape sets up its kernels
    bar = tqdm(total=len(grid) * len(scores) * args.repeats, desc="reward vs compute")
    for reward in scores:
        for guide, n, config in grid:
            runs = []
            for r in range(args.repeats):
                run = decode(mdm, tok, args, config, scores[reward], seed=args.seed + r)
                run["kept"] = rewards_of(run.pop("tokens"), tok, {reward: scores[reward]})[reward]
                runs.append(run)
                bar.update()
            row = aggregate(runs, args.samples)
            row.update(score=reward, guide=guide, particles=n)
            row["compute"] = row["rows_per_sample"] + (row["scored_per_sample"] if reward == "ar" else 0.0)
            tqdm.write(f"{reward:5s} {guide:8s} {n:3d}: reward {row['reward']:.3f} +- {row['reward_se']:.3f}, "
                       f"compute {row['compute']:.0f} rows/sample, {row['seconds_per_sample']:.3f} s/sample "
                       f"({row['cpu_seconds_per_sample']:.3f} s CPU)")
            rows.append(row)
    bar.close()
    return rows


def aggregate(runs: list[dict], samples: int) -> dict:
    n = len(runs) * samples
    means = [r["kept"]["mean"] for r in runs]
    return {
        "reward": sum(means) / len(means), "reward_se": math.sqrt(sum(r["kept"]["se"] ** 2 for r in runs)) / len(runs),
        "rows_per_sample": sum(r["rows"] for r in runs) / n, "scored_per_sample": sum(r["scored"] for r in runs) / n,
        "nfe": sum(r["nfe"] for r in runs) / len(runs), "seconds_per_sample": sum(r["seconds"] for r in runs) / n,
        "cpu_seconds_per_sample": sum(r["cpu_seconds"] for r in runs) / n,
        "score_seconds_per_sample": sum(r["score_seconds"] for r in runs) / n,
    }


def part_edlm(args, mdm, tok, energy, judge) -> list[dict]:
    """Gen-PPL under the judge, entropy, calls and wall time: plain ancestral vs EDLM at each step count."""
    rows = []
    decode(mdm, tok, args, None, None, seed=args.seed, steps=args.edlm_steps[0])  # untimed: the first batch of a shape sets up its kernels
    bar = tqdm(total=2 * len(args.edlm_steps), desc="edlm")
    for steps in args.edlm_steps:
        for name, guide in (("plain", None), ("edlm", EDLMConfig(particles=args.edlm_k, window=args.window))):
            run = decode(mdm, tok, args, guide, energy, seed=args.seed, steps=steps, key="energy")
            tokens = run.pop("tokens")
            nll = judge_nll(judge, tokens.to(next(judge.parameters()).device), tok.eos_id)
            rows.append({"sampler": name, "steps": steps, "gen_ppl": math.exp(nll), "entropy": unigram_entropy(tokens.tolist()),
                         "nfe": run["nfe"], "seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"], "score_seconds": run["score_seconds"],
                         "scored_per_sample": run["scored"] / args.samples})
            tqdm.write(f"{name:5s} {steps:3d} steps: gen-PPL {rows[-1]['gen_ppl']:.1f}, entropy {rows[-1]['entropy']:.3f}, "
                       f"{run['nfe']} calls, {run['seconds']:.1f} s ({run['cpu_seconds']:.1f} s CPU)")
            bar.update()
    bar.close()
    return rows


def parse_args() -> argparse.Namespace:
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", default="runs/bench-structured/mdm", help="the MDM (default: benchmarks/structured.py's tiny one)")
    parser.add_argument("--ar", default="runs/bench-structured/ar", help="the AR run of the ar: reward and of EDLM's energy")
    parser.add_argument("--judge", default="runs/bench-guided/judge", help="the AR run that judges EDLM (trained here when absent)")
    parser.add_argument("--preset", default="tiny", help="preset of a judge trained here")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--judge-seed", type=int, default=1, help="the judge's training seed (the energy run's is 0)")
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=12, help="ancestral steps of part 1")
    parser.add_argument("--samples", type=int, default=16, help="kept samples per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration of part 1 (seeds seed, seed + 1, ...)")
    parser.add_argument("--best-of", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--svdd", type=ints, default=[2, 4])
    parser.add_argument("--smc", type=ints, default=[2, 4, 8])
    parser.add_argument("--smc-alpha", type=float, default=0.1)
    parser.add_argument("--rewards", default="ar,regex")
    parser.add_argument("--edlm-steps", type=ints, default=[4, 8, 24])
    parser.add_argument("--edlm-k", type=int, default=8)
    parser.add_argument("--window", type=float, default=0.25)
    parser.add_argument("--edlm-samples", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/guided")
    parser.add_argument("--from-json", default="", help="only rewrite the Markdown and the plot from a guided.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    device = torch.device(args.device)
    mdm_dir, ar_dir, judge_dir = checkpoints(args)
    torch.set_grad_enabled(False)
    mdm, mdm_cfg = load_model(mdm_dir, device)
    judge = load_model(judge_dir, device)[0]
    tok = checkpoint_tokenizer(mdm_dir)
    ar = parse_score(f"ar:{ar_dir}", "reward", device)
    scores = {"ar": ar, "regex": parse_score(f"regex:{REGEX}")}
    scores = {name: scores[name] for name in args.rewards.split(",")}
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "torch": torch.__version__,
               "mdm": str(mdm_dir), "ar": str(ar_dir), "judge": str(judge_dir), "mdm_params": mdm.num_params(),
               "mdm_train_steps": mdm_cfg.train.steps}
    print(json.dumps(machine), flush=True)
    start = time.perf_counter()
    rewards = part_rewards(args, mdm, tok, scores)
    edlm_args = argparse.Namespace(**{**vars(args), "samples": args.edlm_samples})
    edlm = part_edlm(edlm_args, mdm, tok, ar, judge)
    machine["seconds"] = time.perf_counter() - start
    settings = {k: v for k, v in vars(args).items() if k != "from_json"}
    report({"machine": machine, "settings": settings, "rewards": rewards, "edlm": edlm}, Path(args.out))


# ---------------------------------------------------------------- report


def reach(points: list[dict], target: float) -> float | None:
    """The least compute at which a guide's curve (points sorted by compute) reaches ``target``
    reward, linear between its measured points; None when it never does."""
    points = sorted(points, key=lambda p: p["compute"])
    for i, p in enumerate(points):
        if p["reward"] >= target:
            if i == 0:
                return p["compute"]
            q = points[i - 1]
            if p["reward"] == q["reward"]:
                return p["compute"]
            return q["compute"] + (target - q["reward"]) / (p["reward"] - q["reward"]) * (p["compute"] - q["compute"])
    return None


def reward_table(rows: list[dict]) -> list[str]:
    table = ["| reward | guide | N / M | kept reward | MDM rows / sample | scored / sample | compute / sample | wall s / sample | "
             "CPU s / sample | of which score s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['score']} | {r['guide']} | {r['particles']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     f"{r['rows_per_sample']:.0f} | {r['scored_per_sample']:.0f} | {r['compute']:.0f} | {r['seconds_per_sample']:.3f} | "
                     f"{r['cpu_seconds_per_sample']:.3f} | {r['score_seconds_per_sample']:.3f} |")
    return table


def goal_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Per reward and best-of-N point: the compute at which SVDD and SMC reach its reward, over best-of-N's."""
    table = ["| reward | best-of N | its reward | its compute | SVDD reaches it at | SMC reaches it at |", "|---|---|---|---|---|---|"]
    found = []
    for reward in dict.fromkeys(r["score"] for r in rows):
        mine = [r for r in rows if r["score"] == reward]
        for b in (r for r in mine if r["guide"] == "best-of" and r["particles"] > 1):
            cells = []
            for guide in ("svdd", "smc"):
                c = reach([r for r in mine if r["guide"] == guide], b["reward"])
                cells.append("never" if c is None else f"{c:.0f} ({c / b['compute']:.2f}x)")
                found.append({"reward": reward, "best_of": b["particles"], "guide": guide, "ratio": None if c is None else c / b["compute"]})
            table.append(f"| {reward} | {b['particles']} | {b['reward']:.3f} | {b['compute']:.0f} | {cells[0]} | {cells[1]} |")
    return table, found


def edlm_table(rows: list[dict]) -> list[str]:
    table = ["| decoding | steps | gen-PPL (judge) | unigram entropy | network calls | energy sequences / sample | wall s | CPU s | "
             "of which energy s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['sampler']} | {r['steps']} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | {r['nfe']} | {r['scored_per_sample']:.0f} | "
                     f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['score_seconds']:.1f} |")
    return table


def findings(saved: dict, goals: list[dict]) -> list[str]:
    out = []
    for reward in dict.fromkeys(g["reward"] for g in goals):
        for guide in ("svdd", "smc"):
            ratios = [g["ratio"] for g in goals if g["reward"] == reward and g["guide"] == guide]
            met = [r for r in ratios if r is not None and r <= 1 / 3]
            reached = [r for r in ratios if r is not None]
            out.append(f"{reward} reward, {guide.upper()}: reaches best-of-N's reward at <= 1/3 of its compute for {len(met)} of "
                       f"{len(ratios)} best-of points (reaches it at all for {len(reached)}; best ratio "
                       f"{min(reached):.2f}x)." if reached else f"{reward} reward, {guide.upper()}: never reaches best-of-N's reward "
                       f"within the measured particle counts.")
    out.append(edlm_finding(saved["edlm"]))
    return out


def edlm_finding(rows: list[dict]) -> str:
    """Whether an EDLM point reaches a plain point's gen-PPL at >= 1.3x less time (CPU seconds: on a
    shared machine wall time measures the neighbours too) with the entropy within 0.05 nats."""
    plain = [r for r in rows if r["sampler"] == "plain"]
    edlm = [r for r in rows if r["sampler"] == "edlm"]
    wins = [(p, e) for p in plain for e in edlm if e["gen_ppl"] <= p["gen_ppl"] and abs(e["entropy"] - p["entropy"]) <= 0.05
            and e["cpu_seconds"] * 1.3 <= p["cpu_seconds"]]
    if wins:
        return "EDLM reaches the plain sampler's gen-PPL at >= 1.3x less CPU time (entropy within 0.05) for: " + ", ".join(
            f"plain {p['steps']} steps ({p['gen_ppl']:.0f}, {p['cpu_seconds']:.1f} s) by EDLM {e['steps']} steps ({e['gen_ppl']:.0f}, "
            f"{e['cpu_seconds']:.1f} s)" for p, e in wins) + "."
    ppl = [r["gen_ppl"] for r in plain]
    return (f"EDLM: no point reaches a plain point's gen-PPL at >= 1.3x less CPU time with the entropy within 0.05 nats: the goal "
            f"is not met at this scale (the plain sampler's gen-PPL spans {min(ppl):.0f}-{max(ppl):.0f} over the step counts: "
            f"a model this weak barely improves with steps, and the energy calls cost more than the steps they save).")


def report(saved: dict, out_dir: Path) -> None:
    machine, s = saved["machine"], saved["settings"]
    head = (f"{machine['device']}, {machine['threads']} threads (load average {machine['load_average']:.1f} at the start), torch "
            f"{machine['torch']}; MDM {machine['mdm']} ({machine['mdm_train_steps']} steps, {machine['mdm_params'] / 1e6:.2f}M params), "
            f"reward and energy AR {machine['ar']}, judge AR {machine['judge']} (another seed); {s['samples']} unconditional samples of "
            f"{s['length']} tokens per run, ancestral; {machine['seconds']:.0f} s in all.")
    goals, found = goal_table(saved["rewards"])
    parts = [
        "# Reward- and energy-guided decoding", head,
        f"## Reward vs compute ({s['steps']} ancestral steps; SVDD alpha 0, SMC alpha {s['smc_alpha']}, ESS 0.5)",
        f"Rewards: `ar` = mean log-likelihood per token under the AR run; `regex` = 1 when the text holds the word \"the\" "
        f"(`{REGEX}`). Compute per sample = MDM network rows + AR forwards of the `ar` reward (a regex costs none).",
        "\n".join(reward_table(saved["rewards"])),
        "## Where SVDD and SMC reach best-of-N's reward", "Compute at which each reaches the best-of-N point's reward "
        "(linear between measured points), and its ratio to best-of-N's compute.", "\n".join(goals),
        f"## EDLM: generative perplexity vs steps (K = {s['edlm_k']}, window {s['window']}, {s['edlm_samples']} samples)",
        "Gen-PPL under the judge (not the energy model); network calls are the MDM's (EDLM adds one full forward per corrected step).",
        "\n".join(edlm_table(saved["edlm"])),
        "## Findings", "\n".join(f"- {line}" for line in findings(saved, found)),
        "![reward vs compute and EDLM](guided.png)",
    ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guided.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out_dir / "guided.md").write_text(text)
    plot(saved, out_dir / "guided.png")


def plot(saved: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rewards = list(dict.fromkeys(r["score"] for r in saved["rewards"]))
    fig, axes = plt.subplots(1, len(rewards) + 1, figsize=(5 * (len(rewards) + 1), 4))
    for ax, reward in zip(axes, rewards):
        for guide, colour in (("best-of", "tab:gray"), ("svdd", "tab:blue"), ("smc", "tab:orange")):
            pts = sorted((r for r in saved["rewards"] if r["score"] == reward and r["guide"] == guide), key=lambda r: r["compute"])
            ax.errorbar([p["compute"] for p in pts], [p["reward"] for p in pts], [p["reward_se"] for p in pts], marker="o", color=colour,
                        label=guide, capsize=2)
            for p in pts:
                ax.annotate(str(p["particles"]), (p["compute"], p["reward"]), fontsize=7)
        ax.set(xscale="log", xlabel="compute per sample (forward rows)", ylabel=f"kept {reward} reward", title=f"reward: {reward}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for name, colour in (("plain", "tab:gray"), ("edlm", "tab:green")):
        pts = [r for r in saved["edlm"] if r["sampler"] == name]
        ax.plot([p["cpu_seconds"] for p in pts], [p["gen_ppl"] for p in pts], marker="o", color=colour, label=name)
        for p in pts:
            ax.annotate(f"{p['steps']} ({p['entropy']:.2f})", (p["cpu_seconds"], p["gen_ppl"]), fontsize=7)
    ax.set(xlabel="CPU seconds (the batch)", ylabel="gen-PPL under the judge", title="EDLM vs plain (steps, entropy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
