"""Few-step generation, side by side: MDM, MDM + SDTT, UDLM, Duo, Duo + DCD, with the AR model as reference.

Every base model is trained by ``unmask train`` on the embedded corpus (prepared once; or --data) with the same
preset, context, seed, batch and number of optimizer steps, so the same training tokens; each
objective with its own default learning rate. Duo spends the first half of its steps in its
Gaussian curriculum (the paper's proportion). The distilled runs are ``unmask distill`` of the MDM
(SDTT) and of Duo (DCD): they start from their teacher and add --distill-rounds x
--distill-steps optimizer steps of the same batch.

* Likelihood (``unmask.evaluate_checkpoint``, the public form of ``unmask eval ppl``): every run on
  the same --windows validation windows spread over the held-out works; the diffusion models' Monte
  Carlo bound (t-DCE for the masked ones, the continuous-time UDLM bound for the uniform-state ones,
  --draws stratified draws, the same seed), the AR model's exact NLL.
* Generation (``unmask.generate``, the path of ``unmask eval genppl``): --samples samples of
  --length tokens after the EOS separator at temperature 1, at each count of --sampling-steps; the
  masked models with the ancestral sampler (RADD caching: a call only where a row unmasks), the
  uniform-state ones with the uniform sampler (NFE = steps), its last step Duo's greedy tail (the
  argmax of the prediction) and, with --tails greedy,plain (default), also a plain draw. Step counts
  above the length are kept: both samplers are exact only as steps >> length, so 1024 steps is the
  many-step reference. gen-PPL under a judge AR model that is none of the compared models (the
  same preset trained with another seed for --judge-steps), unigram entropy of each sample
  (mean), and wall seconds per sample (median of --repeats, the samples of all repeats scored);
  the step counts are the outer loop, so the models are timed side by side. The AR row decodes
  with its KV cache (one step per token). Held-out text of the same length is scored by the same
  judge as the data's reference.
* Goals (summary lines): the MDM has the best bound among the diffusion models; Duo + DCD with
  greedy tail has the best gen-PPL at <= 32 steps among the diffusion configurations with healthy
  entropy (>= --healthy-entropy x the held-out text's); distillation needs >= 4x fewer steps for
  the teacher's gen-PPL (:func:`steps_for_ppl`: each curve interpolated linearly in log steps vs
  log gen-PPL at its first crossing).

Writes few_steps.json, few_steps.md and few_steps.png to --out; the runs go to --runs (a finished
run is reused, so a second call only evaluates).

    nice -n 10 python benchmarks/few_steps.py --threads 1           # tiny preset, context 64, on a shared 2-core CPU
    OUT=runs/gpu-few-steps bash benchmarks/gpu_few_steps.sh         # 85m preset on one CUDA GPU
    python benchmarks/few_steps.py --from-json benchmarks/results/few_steps/few_steps.json   # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import unmask
from unmask.data import TokenDataset
from unmask.evaluation.genppl import judge_nll, quality_report, unigram_entropy

# name -> (run folder, objective or distillation method, teacher name)
MODELS = {
    "AR": ("ar", "ar", None),
    "MDM": ("mdm", "mdm", None),
    "MDM + SDTT": ("mdm-sdtt", "sdtt", "MDM"),
    "UDLM": ("udlm", "udlm", None),
    "Duo": ("duo", "duo", None),
    "Duo + DCD": ("duo-dcd", "dcd", "Duo"),
}
JUDGE = "ar-judge"
UNIFORM = ("udlm", "duo", "dcd")
FEW = 32  # "few steps": at most this many


# ---------------------------------------------------------------- steps for equal gen-PPL


@dataclass(frozen=True)
class Crossing:
    """The steps at which a gen-PPL curve first reaches a target: ``relation`` "=" (interpolated),
    "<=" (already reached at the fewest steps measured) or ">" (not reached at the most)."""

    steps: float
    relation: str


def steps_for_ppl(steps: list[float], ppls: list[float], target: float) -> Crossing:
    """The sampling steps a curve needs to reach gen-PPL ``target``.

    ``steps`` increasing, ``ppls`` the gen-PPL at each. Scanning from the fewest steps, the first
    i with ppls[i] <= target; between the measured points before and at it the curve is a straight
    line in (log steps, log gen-PPL), so with a = log(ppls[i-1] / target) / log(ppls[i-1] / ppls[i])
    the crossing is steps[i-1] * (steps[i] / steps[i-1]) ** a. Noisy curves may cross more than once;
    the first crossing is the fewest steps that reach the target.
    """
    if len(steps) != len(ppls) or not steps:
        raise ValueError("steps and ppls must be non-empty and of one length")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps must increase")
    if ppls[0] <= target:
        return Crossing(float(steps[0]), "<=")
    for i in range(1, len(steps)):
        if ppls[i] <= target:
            a = math.log(ppls[i - 1] / target) / math.log(ppls[i - 1] / ppls[i])
            return Crossing(steps[i - 1] * (steps[i] / steps[i - 1]) ** a, "=")
    return Crossing(float(steps[-1]), ">")


def distillation_ratio(teacher: dict[int, float], student: dict[int, float], at: int) -> dict:
    """How many times fewer steps the student needs for the gen-PPL it reaches at ``at`` steps:
    the teacher's steps to that gen-PPL (:func:`steps_for_ppl`) / ``at``. Curves as {steps: gen-PPL}."""
    grid = sorted(teacher)
    target = student[at]
    crossing = steps_for_ppl(grid, [teacher[s] for s in grid], target)
    return {"at_steps": at, "student_ppl": target, "teacher_steps": crossing.steps, "ratio": crossing.steps / at,
            "relation": crossing.relation}


# ---------------------------------------------------------------- training


def unmask_cli(*argv: str) -> None:
    """One ``unmask`` command in its own process (the command line a user would type)."""
    cmd = [sys.executable, "-m", "unmask", *argv]
    print("$ unmask " + " ".join(argv), flush=True)
    subprocess.run(cmd, check=True)


def finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "LATEST"  # names the newest complete checkpoint, step_XXXXXX
    return latest.exists() and int(latest.read_text().strip().split("_")[-1]) >= steps


def timed_run(run: Path, steps: int, argv: list[str]) -> float:
    """Run ``unmask argv`` unless ``run`` already has ``steps`` steps; its wall seconds (saved with the run)."""
    record = run / "bench_seconds.txt"
    if finished(run, steps) and record.exists():
        return float(record.read_text())
    start = time.perf_counter()
    unmask_cli(*argv)
    seconds = time.perf_counter() - start
    record.write_text(f"{seconds:.1f}\n")
    return seconds


def train_all(args) -> dict[str, dict]:
    """Train (or reuse) every run: {name: {"dir", "seconds", "steps"}} for the models and the judge."""
    root = Path(args.runs)
    common = ["--preset", args.preset, "--batch-size", str(args.batch), "--device", args.device, "--log-every", str(max(1, args.steps // 20))]
    if args.context:
        common += ["--context-len", str(args.context)]
    if args.data:
        common += ["--data", args.data]

    def base(folder: str, objective: str, steps: int, seed: int, extra: list[str]) -> dict:
        run = root / folder
        argv = ["train", "--run-dir", str(run), "--objective", objective, "--steps", str(steps), "--seed", str(seed),
                "--warmup-steps", str(max(1, steps // 100)), "--eval-every", str(steps), "--checkpoint-every", str(steps), *common, *extra]
        return {"dir": str(run), "seconds": timed_run(run, steps, argv), "steps": steps}

    runs = {JUDGE: base(JUDGE, "ar", args.judge_steps, args.seed + 1, [])}
    for name, (folder, objective, teacher) in MODELS.items():
        if teacher is None:
            extra = ["--curriculum-steps", str(args.steps // 2)] if objective == "duo" else []
            runs[name] = base(folder, objective, args.steps, args.seed, extra)
    for name, (folder, method, teacher) in MODELS.items():
        if teacher is not None:
            run, steps = root / folder, args.distill_rounds * args.distill_steps
            argv = ["distill", runs[teacher]["dir"], "--out", str(run), "--method", method, "--rounds", str(args.distill_rounds),
                    "--steps-per-round", str(args.distill_steps), "--batch-size", str(args.batch), "--seed", str(args.seed),
                    "--eval-every", str(steps), "--checkpoint-every", str(steps), "--log-every", str(max(1, steps // 20)),
                    "--device", args.device]
            if args.teacher_steps:
                argv += ["--teacher-steps", str(args.teacher_steps)]
            runs[name] = {"dir": str(run), "seconds": timed_run(run, steps, argv), "steps": steps}
    for name, info in runs.items():
        info["config"] = json.loads((Path(info["dir"]) / "config.json").read_text())
    return runs


# ---------------------------------------------------------------- evaluation


def bounds(args, runs: dict[str, dict]) -> list[dict]:
    """The validation bound of every model (AR: exact) on the same windows and draws."""
    rows = []
    for name in MODELS:
        res = unmask.evaluate_checkpoint(runs[name]["dir"], windows=args.windows, draws=args.draws, estimator="t-dce", seed=1,
                                         device=args.device, progress=False)
        row = {"model": name, "kind": res["kind"], "estimator": res["estimator"], "nats_per_token": res["nats_per_token"],
               "stderr": res["stderr"], "num_tokens": res["num_tokens"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def unigram_level(data: str | Path, context: int, windows: int) -> float:
    """Nats/token of the evaluation windows under the training split's token frequencies (add-1/2):
    the level a model that has learned no context cannot beat, next to the bounds."""
    train = TokenDataset(data, "train")
    counts = sum(np.bincount(np.asarray(shard, dtype=np.int64), minlength=train.tokenizer.vocab_size) for shard in train.shards) + 0.5
    held_out = TokenDataset(data, "val").eval_windows(context, windows).reshape(-1)
    return float(-np.log(counts[held_out] / counts.sum()).mean())


def variants(tails: list[str]) -> list[tuple[str, str, bool | None]]:
    """(label, model, greedy tail) of every diffusion configuration: the masked models once, the
    uniform-state ones once per tail in ``tails`` (greedy, plain)."""
    out = []
    for name, (_, objective, _) in MODELS.items():
        if objective != "ar":
            out += [(f"{name}, {tail} tail", name, tail == "greedy") for tail in tails] if objective in UNIFORM else [(name, name, None)]
    return out


def teacher_label(label: str) -> str | None:
    """The configuration of a distilled configuration's teacher with the same tail (None: not distilled)."""
    name, _, tail = label.partition(", ")
    teacher = MODELS[name][2]
    return None if teacher is None else ", ".join([teacher, *([tail] if tail else [])])


def sampler_options(objective: str, steps: int, greedy: bool | None) -> dict:
    """The options of ``unmask.generate`` for one configuration at ``steps`` sampling steps (AR: none)."""
    if objective == "ar":
        return {}
    if objective in UNIFORM:
        return {"sampler": "uniform", "steps": steps, "greedy_tail": bool(greedy)}
    return {"sampler": "ancestral", "steps": steps}


def sample_row(args, label: str, name: str, run: dict, steps: int | None, greedy: bool | None, judge) -> dict:
    """gen-PPL, entropy and seconds per sample of one configuration at ``steps`` (the median of --repeats calls)."""
    options = sampler_options(run["config"]["train"]["objective"], steps or args.length, greedy)
    seconds, tokens, nfe = [], [], 0
    for r in range(args.repeats):
        out = unmask.generate(run["dir"], "", args.samples, args.length, seed=args.seed + r, device=args.device, temperature=1.0, **options)
        seconds.append(out["seconds"] / args.samples)
        tokens += [s["tokens"] for s in out["samples"]]
        nfe = out["nfe"]
    nll = judge_nll(judge, torch.tensor(tokens), bos=0)
    return {"config": label, "model": name, "steps": steps or args.length, "sampler": options.get("sampler", "ar kv-cache"),
            "greedy_tail": options.get("greedy_tail", False), "nfe": nfe, "seconds_per_sample": statistics.median(seconds),
            **quality_report(tokens, nll), "example": tokens[0][:24]}


def generation(args, runs: dict[str, dict]) -> tuple[list[dict], dict]:
    """Every diffusion configuration at every step count (step counts outer), the AR model once, and
    the held-out text's reference (judge gen-PPL and entropy of windows of --length tokens)."""
    judge, _ = unmask.load_model(runs[JUDGE]["dir"], args.device)
    torch.set_grad_enabled(False)
    grid = [int(s) for s in args.sampling_steps.split(",")]
    configs = variants(args.tails.split(","))
    plan = [("AR", "AR", None, None)] + [(label, name, steps, greedy) for steps in grid for label, name, greedy in configs]
    for name in MODELS:  # untimed: the first call of each path pays its one-time costs
        objective = runs[name]["config"]["train"]["objective"]
        unmask.generate(runs[name]["dir"], "", 1, args.length, device=args.device, **sampler_options(objective, grid[0], True))
    rows = []
    for label, name, steps, greedy in tqdm(plan, desc="gen-PPL", unit="config"):
        row = sample_row(args, label, name, runs[name], steps, greedy, judge)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "example"}), flush=True)
    held_out = torch.from_numpy(TokenDataset(args.data or unmask.default_dataset(), "val").eval_windows(args.length, 64))
    data = {"gen_ppl": math.exp(judge_nll(judge, held_out, bos=0)), "unigram_entropy": unigram_entropy(held_out.tolist()),
            "windows": held_out.shape[0]}
    print(json.dumps({"held_out": data}), flush=True)
    return rows, data


# ---------------------------------------------------------------- goals


def labels(rows: list[dict]) -> list[str]:
    """The diffusion configurations of ``rows`` in their order."""
    return list(dict.fromkeys(r["config"] for r in rows if r["model"] != "AR"))


def curve(rows: list[dict], label: str) -> dict[int, float]:
    return {r["steps"]: r["gen_ppl"] for r in rows if r["config"] == label}


def student_steps(config: dict) -> int | None:
    """The sampling steps a distilled run was distilled for: teacher steps / 2^rounds."""
    distill = config["train"].get("distill")
    return None if not distill else distill["teacher_steps"] // 2 ** distill["rounds"]


def ratios(rows: list[dict], runs: dict[str, dict]) -> list[dict]:
    """Distillation's step reduction at equal gen-PPL (the teacher with the same tail), at every
    few-step count and at the distilled count."""
    out = []
    for label in labels(rows):
        teacher = teacher_label(label)
        if teacher is None:
            continue
        own = student_steps(runs[label.partition(", ")[0]]["config"])
        student = curve(rows, label)
        for at in sorted(s for s in student if s <= FEW or s == own):
            out.append({"student": label, "teacher": teacher, "distilled_for": own, **distillation_ratio(curve(rows, teacher), student, at)})
    return out


def goals(bound_rows: list[dict], rows: list[dict], data: dict, distilled: list[dict], healthy: float) -> list[str]:
    """The three goals, each a line that says whether this scale reproduces it."""
    lines = []
    diffusion = sorted((r for r in bound_rows if r["model"] != "AR"), key=lambda r: r["nats_per_token"])
    best, second = diffusion[0], diffusion[1]
    gap = second["nats_per_token"] - best["nats_per_token"]
    lines.append(f"best bound among the diffusion models: {best['model']} {best['nats_per_token']:.3f} +- {best['stderr']:.3f} nats/token "
                 f"(next {second['model']} {second['nats_per_token']:.3f}, {gap / max(best['stderr'], second['stderr'], 1e-9):.1f} SE apart); "
                 f"goal MDM: {'reproduced' if best['model'] == 'MDM' else 'NOT reproduced'}")
    floor, goal = healthy * data["unigram_entropy"], "Duo + DCD, greedy tail"
    for steps in sorted({r["steps"] for r in rows if r["model"] != "AR" and r["steps"] <= FEW}):
        at = [r for r in rows if r["model"] != "AR" and r["steps"] == steps]
        ok = [r for r in at if r["unigram_entropy"] >= floor]
        dropped = ", ".join(f"{r['config']} (H={r['unigram_entropy']:.2f})" for r in at if r not in ok)
        dropped = f"; below the floor: {dropped}" if dropped else ""
        if not ok:
            lines.append(f"{steps} steps: no diffusion configuration keeps entropy >= {floor:.2f}{dropped}; goal {goal}: NOT reproduced")
            continue
        win = min(ok, key=lambda r: r["gen_ppl"])
        lines.append(f"{steps} steps: best gen-PPL at entropy >= {floor:.2f}: {win['config']} {win['gen_ppl']:.1f} "
                     f"(H={win['unigram_entropy']:.2f}){dropped}; goal {goal}: {'reproduced' if win['config'] == goal else 'NOT reproduced'}")
    for r in distilled:
        if r["at_steps"] != r["distilled_for"]:
            continue
        met = r["ratio"] >= 4 and r["relation"] in ("=", ">")
        lines.append(f"{r['student']} at {r['at_steps']} steps (gen-PPL {r['student_ppl']:.1f}): {r['teacher']} needs {r['relation']} "
                     f"{r['teacher_steps']:.0f} steps, {r['relation']} {r['ratio']:.1f}x; goal >= 4x: {'reproduced' if met else 'NOT reproduced'}")
    return lines


# ---------------------------------------------------------------- report


def pivot(rows: list[dict], fmt) -> list[str]:
    """A table of ``fmt(row)``: one line per diffusion configuration, one column per step count."""
    grid = sorted({r["steps"] for r in rows if r["model"] != "AR"})
    table = ["| configuration | " + " | ".join(f"{s} steps" for s in grid) + " |", "|---|" + "---|" * len(grid)]
    for label in labels(rows):
        by = {r["steps"]: r for r in rows if r["config"] == label}
        table.append(f"| {label} | " + " | ".join(fmt(by[s]) if s in by else "" for s in grid) + " |")
    return table


def markdown(saved: dict) -> str:
    m, s, runs = saved["machine"], saved["settings"], saved["runs"]
    rows, data = saved["generation"], saved["held_out"]
    ar = next(r for r in rows if r["model"] == "AR")
    head = (f"{s.get('data') or 'The embedded corpus'}, {s['preset']} preset, context {m['context']}, {s['steps']} steps x {s['batch']} sequences per base model "
            f"(distilled: + {s['distill_rounds']} rounds x {s['distill_steps']} steps); judge: AR, seed {s['seed'] + 1}, "
            f"{s['judge_steps']} steps. {m['device']}, {m['threads']} threads, training {m['train_precision']}, sampling fp32, "
            f"torch {m['torch']}; {s['samples']} x {s['length']} tokens at temperature 1, median of {s['repeats']} "
            f"repeat(s); {s['windows']} validation windows, {s['draws']} draws; {m['seconds'] / 60:.0f} min in all (the runs "
            f"trained in this call included).")
    lines = ["# Few-step generation: MDM, UDLM, Duo, distillation", "", head, "",
             "| model | objective | validation nats/token | +- SE | kind | train s |", "|---|---|---|---|---|---|"]
    for b in saved["bounds"]:
        run = runs[b["model"]]
        lines.append(f"| {b['model']} | {run['config']['train']['objective']} | {b['nats_per_token']:.4f} | {b['stderr']:.4f} | "
                     f"{'exact' if b['kind'] == 'exact' else 'bound'} ({b['estimator']}) | {run['seconds']:.0f} |")
    if "unigram_level" in saved:
        lines += ["", f"The training split's token frequencies (no context) give {saved['unigram_level']:.4f} nats/token on the same windows."]
    lines += ["", f"gen-PPL under the judge (unigram entropy); the masked models ancestral, the uniform-state ones with the uniform "
              f"sampler, its last step the argmax of the prediction (greedy tail) or a draw (plain tail); "
              f"AR + KV cache: {ar['gen_ppl']:.1f} ({ar['unigram_entropy']:.2f}); held-out text: {data['gen_ppl']:.1f} "
              f"({data['unigram_entropy']:.2f}); healthy entropy >= {s['healthy_entropy'] * data['unigram_entropy']:.2f}:", ""]
    lines += pivot(rows, lambda r: f"{r['gen_ppl']:.1f} ({r['unigram_entropy']:.2f})")
    lines += ["", f"Wall seconds per sample (NFE), AR + KV cache: {ar['seconds_per_sample']:.3f} ({ar['nfe']}):", ""]
    lines += pivot(rows, lambda r: f"{r['seconds_per_sample']:.3f} ({r['nfe']})")
    lines += ["", "Steps for equal gen-PPL (the teacher's curve interpolated in log-log at the student's gen-PPL):", "",
              "| student | at steps | its gen-PPL | teacher needs steps | ratio |", "|---|---|---|---|---|"]
    for r in saved["ratios"]:
        mark = " (distilled for)" if r["at_steps"] == r["distilled_for"] else ""
        lines.append(f"| {r['student']} | {r['at_steps']}{mark} | {r['student_ppl']:.1f} | {r['relation']} {r['teacher_steps']:.1f} | "
                     f"{r['relation']} {r['ratio']:.2f}x |")
    lines += ["", *[f"- {line}" for line in saved["summary"]], "", "![gen-PPL, entropy and time per sample vs steps](few_steps.png)"]
    return "\n".join(lines) + "\n"


def plot(saved: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows, data, s = saved["generation"], saved["held_out"], saved["settings"]
    ar = next(r for r in rows if r["model"] == "AR")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label in labels(rows):
        rs = sorted((r for r in rows if r["config"] == label), key=lambda r: r["steps"])
        style = ("--" if teacher_label(label) else "-") + ("s" if "plain" in label else "o")
        for ax, key in zip(axes, ("gen_ppl", "unigram_entropy", "seconds_per_sample")):
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], style, label=label)
    for ax, key, ylabel in zip(axes, ("gen_ppl", "unigram_entropy", "seconds_per_sample"),
                               ("gen-PPL (AR judge)", "unigram entropy (nats)", "wall seconds per sample")):
        ax.axhline(ar[key], color="gray", linestyle=":", label="AR + KV cache")
        ax.set(xscale="log", xlabel="sampling steps", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(data["gen_ppl"], color="black", linestyle=":", label="held-out text")
    axes[1].axhline(s["healthy_entropy"] * data["unigram_entropy"], color="red", linestyle=":", label="healthy floor")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"few-step generation, {s['preset']} preset ({saved['machine']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(saved: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "few_steps.json").write_text(json.dumps(saved, indent=2) + "\n")
    md = markdown(saved)
    (out / "few_steps.md").write_text(md)
    plot(saved, out / "few_steps.png")
    print(md)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/few_steps")
    parser.add_argument("--runs", default="runs/bench-few-steps", help="folder of the training runs (a finished run is reused)")
    parser.add_argument("--data", default="", help="folder from `unmask data prepare` for every run (default: the embedded corpus)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--context", type=int, default=64, help="context length (0: the preset's)")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of every base model (AR, MDM, UDLM, Duo)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (every run)")
    parser.add_argument("--judge-steps", type=int, default=0, help="optimizer steps of the judge AR model (default 2 x --steps)")
    parser.add_argument("--distill-rounds", type=int, default=3)
    parser.add_argument("--distill-steps", type=int, default=40, help="optimizer steps per distillation round")
    parser.add_argument("--teacher-steps", type=int, default=0, help="the teachers' sampling steps in the first round (0: unmask distill's default)")
    parser.add_argument("--sampling-steps", default="8,16,32,64,128,1024")
    parser.add_argument("--tails", default="greedy,plain", help="the uniform-state models' last steps: greedy (Duo's greedy tail), "
                        "plain (a draw), or both")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=0, help="generated tokens per sample (0: the context length - 1)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--healthy-entropy", type=float, default=0.9, help="healthy: entropy >= this fraction of the held-out text's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (training, scoring and decoding)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of this process and of the unmask commands it starts "
                        "(0: torch's default; 1 wastes least on a CPU shared with other jobs)")
    parser.add_argument("--from-json", default="", help="only rewrite the Markdown and the plot from a few_steps.json of an earlier run")
    args = parser.parse_args()
    args.judge_steps = args.judge_steps or 2 * args.steps
    if not args.from_json and (not args.tails or set(args.tails.split(",")) - {"greedy", "plain"}):
        parser.error(f"--tails {args.tails}: give greedy, plain or greedy,plain")
    return args


def machine_info(args, runs: dict[str, dict]) -> dict:
    from unmask.training.optim import autocast_dtype

    device = torch.device(args.device)
    autocast = autocast_dtype("auto", device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "context": runs["MDM"]["config"]["model"]["context_len"],
            "train_precision": "bf16 autocast" if autocast is not None else "fp32"}


def main() -> None:
    args = parse_args()
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # read by the commands' processes
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.data:
        unmask.default_dataset()  # the embedded corpus, prepared once for every run
    runs = train_all(args)
    context = runs["MDM"]["config"]["model"]["context_len"]
    args.length = args.length or context - 1  # the masked models' canvas holds EOS + length tokens
    bound_rows = bounds(args, runs)
    unigram = unigram_level(args.data or unmask.default_dataset(), context, args.windows)
    rows, data = generation(args, runs)
    distilled = ratios(rows, runs)
    saved = {"machine": machine_info(args, runs), "settings": {k: v for k, v in vars(args).items() if k != "from_json"},
             "runs": runs, "bounds": bound_rows, "unigram_level": unigram, "generation": rows, "held_out": data, "ratios": distilled,
             "summary": goals(bound_rows, rows, data, distilled, args.healthy_entropy)}
    saved["machine"]["seconds"] = time.perf_counter() - start
    write(saved, Path(args.out))


if __name__ == "__main__":
    main()
