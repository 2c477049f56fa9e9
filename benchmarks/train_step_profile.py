"""One training step of the MDM next to one of the AR model, profiled through the real loop code.

Both trainers are built by the training loop itself (``unmask.train``: data, objective, model,
optimizer, random streams) and stepped with ``Trainer.step``, the code ``unmask train`` runs, on
the same preset, batch and precision. The steps of the two alternate in rounds (the order flips
each round) so that a shared, drifting machine slows both alike; the table gives the median step
time of each, their ratio, and the median time per step of each phase of the step:

A third trainer, ``mdm-host-noise``, is the MDM as it drew its noise before the masks were made on
the device: the (B, L) masks of the global batch drawn and sorted on the host (``corrupt_k_dce`` /
``corrupt_t_dce``) and sent to the device each step, so old and new are measured side by side.

* ``data``: the global batch's windows (``data.sample``);
* ``noise``: the objective's noise for it (``objective.draw_noise``; none for AR);
* ``forward+loss``: the objective's loss on the micro-batch (``objective.loss``), including the
  noise's expansion where an objective draws it there;
* ``clip``: the gradient norm and clipping; ``optimizer``: AdamW's update;
* ``backward+rest``: the rest of the step (the backward pass, moving rows to the device, the
  loss's host read-back).

Then ``torch.profiler`` records a few more steps of each and prints its top rows by self time
(CPU; CUDA time too on a GPU).

    python benchmarks/train_step_profile.py                                  # tiny and small, fp32, CPU
    python benchmarks/train_step_profile.py --presets 85m --device cuda --precision bf16 --compile --out $OUT/profile

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("data", "noise", "forward+loss", "clip", "optimizer")


VARIANTS = ("mdm", "mdm-host-noise", "ar")


def host_noise_path(objective) -> None:
    """Make an MDM objective draw its masks on the host, as the loop did before ``MaskDraw`` (same distribution)."""
    from unmask.losses import corrupt_k_dce, corrupt_t_dce, dce_loss

    cfg, mask_id = objective.train, objective.model.mask_id

    def draw_noise(batch, generator):
        x0 = batch.tokens[:, 1:]
        if cfg.loss == "k-dce":
            return corrupt_k_dce(x0, mask_id, generator, low_discrepancy=cfg.low_discrepancy)
        return corrupt_t_dce(x0, objective.schedule, mask_id, generator, low_discrepancy=cfg.low_discrepancy)

    objective.draw_noise = draw_noise
    objective.loss = lambda model, batch, noise: dce_loss(model, batch.tokens[:, 1:], noise)


def build_trainer(variant: str, preset: str, run_dir: Path, *, batch_size: int, precision: str, device: str, compile: bool = False,
                  context: int | None = None):
    """The loop's own Trainer for ``variant`` (mdm, mdm-host-noise or ar) on ``preset`` (what ``unmask.train.train``
    steps); ``context`` overrides the preset's context length."""
    from unmask.config import ModelConfig, RunConfig, TrainConfig
    from unmask.data import TokenDataset, default_dataset
    from unmask.distributed import init_world
    from unmask.objectives import objective_class, objective_for
    from unmask.train import _trainer
    from unmask.training.checks import check_run
    from unmask.training.data import open_data

    data_dir = Path(default_dataset()).resolve()
    objective = variant.split("-")[0]
    cfg = TrainConfig(objective=objective, steps=10**6, batch_size=batch_size, precision=precision, warmup_steps=5,
                      eval_every=10**9, checkpoint_every=10**9, compile=compile)
    vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
    model_cfg = ModelConfig.from_name(preset, vocab_size=vocab, causal=objective == "ar", **({"context_len": context} if context else {}))
    data = open_data(objective_class(cfg).data, data_dir, model_cfg.context_len)
    world, dev = init_world(device)
    obj = objective_for(cfg, model_cfg)
    check_run(obj, model_cfg, data, data_dir, dev)
    config = RunConfig(model=model_cfg, train=cfg, data_dir=str(data_dir), tokenizer_fingerprint=data.tokenizer.fingerprint,
                       data_fingerprint=data.fingerprint)
    trainer, _, _ = _trainer(world, dev, run_dir, config, obj, data, None)
    if variant == "mdm-host-noise":
        host_noise_path(obj)
    return trainer


class PhaseClock:
    """Wall time per phase of a step, by wrapping the pieces the step calls (on the instances only)."""

    def __init__(self, trainer, device: torch.device) -> None:
        self.seconds = {name: 0.0 for name in PHASES}
        self.cuda = device.type == "cuda"
        trainer.data.sample = self.wrap("data", trainer.data.sample)
        trainer.objective.draw_noise = self.wrap("noise", trainer.objective.draw_noise)
        trainer.objective.loss = self.wrap("forward+loss", trainer.objective.loss)
        trainer.optimizer.step = self.wrap("optimizer", trainer.optimizer.step)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            self.sync()
            start = time.perf_counter()
            with torch.profiler.record_function(f"phase: {name}"):
                out = fn(*a, **kw)
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            return out

        return timed

    @contextlib.contextmanager
    def clip(self):
        """Time ``torch.nn.utils.clip_grad_norm_`` (the step calls it through the module attribute)."""
        original = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = self.wrap("clip", original)
        try:
            yield
        finally:
            torch.nn.utils.clip_grad_norm_ = original


def timed_steps(trainer, clock: PhaseClock, first: int, count: int) -> list[dict]:
    """``count`` steps from step ``first``: total and per-phase milliseconds of each."""
    rows = []
    for step in range(first, first + count):
        before = dict(clock.seconds)
        clock.sync()
        start = time.perf_counter()
        with clock.clip():
            trainer.step(step)
        clock.sync()
        total = time.perf_counter() - start
        phases = {name: 1e3 * (clock.seconds[name] - before[name]) for name in PHASES}
        phases["backward+rest"] = 1e3 * total - sum(phases.values())
        rows.append({"step_ms": 1e3 * total, **phases})
    return rows


def profile_rows(trainer, first: int, count: int, device: torch.device, top: int) -> list[dict]:
    """The profiler's top ``top`` operators by self time over ``count`` steps (milliseconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(first, first + count):
            trainer.step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if not e.key.startswith("phase: ") and not e.key.startswith("ProfilerStep")]
    by_device = device.type == "cuda"
    key = (lambda e: e.self_device_time_total) if by_device else (lambda e: e.self_cpu_time_total)
    rows = []
    for e in sorted(events, key=key, reverse=True)[:top]:
        rows.append({"op": e.key, "calls_per_step": e.count / count, "self_cpu_ms": e.self_cpu_time_total / 1e3 / count,
                     "self_device_ms": (e.self_device_time_total / 1e3 / count) if by_device else None})
    return rows


def noise_ms(trainer, shape: str, device: torch.device, repeats: int = 7) -> dict:
    """Median milliseconds of the objective's noise for a global batch of ``shape`` (rows x length): its draw on the
    host and copy to the device, then (a ``MaskDraw``) the masks made on the device."""
    from unmask.objectives import Batch

    rows, length = map(int, shape.split("x"))
    batch = Batch(torch.randint(0, trainer.data.tokenizer.vocab_size, (rows, length + 1)))
    x0 = batch.tokens[:, 1:].to(device)
    generator = torch.Generator().manual_seed(0)
    host, dev = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        noise = trainer.objective.draw_noise(batch, generator).to(device)
        host.append(1e3 * (time.perf_counter() - start))
        if hasattr(noise, "corrupt"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            noise.corrupt(x0, trainer.objective.model.mask_id)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dev.append(1e3 * (time.perf_counter() - start))
    return {"shape": shape, "host_ms": statistics.median(host), "device_ms": statistics.median(dev) if dev else 0.0}


def measure_preset(preset: str, args, root: Path) -> dict:
    """Rounds of MDM, MDM with host noise and AR steps on ``preset`` (in turn, the order reversed every round), then each one's profile."""
    device = torch.device(args.device)
    trainers = {name: build_trainer(name, preset, root / f"{preset}-{name}", batch_size=args.batch_size, precision=args.precision,
                                    device=args.device, compile=args.compile) for name in VARIANTS}
    clocks = {name: PhaseClock(t, device) for name, t in trainers.items()}
    steps = {name: 0 for name in trainers}
    samples: dict[str, list[dict]] = {name: [] for name in trainers}
    for name, trainer in trainers.items():  # warm-up (allocator, oneDNN kernels; compilation)
        timed_steps(trainer, clocks[name], 0, args.warmup)
        steps[name] = args.warmup
    for r in range(args.rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            samples[name] += timed_steps(trainers[name], clocks[name], steps[name], args.steps)
            steps[name] += args.steps
    result = {"preset": preset, "context": trainers["mdm"].data.length, "batch": args.batch_size}
    for name in trainers:
        result[name] = {key: statistics.median(s[key] for s in samples[name]) for key in samples[name][0]}
        result[name]["steps_timed"] = len(samples[name])
        result[name]["profile"] = profile_rows(trainers[name], steps[name], args.profile_steps, device, args.top)
    result["noise_at_scale"] = {name: noise_ms(trainers[name], args.noise_shape, device) for name in VARIANTS[:2]}
    result["ratio_mdm_over_ar"] = result["mdm"]["step_ms"] / result["ar"]["step_ms"]
    result["ratio_host_noise_mdm_over_ar"] = result["mdm-host-noise"]["step_ms"] / result["ar"]["step_ms"]
    return result


def markdown(results: list[dict], machine: dict) -> str:
    lines = ["# One training step: MDM vs AR", "",
             f"Machine: {machine['machine']}; torch {machine['torch']}; threads {machine['threads']}; device {machine['device']}; "
             f"precision {machine['precision']} (compute dtype {machine['compute_dtype']}); compile {machine['compile']}.",
             "Median milliseconds per step over alternating rounds (the loop's own Trainer.step); `mdm-host-noise`: the MDM with its "
             "(B, L) masks drawn on the host and sent to the device, as the loop did before.", "",
             "| preset | batch x L | objective | step ms | " + " | ".join(PHASES) + " | backward+rest |",
             "|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for r in results:
        for name in VARIANTS:
            m = r[name]
            lines.append(f"| {r['preset']} | {r['batch']} x {r['context']} | {name} | {m['step_ms']:.2f} | "
                         + " | ".join(f"{m[p]:.2f}" for p in (*PHASES, "backward+rest")) + " |")
    lines.append("")
    for r in results:
        n = r["noise_at_scale"]
        lines.append(f"\n{r['preset']}: MDM / AR step time = {r['ratio_mdm_over_ar']:.3f} (MDM / AR tokens/s = {1 / r['ratio_mdm_over_ar']:.3f}); "
                     f"with the noise drawn on the host as before: {r['ratio_host_noise_mdm_over_ar']:.3f}. "
                     f"Noise of a {n['mdm']['shape']} global batch: host {n['mdm-host-noise']['host_ms']:.2f} ms before; "
                     f"host {n['mdm']['host_ms']:.3f} ms + masks on the device {n['mdm']['device_ms']:.2f} ms now.")
    for r in results:
        for name in VARIANTS:
            lines += ["", f"## {r['preset']} {name}: top operators by self time (ms per step)", "",
                      "| operator | calls/step | self CPU ms | self device ms |", "|---|---|---|---|"]
            for row in r[name]["profile"]:
                dev = "-" if row["self_device_ms"] is None else f"{row['self_device_ms']:.3f}"
                lines.append(f"| `{row['op']}` | {row['calls_per_step']:g} | {row['self_cpu_ms']:.3f} | {dev} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block, as --compile of unmask train")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps of each objective first.")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps of each objective per round.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="Profiler rows shown per objective.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine).")
    parser.add_argument("--noise-shape", default="64x1024", help="Rows x length of the extra noise-draw timing (the GPU table's 85m batch).")
    parser.add_argument("--out", default="benchmarks/results/train_step_profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from train_scale import cpu_isa

    from unmask.training.optim import autocast_dtype

    amp = autocast_dtype(args.precision, torch.device(args.device))
    machine = {"machine": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_isa()["model"],
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device, "precision": args.precision,
               "compute_dtype": str(amp or torch.float32).replace("torch.", ""), "compile": args.compile}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            results.append(measure_preset(preset, args, Path(tmp)))
            r = results[-1]
            print(f"{preset}: " + ", ".join(f"{name} {r[name]['step_ms']:.2f} ms" for name in VARIANTS), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2) + "\n")
    text = markdown(results, machine)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
