"""Tiny real training: loss goes down, checkpoints round-trip exactly, resume is exact."""

import errno
import json
import os

import pytest
import torch
from limits import file_size_limit
from runs import assert_resume_is_exact

from unmask.checkpoint import load_model, load_weights, resolve_checkpoint
from unmask.config import ModelConfig, TrainConfig
from unmask.errors import UnmaskError
from unmask.train import train


def cfgs(objective="mdm", steps=30, **kw):
    model = ModelConfig(vocab_size=512, context_len=32, n_layer=2, n_head=2, n_embd=64, causal=objective == "ar")
    train_cfg = TrainConfig(objective=objective, steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=1000,
                            checkpoint_every=1000, log_every=5, eval_windows=4, eval_draws=2, **kw)
    return model, train_cfg


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_loss_goes_down(tmp_path, small_data, objective):
    model, cfg = cfgs(objective, steps=60)
    res = train(tmp_path / "run", model, cfg, small_data, progress=False)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "val"}
    assert records[-1]["kind"] == "val" and records[-1]["step"] == 60
    assert all(r["flops"] == 6 * model.non_embedding_params() * r["tokens"] for r in records)


def test_save_load_round_trip_is_exact(tmp_path, small_data):
    model, cfg = cfgs(steps=3)
    train(tmp_path / "run", model, cfg, small_data, progress=False)
    weights, config, ckpt = load_weights(tmp_path / "run")
    assert config.model == model and config.train == cfg
    loaded, _ = load_model(tmp_path / "run")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[name])
    assert (ckpt / "tokenizer.json").is_file()


@pytest.mark.parametrize("objective,loss", [("mdm", "t-dce"), ("mdm", "k-dce"), ("ar", "t-dce")])
def test_resume_reproduces_uninterrupted_run(tmp_path, small_data, objective, loss):
    model, cfg = cfgs(objective, steps=12, loss=loss)
    assert_resume_is_exact(tmp_path, model, cfg, small_data)
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert steps == sorted(set(steps))  # no duplicated log lines after the resume


@pytest.mark.parametrize("failure", ["no-space", "writer"])
def test_a_failed_save_is_one_error_and_loses_nothing(tmp_path, small_data, monkeypatch, failure):
    """A save that fails (no space left on the device; the safetensors writer's own I/O error) ends
    in one UnmaskError naming the checkpoint and the reason; the last good checkpoint stays, no
    partial folder is left, and the run resumes from it once the disk has room."""
    model, cfg = cfgs(steps=4)
    train(tmp_path / "run", model, cfg, small_data, progress=False, stop_after=2)
    good = resolve_checkpoint(tmp_path / "run")

    import unmask.checkpoint as ck

    real_save = ck.save_file

    def failing_save(tensors, filename, metadata=None):
        if failure == "no-space":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        with file_size_limit(1000):
            real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(UnmaskError) as info:
        train(tmp_path / "run", model, cfg, small_data, resume=True, progress=False)
    reason = "No space left on device" if failure == "no-space" else "Error while serializing: I/O error: File too large (os error 27)"
    assert str(info.value) == (f"cannot write {tmp_path / 'run' / 'checkpoints' / 'step_000004'} ({reason}); nothing of the run was lost "
                               "(its last checkpoint step_000002 is intact): free space and continue it with resume")
    assert info.value.param == "resume"
    assert resolve_checkpoint(tmp_path / "run") == good
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["LATEST", "step_000002"]
    load_model(tmp_path / "run")  # still loads
    monkeypatch.setattr(ck, "save_file", real_save)
    assert train(tmp_path / "run", model, cfg, small_data, resume=True, progress=False).steps == 4


def test_refuses_to_overwrite_a_run(tmp_path, small_data):
    model, cfg = cfgs(steps=2)
    train(tmp_path / "run", model, cfg, small_data, progress=False)
    with pytest.raises(UnmaskError, match="already holds a run; pass resume to continue it") as refused:
        train(tmp_path / "run", model, cfg, small_data, progress=False)
    assert refused.value.param == "run_dir"


def test_bf16_and_fp32_loss_curves_agree(tmp_path, small_data):
    from unmask.train import autocast_dtype

    if autocast_dtype("auto", torch.device("cpu")) is None:
        pytest.skip("this CPU has no fast bf16")
    model, cfg = cfgs(steps=40)
    import dataclasses

    bf = train(tmp_path / "bf", model, dataclasses.replace(cfg, precision="bf16"), small_data, progress=False)
    fp = train(tmp_path / "fp", model, dataclasses.replace(cfg, precision="fp32"), small_data, progress=False)
    tail_bf, tail_fp = sum(bf.losses[-10:]) / 10, sum(fp.losses[-10:]) / 10
    assert abs(tail_bf - tail_fp) < 0.05 * tail_fp, (tail_bf, tail_fp)


def saved_run(tmp_path, steps: list[int], keep: int = 2):
    """Save checkpoints of a tiny untrained model at ``steps`` (no training needed)."""
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import RunConfig
    from unmask.model import Transformer

    model_cfg, train_cfg = cfgs()
    model = Transformer(model_cfg)
    for step in steps:
        save_checkpoint(tmp_path, model, RunConfig(model_cfg, train_cfg), TrainerState(step, 0), keep=keep)
    return tmp_path / "checkpoints"


def test_checkpoints_are_pruned_by_step_number_past_a_million(tmp_path):
    root = saved_run(tmp_path, [999_998, 999_999, 1_000_000])
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1000000", "step_999999"]
    assert (root / "LATEST").read_text().strip() == "step_1000000"
    assert resolve_checkpoint(tmp_path).name == "step_1000000"


def test_a_save_removes_temporary_folders_left_by_a_crash(tmp_path):
    root = saved_run(tmp_path, [4])
    stale = root / ".tmp-step_000008-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    saved_run(tmp_path, [8])
    assert not stale.exists()
    assert (root / "LATEST").read_text().strip() == "step_000008"
    load_model(tmp_path)  # the newest checkpoint is complete
    load_model(root / "step_000004")  # and the one before it is intact


def test_a_save_never_prunes_the_checkpoint_latest_names(tmp_path):
    # a crash between renaming step 20 into place and naming it in LATEST leaves an orphan newer
    # than LATEST; the resumed run saves step 8 next, which must survive the pruning
    root = saved_run(tmp_path, [4])
    (root / "step_000020").mkdir()
    saved_run(tmp_path, [8], keep=1)
    assert (root / "LATEST").read_text().strip() == "step_000008"
    load_model(tmp_path)


@pytest.mark.parametrize("config_cls", ["ModelConfig", "TrainConfig"])
def test_config_from_dict_refuses_unknown_keys(config_cls):
    import unmask.config as config

    cls = getattr(config, config_cls)
    data = cls().to_dict() | {"lr_typo": 1e-3}
    with pytest.raises(UnmaskError, match=r"unknown keys \['lr_typo'\]; known keys: \[.*'n_layer'|unknown keys \['lr_typo'\]; known keys: \[.*'warmup_steps'"):
        cls.from_dict(data)
    assert cls.from_dict(cls().to_dict()) == cls()


def test_resume_refuses_a_differing_train_config(tmp_path, small_data, capsys):
    import dataclasses

    model, cfg = cfgs(steps=4)
    train(tmp_path / "run", model, cfg, small_data, progress=False, stop_after=2)
    for change, message in [({"lr": 1e-3}, r"lr \(saved 0.003, given 0.001\)"), ({"loss": "t-dce"}, r"loss \(saved 'k-dce', given 't-dce'\)"),
                            ({"seed": 1, "batch_size": 4}, r"batch_size \(saved 8, given 4\), seed \(saved 0, given 1\)")]:
        with pytest.raises(UnmaskError, match=message):
            train(tmp_path / "run", model, dataclasses.replace(cfg, **change), small_data, resume=True, progress=False)
    other = dataclasses.replace(model, n_layer=3)
    with pytest.raises(UnmaskError, match=r"n_layer \(saved 2, given 3\)"):
        train(tmp_path / "run", other, cfg, small_data, resume=True, progress=False)
    # settings that change no number may differ, with a notice
    res = train(tmp_path / "run", model, dataclasses.replace(cfg, eval_every=2), small_data, resume=True, progress=False)
    assert res.steps == 4 and "--eval-every changed from 1000 to 2" in capsys.readouterr().err


def test_resume_checks_the_data_folder(tmp_path, small_data):
    import dataclasses
    import shutil

    from unmask.config import RunConfig
    from unmask.training.restore import resume_config

    model, cfg = cfgs()
    saved = RunConfig(model, cfg, str(small_data.resolve()), "fingerprint-a")
    with pytest.raises(UnmaskError, match=f"data folder {small_data.resolve()} was made with another tokenizer"):
        resume_config(saved, model, cfg, 5, small_data.resolve(), "fingerprint-b")
    copy = shutil.copytree(small_data, tmp_path / "copy")
    with pytest.raises(UnmaskError, match=f"data {copy} is not the run's data folder {small_data.resolve()}"):
        resume_config(saved, model, cfg, 5, copy, "fingerprint-a")
    moved = dataclasses.replace(saved, data_dir=str(tmp_path / "gone"))
    new, notices = resume_config(moved, model, cfg, 5, copy, "fingerprint-a")
    assert new == cfg and notices == [f"the run's data folder {tmp_path / 'gone'} is gone; continuing with {copy} (same tokenizer)"]


def test_learning_rate_stays_continuous_when_steps_change():
    import dataclasses
    import math

    from unmask.training.optim import learning_rate

    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    plain = [learning_rate(s, cfg) for s in range(100)]
    assert plain[9] == 1.0 and plain[10] == 1.0 and learning_rate(100, cfg) == pytest.approx(0.1)

    def cosine(step, start, lr, end):  # from lr at step `start` to 0.1 at step `end`
        return 0.1 + (lr - 0.1) * 0.5 * (1 + math.cos(math.pi * (step - start) / (end - start)))

    longer = dataclasses.replace(cfg, steps=200, steps_changes=((60, 100),))
    assert [learning_rate(s, longer) for s in range(61)] == plain[:61]
    assert all(learning_rate(s, longer) == pytest.approx(cosine(s, 60, plain[60], 200)) for s in range(60, 201))
    shorter_again = dataclasses.replace(longer, steps=150, steps_changes=((60, 100), (120, 200)))
    assert [learning_rate(s, shorter_again) for s in range(121)] == [learning_rate(s, longer) for s in range(121)]
    assert learning_rate(150, shorter_again) == pytest.approx(0.1)
    # a change during warmup: warmup completes, then the plain cosine to the new end
    early = dataclasses.replace(cfg, steps=200, steps_changes=((5, 100),))
    assert [learning_rate(s, early) for s in range(201)] == pytest.approx([learning_rate(s, dataclasses.replace(cfg, steps=200)) for s in range(201)])
