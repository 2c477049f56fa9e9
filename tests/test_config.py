"""The training config's sections (adapt, block, sft): built from sections or from the flat settings of
older code and run folders, with each objective's defaults, and read back from both layouts."""

import dataclasses
import json

import pytest

from unmask.config import AdaptationConfig, BlockDiffusionConfig, ModelConfig, RunConfig, SFTConfig, TrainConfig
from unmask.errors import OptionError, UnmaskError

# The "train" entry of config.json files written before the config had sections (a block-diffusion run
# and an MDM fine-tuned with CFG dropout), as the training loop wrote them.
FLAT_BD3 = {
    "objective": "bd3", "loss": "t-dce", "schedule": "linear", "low_discrepancy": True, "steps": 6, "batch_size": 4,
    "grad_accum": 1, "lr": 0.003, "min_lr_ratio": 0.1, "warmup_steps": 2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
    "grad_clip": 1.0, "precision": "fp32", "seed": 0, "eval_every": 3, "eval_windows": 2, "eval_draws": 2, "checkpoint_every": 3,
    "keep_checkpoints": 2, "log_every": 1, "steps_changes": [], "parallel": "ddp", "global_batch_tokens": 0, "compile": False,
    "activation_checkpointing": False, "ema": 0.0, "init_from": "", "anneal_steps": 0, "block_size": 4, "mask_rate_min": 0.2,
    "mask_rate_max": 0.8, "flex_attention": False, "sft": False, "cfg_dropout": 0.0
}
FLAT_SFT = {
    "objective": "mdm", "loss": "k-dce", "schedule": "linear", "low_discrepancy": True, "steps": 6, "batch_size": 4,
    "grad_accum": 1, "lr": 0.0001, "min_lr_ratio": 0.1, "warmup_steps": 1, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
    "grad_clip": 1.0, "precision": "fp32", "seed": 0, "eval_every": 3, "eval_windows": 32, "eval_draws": 4,
    "checkpoint_every": 3, "keep_checkpoints": 2, "log_every": 1, "steps_changes": [], "parallel": "ddp",
    "global_batch_tokens": 0, "compile": False, "activation_checkpointing": False, "ema": 0.0, "init_from": "/runs/mdm",
    "anneal_steps": 0, "block_size": 0, "mask_rate_min": 0.0, "mask_rate_max": 1.0, "flex_attention": False, "sft": True,
    "cfg_dropout": 0.3
}


def test_the_flat_layout_of_older_run_folders_reads_into_sections():
    bd3 = TrainConfig.from_dict(FLAT_BD3)
    assert bd3.block == BlockDiffusionConfig(size=4, mask_rate_min=0.2, mask_rate_max=0.8) and bd3.sft is None and bd3.adapt is None
    sft = TrainConfig.from_dict(FLAT_SFT)
    assert sft.sft == SFTConfig(cfg_dropout=0.3) and sft.adapt == AdaptationConfig(init_from="/runs/mdm") and sft.block is None
    for flat, cfg in ((FLAT_BD3, bd3), (FLAT_SFT, sft)):
        view = json.loads(json.dumps(cfg.flat_settings()))  # the old layout, and the settings of sections added since
        assert {key: view[key] for key in flat} == flat  # the flat view holds the old layout, key for key
        assert [key for key in view if key in flat] == list(flat)  # in the flags' order (resume messages list them so)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # and the nested layout round-trips
    run = RunConfig.from_dict({"model": ModelConfig().to_dict(), "train": FLAT_SFT, "data_dir": "/data"})
    assert run.train == sft


def test_sections_and_their_flat_names_make_the_same_config():
    nested = TrainConfig(objective="bd3", block=BlockDiffusionConfig(size=4, mask_rate_min=0.2))
    assert TrainConfig(objective="bd3", block_size=4, mask_rate_min=0.2) == nested
    assert TrainConfig(**dataclasses.asdict(nested)) == nested  # sections given as their dicts
    assert dataclasses.replace(nested, flex_attention=True).block == BlockDiffusionConfig(4, 0.2, 1.0, True)  # a flat name wins
    assert TrainConfig(objective="mdm", sft=True, cfg_dropout=0.1).sft == SFTConfig(0.1)
    assert TrainConfig(objective="mdm", init_from="/r", anneal_steps=3).adapt == AdaptationConfig("/r", 3)
    assert TrainConfig(objective="mdm", block_size=0, sft=False, init_from="").block is None  # defaults: sections off
    off = TrainConfig()
    assert (off.adapt, off.block, off.sft, off.init_from, off.anneal_steps) == (None, None, None, "", 0)
    with pytest.raises(UnmaskError, match=r"training block config has unknown keys \['blocksize'\]"):
        TrainConfig.from_dict({"objective": "bd3", "block": {"blocksize": 4}})
    with pytest.raises(OptionError, match="cfg_dropout=0.1 .* fine-tuning an MDM only") as refused:  # dropout without fine-tuning
        TrainConfig(objective="mdm", cfg_dropout=0.1)
    assert refused.value.param == "cfg_dropout"
    with pytest.raises(OptionError, match="cfg_dropout=0.1"):
        TrainConfig(objective="ar", sft=SFTConfig(cfg_dropout=0.1))
    with pytest.raises(OptionError, match="anneal_steps=-1") as refused:
        TrainConfig(objective="mdm", anneal_steps=-1)
    assert refused.value.param == "anneal_steps"


def test_each_objective_fills_the_settings_left_unset_before_the_config_is_made():
    assert (TrainConfig().lr, TrainConfig().loss) == (2e-3, "k-dce")
    assert (TrainConfig(objective="ar").lr, TrainConfig(objective="bd3", block_size=2).loss) == (5e-3, "t-dce")
    given = TrainConfig(objective="mdm", lr=1e-4, loss="t-dce")
    assert (given.lr, given.loss) == (1e-4, "t-dce")
    assert dataclasses.replace(given, steps=7).lr == 1e-4  # a replaced config keeps the values it had
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.lr = 1.0


def test_resume_names_a_section_setting_by_its_name():
    from unmask.training.restore import resume_config

    model = ModelConfig(vocab_size=64, context_len=16, n_layer=1, n_head=2, n_embd=16, block_causal=4)
    saved = RunConfig(model, TrainConfig.from_dict(FLAT_BD3), "/data", "fp")
    with pytest.raises(OptionError, match=r"resume: mask_rate_min \(saved 0.2, given 0.3\), flex_attention \(saved False, given True\)"):
        resume_config(saved, model, dataclasses.replace(saved.train, mask_rate_min=0.3, flex_attention=True), 2, "/data", "fp")
    new, notices = resume_config(saved, model, dataclasses.replace(saved.train, eval_every=2), 2, "/data", "fp")
    assert new.eval_every == 2 and new.block == saved.train.block and notices == ["--eval-every changed from 3 to 2"]


def test_a_run_saved_with_the_flat_layout_resumes_exactly(tmp_path, small_data):
    """A block-diffusion run whose config.json and checkpoint record the flat layout (as runs trained before
    the config had sections do) loads, and resumes to the uninterrupted run's losses."""
    from safetensors.torch import load_file, save_file

    from unmask.checkpoint import load_model, resolve_checkpoint
    from unmask.train import train

    model = ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32, block_causal=4)
    cfg = TrainConfig(objective="bd3", block_size=4, mask_rate_min=0.2, steps=4, batch_size=4, lr=3e-3, warmup_steps=1,
                      eval_every=100, eval_windows=2, eval_draws=2, precision="fp32")
    full = train(tmp_path / "full", model, cfg, small_data, device="cpu", progress=False)
    first = train(tmp_path / "old", model, cfg, small_data, device="cpu", progress=False, stop_after=2)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["train"] = cfg.flat_settings() | {"steps_changes": []}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    weights = resolve_checkpoint(tmp_path / "old") / "model.safetensors"
    save_file(load_file(weights), weights, metadata=_with_config(weights, config))
    _, loaded = load_model(tmp_path / "old")
    assert loaded.train == cfg
    second = train(tmp_path / "old", model, cfg, small_data, device="cpu", resume=True, progress=False)
    assert first.losses + second.losses == full.losses


def _with_config(weights, config: dict) -> dict:
    """The safetensors metadata of ``weights`` with its config replaced by ``config``."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {**f.metadata(), "config": json.dumps(config)}


def test_an_experiment_result_of_the_flat_layout_still_counts(tmp_path):
    from unmask.experiments.runner import RunSpec, _finished

    model = ModelConfig(vocab_size=64, context_len=16, n_layer=1, n_head=2, n_embd=16)
    spec = RunSpec("sft", model, TrainConfig.from_dict(FLAT_SFT), "/data", {"kind": "mdm"})
    old = {**spec.to_dict(), "train": FLAT_SFT}
    (tmp_path / "result.json").write_text(json.dumps({"spec": old, "result": {"accuracy": 0.5}}))
    assert _finished(tmp_path / "result.json", spec) == {"accuracy": 0.5}
    other = RunSpec("sft", model, dataclasses.replace(spec.train, cfg_dropout=0.1), "/data", {"kind": "mdm"})
    with pytest.raises(UnmaskError, match="different settings"):
        _finished(tmp_path / "result.json", other)


def test_an_experiment_result_saved_before_newer_model_fields_still_counts(tmp_path):
    """A model config written before a field existed reads with that field's default: the same run."""
    from unmask.experiments.runner import RunSpec, _finished

    model = ModelConfig(vocab_size=64, context_len=16, n_layer=1, n_head=2, n_embd=16)
    spec = RunSpec("mdm", model, TrainConfig(), "/data", {"kind": "mdm"})
    older = {key: value for key, value in model.to_dict().items() if key not in ("positions", "sliding_window")}
    (tmp_path / "result.json").write_text(json.dumps({"spec": {**spec.to_dict(), "model": older}, "result": {"nll": 1.0}}))
    assert _finished(tmp_path / "result.json", spec) == {"nll": 1.0}
    wider = RunSpec("mdm", dataclasses.replace(model, n_embd=32), TrainConfig(), "/data", {"kind": "mdm"})
    with pytest.raises(UnmaskError, match="different settings"):
        _finished(tmp_path / "result.json", wider)
