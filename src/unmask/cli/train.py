"""``unmask train`` and ``unmask presets``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.app import app, command_group
from unmask.config import PRESETS, DuoConfig, ModelConfig, RunConfig, TrainConfig
from unmask.errors import UnmaskError
from unmask.objectives import OBJECTIVES, objective_class, trained_from_text

_T = TrainConfig()
_DUO = DuoConfig()


# The longer help texts of `unmask train`
HELP = {
    "steps": f"Optimizer steps (default {_T.steps}). On --resume a new length: the LR continues from its current value along a cosine "
             "to its floor at the new end (a warmup not yet over goes on first; the notice says which).",
    "parallel": "Data parallelism under torchrun: ddp (replicated weights) or fsdp (FSDP2: weights, gradients and optimizer sharded; "
                "sharded checkpoints) (default ddp).",
    "global_batch_tokens": "Tokens per optimizer step whatever the number of processes (a multiple of context length x processes x "
                           "--batch-size); --grad-accum is then derived. A run with it may resume on another number of processes.",
    "ema": "Keep an fp32 moving average of the weights with this decay (e.g. 0.9999); sample/eval then use it by default.",
    "init_from": "Start from these weights: a run folder or a LLaMA/Qwen2/Mistral/LLaDA/Dream folder (the network is the source's; with "
                 "--objective mdm an AR source becomes bidirectional; with --objective bd3 the network becomes block-causal with "
                 "--block-size, e.g. an MDM fine-tuned into a block model). Data must use the source's tokenizer.",
    "keep_shift": "With --init-from: logits of position i from position i - 1, as in the AR model (Dream) (default: the source's own).",
    "anneal_attention": "MDM: anneal the attention mask from causal to bidirectional over N steps (DiffuLLaMA) (default 0: off).",
    "curriculum_steps": f"duo: optimizer steps of the curriculum, where the network sees relaxed one-hot inputs of Gaussian latents; "
                        f"then plain udlm (default {_DUO.curriculum_steps}).",
    "resume": "Continue RUN exactly as it was configured, from its latest checkpoint. Only --steps, --eval-every, --checkpoint-every, "
              "--log-every, --compile, --activation-checkpointing and --device may change (and --batch-size with "
              "--global-batch-tokens); other flags must be left out or equal the run's.",
    "resume_from": "Resume from the run's checkpoint of this step instead of its latest (one of checkpoints/step_*, e.g. when the latest "
                   "is damaged); implies --resume.",
}


@app.command()
def presets() -> None:
    """List the model presets with their parameter counts (at the default 4096-token vocabulary)."""
    typer.echo(f"{'preset':8} {'layers':>6} {'heads':>5} {'width':>6} {'context':>7} {'non-emb params':>15} {'total params':>13}")
    for name, cfg in PRESETS.items():
        typer.echo(
            f"{name:8} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>6} {cfg.context_len:>7} "
            f"{cfg.non_embedding_params() / 1e6:>14.2f}M {cfg.total_params() / 1e6:>12.2f}M"
        )


def log_to_option():
    """The ``--log-to`` option of the commands that train (train, finetune, the experiments)."""
    return typer.Option(None, "--log-to", metavar="TRACKER[,TRACKER]", help="Also send the metrics to tensorboard (RUN/tensorboard/) or wandb (RUN/wandb/, offline "
                        "unless WANDB_MODE is set); repeat the flag or separate names with commas. Needs pip install 'unmask[track]'.")


def _data_dir(data: Optional[Path]) -> Path:
    from unmask.data import default_dataset

    return Path(data) if data is not None else default_dataset()


def _saved_run(run_dir: Path) -> RunConfig:
    """The RunConfig a run folder was last started or resumed with (config.json, else its checkpoint)."""
    from unmask.checkpoint import load_weights

    path = run_dir / "config.json"
    if not path.is_file():
        return load_weights(run_dir)[1]
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise UnmaskError(f"{path} is not valid JSON ({exc}); the run folder is damaged") from None


def _saved_data_dir(saved: RunConfig, run_dir: Path) -> Path:
    """The run's data folder; the embedded corpus is rebuilt where it was if its cache was removed."""
    from unmask.data import default_dataset, default_tokenizer

    path = Path(saved.data_dir)
    if (path / "meta.json").is_file() or (path / "labels.json").is_file():  # a prepared folder, or a classifier's RUN/labels
        return path
    if path.name == f"shakespeare-{saved.tokenizer_fingerprint}" == f"shakespeare-{default_tokenizer().fingerprint}":
        return default_dataset(path.parent)
    raise UnmaskError(
        f"the data folder {path} that {run_dir} was trained on is missing; prepare the same data again and pass it with --data"
    )


@app.command()
def train(
    run_dir: Path = typer.Option(..., help="Folder for config, metrics.jsonl and checkpoints."),
    preset: Optional[str] = typer.Option(None, help=f"Model size: {', '.join(PRESETS)} (default tiny)."),
    objective: Optional[str] = typer.Option(None, help=f"mdm (masked diffusion), ar (autoregressive baseline), bd3 (block diffusion), udlm (uniform-state diffusion), duo (UDLM after a Gaussian curriculum) or classifier (of noisy canvases, for D-CBG guidance; --data a JSONL file of labelled texts) (default {_T.objective})."),
    block_size: Optional[int] = typer.Option(None, min=1, help="bd3: tokens per block L' (1: the AR NLL; the context length: the MDM); must divide the context."),
    mask_rate_min: Optional[float] = typer.Option(None, help="bd3: clipped schedule, lowest block time / mask rate beta (default 0)."),
    mask_rate_max: Optional[float] = typer.Option(None, help="bd3: clipped schedule, highest block time / mask rate omega (default 1)."),
    flex_attention: Optional[bool] = typer.Option(None, "--flex-attention", help="bd3: run the 2L training forward through FlexAttention (GPU; default: SDPA with a boolean mask)."),
    curriculum_steps: Optional[int] = typer.Option(None, min=0, help=HELP["curriculum_steps"]),
    tau: Optional[float] = typer.Option(None, help=f"duo: temperature of the relaxed one-hot input softmax(w / tau) during the curriculum (default {_DUO.tau:g})."),
    gamma_min: Optional[float] = typer.Option(None, help=f"duo: lowest Gaussian log-SNR parameter gamma of the curriculum (least noise) (default {_DUO.gamma_min:g})."),
    gamma_max: Optional[float] = typer.Option(None, help=f"duo: highest gamma of the curriculum (most noise) (default {_DUO.gamma_max:g})."),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare`; default: the embedded Shakespeare corpus (on --resume: the run's). "
                                        "--objective classifier (of noisy canvases, for D-CBG): a JSONL file of {\"text\": ..., \"label\": ...} lines."),
    steps: Optional[int] = typer.Option(None, min=1, help=HELP["steps"]),
    batch_size: Optional[int] = typer.Option(None, min=1, help=f"Sequences per micro-batch, per process (default {_T.batch_size})."),
    grad_accum: Optional[int] = typer.Option(None, min=1, help=f"Micro-batches per optimizer step (default {_T.grad_accum})."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default per objective: " + ", ".join(f"{o} {OBJECTIVES[o].defaults['lr']:g}" for o in trained_from_text()) + ")."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help=f"Linear warmup steps (default {_T.warmup_steps})."),
    weight_decay: Optional[float] = typer.Option(None, help=f"AdamW weight decay (default {_T.weight_decay})."),
    loss: Optional[str] = typer.Option(None, help=f"MDM objective: t-dce or k-dce (default {OBJECTIVES['mdm'].defaults['loss']}; bd3: per block, default t-dce)."),
    schedule: Optional[str] = typer.Option(None, help=f"MDM masking schedule, or udlm/duo's alpha(t): linear or cosine (default {_T.schedule})."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast where supported), bf16 or fp32 (default auto)."),
    context_len: Optional[int] = typer.Option(None, min=1, help="Override the preset's context length."),
    time_conditioning: Optional[bool] = typer.Option(None, help="Give the MDM network the time t (default: time-agnostic)."),
    seed: Optional[int] = typer.Option(None, min=0, help=f"Seed of the weights, data order and masking noise (default {_T.seed})."),
    eval_every: Optional[int] = typer.Option(None, min=1, help=f"Validate every N steps (default {_T.eval_every})."),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help=f"Checkpoint every N steps (default {_T.checkpoint_every})."),
    log_every: Optional[int] = typer.Option(None, min=1, help=f"Append a metrics line every N steps (default {_T.log_every})."),
    parallel: Optional[str] = typer.Option(None, help=HELP["parallel"]),
    global_batch_tokens: Optional[int] = typer.Option(None, min=0, help=HELP["global_batch_tokens"]),
    compile: Optional[bool] = typer.Option(None, help="torch.compile each block (checkpoints keep the plain weights)."),
    activation_checkpointing: Optional[bool] = typer.Option(None, help="Recompute activations in the backward pass: less memory, ~1/3 more compute."),
    ema: Optional[float] = typer.Option(None, help=HELP["ema"]),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
    init_from: Optional[Path] = typer.Option(None, help=HELP["init_from"]),
    keep_shift: Optional[bool] = typer.Option(None, help=HELP["keep_shift"]),
    anneal_attention: Optional[int] = typer.Option(None, min=0, help=HELP["anneal_attention"]),
    resume: bool = typer.Option(False, help=HELP["resume"]),
    resume_from: Optional[int] = typer.Option(None, help=HELP["resume_from"]),
) -> None:
    """Train an MDM or the AR baseline; the same command runs under torchrun."""
    from unmask.tracking import tracker_names
    from unmask.train import train as run_training

    log_to = tracker_names(log_to)  # refused before any work

    flags = {
        "objective": objective, "loss": loss, "schedule": schedule, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "lr": lr, "warmup_steps": warmup_steps, "weight_decay": weight_decay, "precision": precision, "seed": seed,
        "eval_every": eval_every, "checkpoint_every": checkpoint_every, "log_every": log_every, "parallel": parallel,
        "global_batch_tokens": global_batch_tokens, "compile": compile, "activation_checkpointing": activation_checkpointing, "ema": ema,
        "anneal_steps": anneal_attention, "init_from": None if init_from is None else str(Path(init_from).resolve()),
        "block_size": block_size, "mask_rate_min": mask_rate_min, "mask_rate_max": mask_rate_max, "flex_attention": flex_attention,
        "curriculum_steps": curriculum_steps, "tau": tau, "gamma_min": gamma_min, "gamma_max": gamma_max,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    resume = resume or resume_from is not None
    if resume:
        model_cfg, train_cfg, data_dir = _resumed(run_dir, data, given, {"--preset": preset, "--context-len": context_len,
                                                                         "--time-conditioning": time_conditioning})
    else:
        train_cfg = TrainConfig(**given)
        model_cfg, data_dir = _new_run(train_cfg, run_dir, data, preset, context_len, time_conditioning, init_from, keep_shift)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, one process reports
    if main_process:
        typer.echo(
            f"{train_cfg.objective.upper()} {model_cfg.name}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params, "
            f"{model_cfg.total_params() / 1e6:.2f}M total", err=True,
        )
    result = run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume, device=device, resume_from=resume_from,
                          log_to=log_to)
    if main_process:
        typer.echo(result.summary(), err=True)


def _resumed(run_dir: Path, data: Optional[Path], given: dict, model_flags: dict) -> tuple[ModelConfig, TrainConfig, Path]:
    """(model, training config, data folder) of ``--resume``: the saved run's, with the ``given`` training flags
    (train() refuses those that differ from the run's); model flags must be left out or equal the saved model."""
    from unmask.training.restore import changed_settings_error

    saved = _saved_run(run_dir)
    before = {"--preset": saved.model.name, "--context-len": saved.model.context_len, "--time-conditioning": saved.model.time_conditioning}
    refused = [f"{flag} (saved {before[flag]!r}, given {now!r})" for flag, now in model_flags.items() if now is not None and now != before[flag]]
    if refused:
        raise changed_settings_error(refused)
    data_dir = Path(data) if data is not None else _saved_data_dir(saved, run_dir)
    return saved.model, dataclasses.replace(saved.train, **given), data_dir


def _new_run(train_cfg: TrainConfig, run_dir: Path, data: Optional[Path], preset: Optional[str], context_len: Optional[int],
             time_conditioning: Optional[bool], init_from: Optional[Path], keep_shift: Optional[bool]) -> tuple[ModelConfig, Path]:
    """(network, data folder) of a new run; a classifier's labelled texts (--data JSONL) are tokenised into RUN/labels."""
    if objective_class(train_cfg).data == "labels":
        from unmask.objectives.classifier import new_classifier

        if keep_shift is not None:
            raise UnmaskError("--keep-shift is for adapting an AR model; a classifier has no per-position logits")
        return new_classifier(run_dir, data, preset, context_len, time_conditioning, init_from)
    data_dir = _data_dir(data)
    return _new_model(train_cfg, data_dir, preset, context_len, time_conditioning, init_from, keep_shift), data_dir


def _new_model(train_cfg: TrainConfig, data_dir: Path, preset: Optional[str], context_len: Optional[int], time_conditioning: Optional[bool],
               init_from: Optional[Path], keep_shift: Optional[bool]) -> ModelConfig:
    """The network of a new run: the preset's (default tiny) for the data's tokenizer, or the --init-from
    source's, made the one the objective trains (its ``network``: causal, block-causal)."""
    network = objective_class(train_cfg).network(train_cfg)
    if init_from is None:
        from unmask.data import TokenDataset

        if keep_shift is not None:
            raise UnmaskError("--keep-shift is for --init-from (adapting an AR model)")
        if time_conditioning is not None and network.get("time_conditioning", time_conditioning) != time_conditioning:
            raise UnmaskError(f"--objective {train_cfg.objective} trains a time-conditioned network; leave out --no-time-conditioning")
        tok = TokenDataset(data_dir, "train").tokenizer
        size = {} if context_len is None else {"context_len": context_len}
        return ModelConfig.from_name(preset or "tiny", vocab_size=tok.vocab_size, mask_token_id=tok.mask_id if tok.mask_inside else -1,
                                     **{"time_conditioning": bool(time_conditioning), **size, **network})
    from unmask.adaptation import adapted_config, source_config

    if preset is not None or time_conditioning:
        raise UnmaskError("--init-from takes the network from the source; leave out --preset and --time-conditioning")
    source = source_config(init_from)
    if network["causal"]:  # the AR baseline keeps its source's network
        if not source.causal or keep_shift:
            raise UnmaskError("--objective ar --init-from needs an AR (causal) source and no --keep-shift")
        return dataclasses.replace(source, context_len=context_len or source.context_len)
    if network.get("block_causal"):  # bidirectional inside blocks, block-causal across them (BD3-LM fine-tuning)
        if keep_shift:
            raise UnmaskError("--keep-shift is for --objective mdm; a block model predicts each position from itself")
        keep_shift = False
    return dataclasses.replace(adapted_config(source, source.shift_logits if keep_shift is None else keep_shift, context_len), **network)


checkpoint_app = command_group("Checkpoint tools.")
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("consolidate")
def consolidate_command(
    path: Path = typer.Argument(..., help="An FSDP run folder (its latest checkpoint) or one of its checkpoints/step_* folders."),
) -> None:
    """Write the single-file model.safetensors (and ema.safetensors) of a sharded checkpoint, for sample and eval."""
    from unmask.checkpoint_sharded import consolidate

    ckpt = consolidate(path)
    typer.echo(f"wrote {ckpt / 'model.safetensors'}", err=True)
