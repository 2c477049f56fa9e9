"""Structured output: what a constraint costs and buys, for an MDM and an AR model of the same size,
measured side by side in one run.

The task suite (benchmarks/structured_tasks.py): dates, e-mail addresses, phone numbers, integers
1-100 (regexes), one of four labels (choice), five JSON Schemas (nested objects, arrays, enums,
integer ranges as enums, strings with patterns and length bounds) and any JSON object. For every task, --samples
outputs of each decoding configuration, unconstrained and constrained:

* validity: ``re.fullmatch`` of the pattern, the choice, or ``json.loads`` + ``jsonschema``, on the
  text up to the first EOS;
* log-likelihood per token of the outputs (up to and with their first EOS) given the prompt under
  the AR checkpoint (``unmask.likelihood.response_nll``), pooled over the tasks;
* generated tokens/s (the whole region, median of --repeats) and, per network call, the wall time
  inside ``model.forward`` and inside the automaton: ``CanvasConstraint.restrict`` + ``settle``
  (MDM), ``restrict_next`` + ``advance`` (AR), each timed by wrapping it.

Configurations: ancestral (steps = length), confidence (2 tokens a call), threshold (tau 0.9 at its
default temperature 0: the exact constrained argmax) and first-hitting (k = 1), each with cache none
and dual, over the whole canvas and in semi-autoregressive blocks of --block; the AR model with its
KV cache. Then, on randomly initialised networks of --timing-preset (speed only), the automaton
against one network call at --timing-length positions with the largest schema, and the AR model's
masking against its step. Last, infilling under a constraint: a JSON template with fixed keys and
values and masked values, filled by the MDM (it reads both sides of every gap), next to what the
AR model can do from the text before the first gap.

Writes structured.json, structured.md and structured.png to --out.

    python benchmarks/structured.py                                # trains a tiny MDM/AR pair in --runs (or reuses runs/demo)
    python benchmarks/structured.py --mdm runs/demo/mdm --ar runs/demo/ar
    python benchmarks/structured.py --from-json benchmarks/results/structured/structured.json   # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_tasks import INFILL_SCHEMA, INFILL_TEMPLATE, LARGEST_SCHEMA, SCHEMAS, Task, tasks  # noqa: E402

from unmask.checkpoint import checkpoint_tokenizer, load_model  # noqa: E402
from unmask.constraints import Constraint  # noqa: E402
from unmask.constraints.decode import CanvasConstraint, automata_for, constrain  # noqa: E402
from unmask.likelihood import response_nll  # noqa: E402
from unmask.sampling import ARConfig, SamplerSpec, ar_sample, infill_canvas, make_canvas  # noqa: E402
from unmask.sampling.canvas import infill_ids, trim_at_eos  # noqa: E402

SAMPLERS = ("ancestral", "confidence", "threshold", "first-hitting")
CACHES = ("none", "dual")
AR = "ar kv-cache"
MDM_AUTOMATON = ("restrict", "settle")  # the CanvasConstraint methods every MDM sampler goes through
AR_AUTOMATON = ("restrict_next", "advance")  # and those of AR decoding


# ---------------------------------------------------------------- timing by wrapping


class PhaseTimer:
    """Wall seconds inside wrapped callables, by phase (CUDA: synchronised at both ends of a call)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[phase] += time.perf_counter() - start

        return timed


@contextmanager
def timed(model, timer: PhaseTimer):
    """``model.forward`` timed as "network", the automaton's methods of CanvasConstraint as "automaton"."""
    originals = {name: getattr(CanvasConstraint, name) for name in MDM_AUTOMATON + AR_AUTOMATON}
    for name, fn in originals.items():
        setattr(CanvasConstraint, name, timer.wrap("automaton", fn))
    model.forward = timer.wrap("network", model.forward)  # the instance attribute shadows the class's method
    try:
        yield timer
    finally:
        for name, fn in originals.items():
            setattr(CanvasConstraint, name, fn)
        del model.forward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(once, model, device: torch.device, repeats: int) -> dict:
    """Medians over ``repeats`` seeded runs of ``once(seed) -> (tokens, nfe)``; the tokens of all runs."""
    walls, network, automaton, samples, nfe = [], [], [], [], 0
    for r in range(repeats):
        with timed(model, PhaseTimer(device)) as timer:
            sync(device)
            start = time.perf_counter()
            tokens, nfe = once(r + 1)
            sync(device)
            walls.append(time.perf_counter() - start)
        network.append(timer.seconds["network"])
        automaton.append(timer.seconds["automaton"])
        samples.append(tokens.cpu())
    return {"wall_s": statistics.median(walls), "network_s": statistics.median(network),
            "automaton_s": statistics.median(automaton), "nfe": nfe, "tokens": torch.cat(samples)}


# ---------------------------------------------------------------- decoding


def mdm_configs(length: int, block: int) -> list[tuple[str, SamplerSpec]]:
    """(label, spec) of every sampler x cache, over the whole canvas and in blocks of ``block``."""
    options = {"ancestral": {"steps": length}, "confidence": {"steps": length // 2}, "threshold": {"tau": 0.9},
               "first-hitting": {"k": 1}}
    out = []
    for sampler in SAMPLERS:
        for cache in CACHES:
            for blocks in (0, block):
                label = f"{sampler} {cache}" + (f" b{block}" if blocks else "")
                out.append((label, SamplerSpec.from_options(sampler, block_len=blocks or None, cache=cache, **options[sampler])))
    return out


def config_labels(block: int) -> list[str]:
    return [label for label, _ in mdm_configs(8 * block, block)] + [AR]


def task_runs(task: Task, tok, mdm, ar, batch: int, block: int, device: torch.device):
    """(config label, constrained, model, once) for every configuration of one task."""
    prompt = tok.encode(task.prompt)
    x, cond, start = make_canvas([prompt] * batch, task.length, tok.mask_id, tok.pad_id, tok.eos_id, device=device)
    automata = automata_for(task.constraint, tok, batch)
    conds = {False: cond, True: constrain(cond, x, start, automata)}
    head = x[:, :start]
    ar_conds = {False: None, True: constrain(None, head, start, automata, new_tokens=task.length)}
    runs = []
    for constrained in (False, True):
        for label, spec in mdm_configs(task.length, block):
            def mdm_once(seed, spec=spec, c=conds[constrained]):
                out = spec.run(mdm, x, torch.Generator(device=device).manual_seed(seed), c, start=start)
                return out.tokens[:, start:], out.nfe

            runs.append((label, constrained, mdm, mdm_once))

        def ar_once(seed, c=ar_conds[constrained]):
            out = ar_sample(ar, head, torch.Generator(device=device).manual_seed(seed), ARConfig(max_new_tokens=task.length), c)
            return out.tokens[:, start:], out.nfe

        runs.append((AR, constrained, ar, ar_once))
    return runs


def judged(judge, tok, prompt: str, tokens: torch.Tensor) -> tuple[float, int]:
    """(total nats, tokens scored) of outputs (N, n) up to and with their first EOS, given [EOS ; prompt],
    under the AR ``judge`` (unmask.likelihood.response_nll: exact)."""
    head, eos = [tok.eos_id] + tok.encode(prompt), tok.eos_id
    rows, scored = [], []
    for row in tokens.tolist():
        out = row[: row.index(eos) + 1] if eos in row else row
        pad = len(row) - len(out)
        rows.append(head + out + [eos] * pad)
        scored.append([False] * len(head) + [True] * len(out) + [False] * pad)
    res = response_nll(judge, torch.tensor(rows), torch.tensor(scored))
    return res.nats_per_token * res.num_tokens, res.num_tokens


def texts_of(tok, tokens: torch.Tensor) -> list[str]:
    """Each output's text up to its first EOS."""
    return [tok.decode(trim_at_eos(row, tok.eos_id)) for row in tokens.tolist()]


def suite(args, mdm, ar, judge, tok, device) -> list[dict]:
    """One row per (task, configuration, constrained or not)."""
    chosen = [t for t in tasks() if not args.tasks or t.name in args.tasks.split(",")]
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    plans = [(task, run) for task in chosen for run in task_runs(task, tok, mdm, ar, args.samples, args.block, device)
             if not wanted or run[0] in wanted]
    rows = []
    for task, (label, constrained, model, once) in tqdm(plans, desc="structured", unit="run"):
        m = measure(once, model, device, args.repeats)
        texts = texts_of(tok, m["tokens"])
        nats, scored = judged(judge, tok, task.prompt, m["tokens"])
        rows.append({
            "task": task.name, "config": label, "constrained": constrained, "length": task.length, "samples": len(texts),
            "valid": sum(map(task.valid, texts)), "nats": nats, "scored_tokens": scored, "nfe": m["nfe"], "wall_s": m["wall_s"],
            "network_s": m["network_s"], "automaton_s": m["automaton_s"], "generated_tokens": args.samples * task.length,
            "example": texts[0],
        })
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (configuration, constrained): validity over every output, log-likelihood per token pooled
    over the tasks, tokens/s = generated tokens / wall over the tasks, times per network call."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["config"], r["constrained"])].append(r)
    out = []
    for (config, constrained), rs in groups.items():
        total = lambda key: sum(r[key] for r in rs)  # noqa: E731
        nfe = total("nfe")
        out.append({
            "config": config, "constrained": constrained, "tasks": len(rs), "samples": total("samples"),
            "validity": total("valid") / total("samples"), "loglik": -total("nats") / total("scored_tokens"),
            "tokens_per_s": total("generated_tokens") / total("wall_s"), "nfe": nfe,
            "network_ms": 1000 * total("network_s") / nfe, "automaton_ms": 1000 * total("automaton_s") / nfe,
            "step_ms": 1000 * total("wall_s") / nfe,
        })
    return out


# ---------------------------------------------------------------- the automaton vs one network call


def random_network(preset: str, vocab: int, causal: bool, device: torch.device, dtype: torch.dtype):
    """A randomly initialised network of ``preset`` (speed only)."""
    from unmask.config import ModelConfig
    from unmask.model import Transformer

    return Transformer(ModelConfig.from_name(preset, vocab_size=vocab, causal=causal)).to(device, dtype).eval()


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall milliseconds of ``fn()`` over ``repeats`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def automaton_vs_network(args, tok, device, dtype) -> dict:
    """One network call of a random --timing-preset MDM over [EOS ; MASK x (n - 1)] vs the automaton's
    restrict of every position and settle of two of them (the largest schema); a whole confidence
    decode (8 tokens a call) split the same way; the AR model's masking against its KV-cache step."""
    from unmask.sampling.base import Conditioning

    mdm = random_network(args.timing_preset, tok.vocab_size, False, device, dtype)
    ar = random_network(args.timing_preset, tok.vocab_size, True, device, dtype)
    length = args.timing_length - 1
    constraint = Constraint.json_schema(SCHEMAS[LARGEST_SCHEMA])
    automata = automata_for(constraint, tok, 1)
    x, cond, start = make_canvas([[]], length, tok.mask_id, tok.pad_id, tok.eos_id, device=device)
    cond = constrain(cond, x, start, automata)
    want = x == tok.mask_id
    logits = mdm(x).float()[want]
    restricted = cond.constraint.restrict(x, want, logits)
    after = x.clone()
    after[0, start : start + 2] = restricted[:2].argmax(dim=-1)  # a step that commits the first two positions
    gen = torch.Generator(device=device).manual_seed(0)
    spec = SamplerSpec.from_options("confidence", steps=-(-length // 8))  # 8 tokens a call
    result = {
        "preset": args.timing_preset, "positions": args.timing_length, "schema": LARGEST_SCHEMA,
        "automaton_states": automata[0].n_states, "automaton_class_edges": automata[0].n_class_edges,
        "network_ms": median_ms(lambda: mdm(x), args.timing_repeats, device),
        "restrict_ms": median_ms(lambda: cond.constraint.restrict(x, want, logits), args.timing_repeats, device),
        "settle_ms": median_ms(lambda: cond.constraint.settle(x, after, want, restricted, gen, spec.sampler_config(), tok.mask_id),
                               args.timing_repeats, device),
    }
    m = measure(lambda seed: decode_whole(spec, mdm, x, cond, start, seed, device), mdm, device, 1)
    result |= {"decode_nfe": m["nfe"], "decode_network_ms": 1000 * m["network_s"] / m["nfe"],
               "decode_automaton_ms": 1000 * m["automaton_s"] / m["nfe"], "decode_step_ms": 1000 * m["wall_s"] / m["nfe"]}
    head = torch.full((1, 1), tok.eos_id, dtype=torch.long, device=device)
    for constrained in (False, True):
        ar_cond = constrain(Conditioning(), head, 1, automata, new_tokens=length) if constrained else None
        m = measure(lambda seed, c=ar_cond: ar_decode(ar, head, c, length, seed, device), ar, device, args.timing_repeats)
        key = "ar_constrained" if constrained else "ar_free"
        result |= {f"{key}_step_ms": 1000 * m["wall_s"] / m["nfe"], f"{key}_automaton_ms": 1000 * m["automaton_s"] / m["nfe"],
                   f"{key}_network_ms": 1000 * m["network_s"] / m["nfe"]}
    return result


def decode_whole(spec, model, x, cond, start, seed, device):
    out = spec.run(model, x, torch.Generator(device=device).manual_seed(seed), cond, start=start)
    return out.tokens[:, start:], out.nfe


def ar_decode(model, head, cond, length, seed, device):
    out = ar_sample(model, head, torch.Generator(device=device).manual_seed(seed), ARConfig(max_new_tokens=length), cond)
    return out.tokens[:, head.shape[1] :], out.nfe


# ---------------------------------------------------------------- infilling under a constraint


def template_regex(template: str, longest: int) -> str:
    """The template as a regex (Rust and Python alike): its fixed text literal, each gap a JSON
    string's content of at most ``longest`` characters."""
    import re

    from outlines_core.json_schema import STRING_INNER

    from unmask.constraints.spec import escape

    parts = re.split(r"\[MASK(?::\d+)?\]", template)
    return f"{STRING_INNER}{{0,{longest}}}".join(escape(p) for p in parts)


def infilling(args, mdm, ar, judge, tok, device) -> list[dict]:
    """The template filled by the MDM (free and under the schema: it reads both sides of each gap) and
    continued by the AR model from the text before its first gap (free), generated whole by the AR
    model under the schema (keys forced, values free) and under the template written as a regex."""
    import re

    task = Task("infill", "", Constraint.json_schema(SCHEMAS[INFILL_SCHEMA]), 0, schema=SCHEMAS[INFILL_SCHEMA])
    kept = "(?s:.*)".join(re.escape(p) for p in re.split(r"\[MASK(?::\d+)?\]", INFILL_TEMPLATE))  # the fixed text in place
    ids = infill_ids(INFILL_TEMPLATE, tok)
    x, cond, start = infill_canvas(ids, tok, args.samples, device=device)
    schema = automata_for(task.constraint, tok, args.samples)
    template = automata_for(Constraint.regex(template_regex(INFILL_TEMPLATE, 12)), tok, args.samples)  # the schema's maxLength 12
    prefix = tok.encode(INFILL_TEMPLATE.split("[MASK")[0])
    head = torch.tensor([[tok.eos_id] + prefix] * args.samples, device=device)
    bare = x[:, :start]  # [EOS]
    spec = SamplerSpec.from_options("confidence", steps=(ids.count(tok.mask_id) + 1) // 2)

    def ar_whole(automata):
        return lambda s: ar_decode(ar, bare, constrain(None, bare, start, automata, len(ids)), len(ids), s, device)

    def after_prefix(s):
        tokens, nfe = ar_decode(ar, head, None, len(ids) - len(prefix), s, device)
        return torch.cat([head[:, 1:], tokens], dim=1), nfe

    runs = [  # (setting, model, once, whether the text ends at its first EOS: not inside a template, whose fixed text follows)
        ("MDM infill, free", mdm, lambda s: decode_whole(spec, mdm, x, cond, start, s, device), False),
        ("MDM infill, schema", mdm, lambda s: decode_whole(spec, mdm, x, constrain(cond, x, start, schema, None, "infill"), start, s, device),
         False),
        ("AR after the prefix, free", ar, after_prefix, True),
        ("AR, schema", ar, ar_whole(schema), True),
        ("AR, template as a regex", ar, ar_whole(template), True),
    ]
    out = []
    for label, model, once, ends in runs:
        m = measure(once, model, device, 1)
        texts = texts_of(tok, m["tokens"]) if ends else [tok.decode(row) for row in m["tokens"].tolist()]
        nats, scored = judged(judge, tok, "", m["tokens"])
        out.append({"setting": label, "samples": len(texts), "validity": sum(map(task.valid, texts)) / len(texts),
                    "template_kept": sum(re.fullmatch(kept, t) is not None for t in texts) / len(texts), "loglik": -nats / scored,
                    "nfe": m["nfe"], "examples": texts[:2]})
    return out


# ---------------------------------------------------------------- checkpoints


def finished(run: Path) -> bool:
    return (run / "checkpoints" / "LATEST").exists()


def train_pair(args) -> tuple[Path, Path]:
    """An MDM and an AR model of --preset at --context, --train-steps x --train-batch sequences, the same
    recipe and seed, in --runs; finished runs are reused."""
    from unmask.config import ModelConfig, TrainConfig
    from unmask.data import TokenDataset, default_dataset
    from unmask.train import train

    data = default_dataset()
    vocab = TokenDataset(data, "train").tokenizer.vocab_size
    runs = []
    for objective in ("mdm", "ar"):
        run = Path(args.runs) / objective
        if not finished(run):
            print(f"training {objective} ({args.preset}, {args.train_steps} steps of {args.train_batch}) -> {run}", flush=True)
            model = ModelConfig.from_name(args.preset, vocab_size=vocab, causal=objective == "ar", context_len=args.context)
            cfg = TrainConfig(objective=objective, steps=args.train_steps, batch_size=args.train_batch, seed=args.seed,
                              eval_every=args.train_steps, eval_windows=4, eval_draws=2, checkpoint_every=args.train_steps,
                              keep_checkpoints=1, log_every=max(args.train_steps // 5, 1))
            start = time.perf_counter()
            train(run, model, cfg, data, device=args.device, progress=False)
            (run / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        runs.append(run)
    return runs[0], runs[1]


def checkpoints(args) -> tuple[Path, Path]:
    """--mdm and --ar when given; else `make demo`'s runs/demo/{mdm,ar} when finished; else a pair trained in --runs."""
    if args.mdm or args.ar:
        if not (args.mdm and args.ar):
            sys.exit("give both --mdm and --ar (or neither)")
        return Path(args.mdm), Path(args.ar)
    demo = Path("runs/demo")
    if finished(demo / "mdm") and finished(demo / "ar"):
        return demo / "mdm", demo / "ar"
    return train_pair(args)


# ---------------------------------------------------------------- main and report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", default="", help="MDM run (with --ar); default: runs/demo/mdm when finished, else trained here")
    parser.add_argument("--ar", default="", help="AR run of the same size (it also judges the outputs)")
    parser.add_argument("--runs", default="runs/bench-structured", help="where the pair is trained when none is given")
    parser.add_argument("--preset", default="tiny", help="preset of the trained pair")
    parser.add_argument("--context", type=int, default=64, help="context of the trained pair (every task's canvas fits 64)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="outputs per task and configuration (one batch)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median; every run's outputs scored)")
    parser.add_argument("--block", type=int, default=8, help="semi-AR block length (divides every task's length)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--configs", default="", help="comma-separated configuration labels (default: all)")
    parser.add_argument("--timing-preset", default="small", help="random networks for the automaton vs network timing")
    parser.add_argument("--timing-length", type=int, default=256, help="canvas positions of that timing (EOS included)")
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32: the decoding networks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/structured")
    parser.add_argument("--from-json", default="", help="only rewrite the Markdown and the plot from a structured.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved, Path(args.out))
        return
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    mdm_dir, ar_dir = checkpoints(args)  # trained here with gradients when none is given
    torch.set_grad_enabled(False)
    mdm, mdm_cfg = load_model(mdm_dir, device)
    ar, ar_cfg = load_model(ar_dir, device)
    judge = load_model(ar_dir, device)[0].float()  # scores in fp32 whatever the decoding ran in
    mdm, ar = mdm.to(dtype), ar.to(dtype)
    tok = checkpoint_tokenizer(mdm_dir)
    machine = machine_info(device, dtype) | {
        "mdm": str(mdm_dir), "ar": str(ar_dir), "mdm_params": mdm.num_params(), "ar_params": ar.num_params(),
        "mdm_train_steps": mdm_cfg.train.steps, "ar_train_steps": ar_cfg.train.steps,
    }
    print(json.dumps(machine), flush=True)
    for task in tasks():  # compiled once here, so no run's time holds a compilation
        automata_for(task.constraint, tok, 1)
    start = time.perf_counter()
    rows = suite(args, mdm, ar, judge, tok, device)
    infill = infilling(args, mdm, ar, judge, tok, device)
    timing = automaton_vs_network(args, tok, device, dtype)
    machine["seconds"] = time.perf_counter() - start
    settings = {k: v for k, v in vars(args).items() if k != "from_json"}
    report({"machine": machine, "settings": settings, "rows": rows, "summary": aggregate(rows), "infill": infill, "timing": timing},
           Path(args.out))


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    from importlib.metadata import version

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "outlines_core": version("outlines-core")}


def percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def main_table(summary: list[dict], labels: list[str]) -> list[str]:
    by = {(s["config"], s["constrained"]): s for s in summary}
    table = ["| configuration | valid: free | valid: constrained | AR log-lik/token: free | constrained | tokens/s: free | constrained | "
             "network ms/call | automaton ms/call | automaton / network |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        free, con = by.get((label, False)), by.get((label, True))
        if free is None or con is None:
            continue
        table.append(f"| {label} | {percent(free['validity'])} | {percent(con['validity'])} | {free['loglik']:.2f} | {con['loglik']:.2f} | "
                     f"{free['tokens_per_s']:.0f} | {con['tokens_per_s']:.0f} | {con['network_ms']:.2f} | {con['automaton_ms']:.2f} | "
                     f"{con['automaton_ms'] / con['network_ms']:.2f}x |")
    return table


def task_table(rows: list[dict]) -> list[str]:
    table = ["| task | tokens | MDM valid: free | MDM valid: constrained | AR valid: free | AR valid: constrained |", "|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        cell = {}
        for ar_side in (False, True):
            for constrained in (False, True):
                rs = [r for r in rows if r["task"] == task and (r["config"] == AR) == ar_side and r["constrained"] == constrained]
                cell[ar_side, constrained] = percent(sum(r["valid"] for r in rs) / max(sum(r["samples"] for r in rs), 1)) if rs else ""
        length = next(r["length"] for r in rows if r["task"] == task)
        table.append(f"| {task} | {length} | {cell[False, False]} | {cell[False, True]} | {cell[True, False]} | {cell[True, True]} |")
    return table


def timing_table(t: dict) -> list[str]:
    return [
        "| measured | ms |", "|---|---|",
        f"| one network call ({t['positions']} positions) | {t['network_ms']:.2f} |",
        f"| restrict (every position masked and predicted) | {t['restrict_ms']:.2f} |",
        f"| settle (a step that commits 2 positions, temperature 1) | {t['settle_ms']:.2f} |",
        f"| confidence decode, 8 tokens a call ({t['decode_nfe']} calls): network per call | {t['decode_network_ms']:.2f} |",
        f"| the same decode: automaton per call | {t['decode_automaton_ms']:.2f} |",
        f"| AR step with KV cache, free | {t['ar_free_step_ms']:.2f} |",
        f"| AR step, constrained: whole step / of it masking | {t['ar_constrained_step_ms']:.2f} / {t['ar_constrained_automaton_ms']:.2f} |",
    ]


def infill_table(infill: list[dict]) -> list[str]:
    table = ["| setting | valid (schema) | template kept | AR log-lik/token | NFE |", "|---|---|---|---|---|"]
    table += [f"| {r['setting']} | {percent(r['validity'])} | {percent(r['template_kept'])} | {r['loglik']:.2f} | {r['nfe']} |" for r in infill]
    return table


def findings(saved: dict) -> list[str]:
    summary, rows, t = saved["summary"], saved["rows"], saved["timing"]
    mdm = [s for s in summary if s["config"] != AR]
    ar = {s["constrained"]: s for s in summary if s["config"] == AR}
    lines = []
    for constrained in (False, True):
        side = [s for s in mdm if s["constrained"] == constrained]
        if side:
            lines.append(f"{'constrained' if constrained else 'unconstrained'}: MDM validity {percent(min(s['validity'] for s in side))} to "
                         f"{percent(max(s['validity'] for s in side))} over the configurations, AR {percent(ar[constrained]['validity'])}"
                         if constrained in ar else "")
    constrained = [r for r in rows if r["constrained"]]
    failed = sum(r["samples"] - r["valid"] for r in constrained)
    if failed:
        broken = sorted({r["task"] for r in constrained if r["valid"] < r["samples"]})
        lines.append(f"{failed} constrained outputs fail their check ({', '.join(broken)})")
    else:
        lines.append(f"every one of the {sum(r['samples'] for r in constrained)} constrained outputs passes its check")
    if mdm:
        worst = max((s for s in mdm if s["constrained"]), key=lambda s: s["automaton_ms"] / s["network_ms"])
        lines.append(f"largest automaton share: {worst['config']}, {worst['automaton_ms']:.2f} ms per call vs {worst['network_ms']:.2f} ms "
                     "in the network")
    if True in ar:
        lines.append(f"AR masking: {100 * ar[True]['automaton_ms'] / ar[True]['step_ms']:.0f}% of a constrained AR step (trained pair); "
                     f"{100 * t['ar_constrained_automaton_ms'] / t['ar_constrained_step_ms']:.0f}% on the random {t['preset']} AR model")
    lines.append(f"{t['preset']} preset, {t['positions']} positions, schema {t['schema']} ({t['automaton_states']} states): restrict "
                 f"{t['restrict_ms']:.1f} ms + settle {t['settle_ms']:.1f} ms vs {t['network_ms']:.1f} ms for one network call")
    return [line for line in lines if line]


def shown(text: str, width: int = 150) -> str:
    """``text`` on one line (newlines as \\n), cut at ``width`` characters."""
    one = text.replace("\n", "\\n")
    return one if len(one) <= width else one[: width - 3] + "..."


def examples(rows: list[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in rows:
        if r["constrained"] and r["config"] != AR:
            out.setdefault(r["task"], r["example"])
    return out


def report(saved: dict, out_dir: Path) -> None:
    machine, settings = saved["machine"], saved["settings"]
    labels = config_labels(settings["block"])
    head = (f"{machine['device']}, {machine['dtype']}, {machine['threads']} threads (load average {machine['load_average']:.1f} at the "
            f"start), torch {machine['torch']}, outlines-core {machine['outlines_core']}; MDM {machine['mdm']} ({machine['mdm_train_steps']} steps, {machine['mdm_params'] / 1e6:.2f}M params), "
            f"AR {machine['ar']} ({machine['ar_train_steps']} steps) as decoder and judge; {settings['samples']} outputs per task and "
            f"configuration, median of {settings['repeats']} timed runs; blocks of {settings['block']}; {machine['seconds']:.0f} s in all.")
    t = saved["timing"]
    parts = [
        "# Structured output: validity, likelihood and cost of a constraint", head,
        "## Unconstrained vs constrained decoding, all tasks pooled",
        "Threshold decodes at its default temperature 0 (the exact constrained argmax); the others at temperature 1. "
        "Log-likelihood: nats per output token (up to and with the first EOS) under the AR checkpoint, given the prompt. "
        "Times per network call are those of the constrained runs.",
        "\n".join(main_table(saved["summary"], labels)),
        "## Validity per task (MDM: every configuration pooled)", "\n".join(task_table(saved["rows"])),
        f"## The automaton vs one network call ({t['preset']} preset, random weights, schema `{t['schema']}`)",
        f"{t['automaton_states']} states, {t['automaton_class_edges']} class edges; medians of {settings['timing_repeats']} calls.",
        "\n".join(timing_table(t)),
        "## Infilling under a constraint", f"Template (schema `{INFILL_SCHEMA}`): `{INFILL_TEMPLATE}`",
        "\n".join(infill_table(saved["infill"])),
        "```text\n" + "\n".join(f"{r['setting']}: {shown(e)}" for r in saved["infill"] for e in r["examples"]) + "\n```",
        "## Examples (the first constrained output of the first MDM configuration, per task)",
        "```text\n" + "\n".join(f"{task}: {shown(example)}" for task, example in examples(saved["rows"]).items()) + "\n```",
        "## Findings", "\n".join(f"- {line}" for line in findings(saved)),
        "![validity and time per network call](structured.png)",
    ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "structured.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out_dir / "structured.md").write_text(text)
    plot(saved, labels, out_dir / "structured.png")


def plot(saved: dict, labels: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    by = {(s["config"], s["constrained"]): s for s in saved["summary"]}
    labels = [label for label in labels if (label, True) in by and (label, False) in by]
    y = range(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(labels) + 1.8), sharey=True)
    for shift, constrained, colour in ((0.2, False, "tab:gray"), (-0.2, True, "tab:blue")):
        speed = [by[label, constrained]["tokens_per_s"] for label in labels]
        left.barh([i + shift for i in y], speed, 0.4, color=colour, label=f"{'constrained' if constrained else 'free'} (valid %)")
        for i, (v, label) in enumerate(zip(speed, labels)):
            left.annotate(f"{100 * by[label, constrained]['validity']:.0f}%", (v, i + shift), fontsize=6, va="center")
    left.set(yticks=list(y), yticklabels=labels, xlabel="generated tokens/s")
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    network = [by[label, True]["network_ms"] for label in labels]
    automaton = [by[label, True]["automaton_ms"] for label in labels]
    right.barh(list(y), network, color="tab:orange", label="network")
    right.barh(list(y), automaton, left=network, color="tab:purple", label="automaton (restrict + settle / masking)")
    right.set(xlabel="ms per network call, constrained")
    right.legend(loc="lower right", fontsize=8)
    m = saved["machine"]
    fig.suptitle(f"structured output: speed and validity, time per call ({m['device']}, {m['dtype']}, {m['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
