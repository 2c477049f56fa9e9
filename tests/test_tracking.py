"""``--log-to tensorboard`` and ``--log-to wandb`` send metrics.jsonl's lines to the trackers, value for value.

A tiny run is trained through the installed console script with both trackers, then resumed with
``--resume-from`` an earlier checkpoint (the steps after it are trained again, with other timings):
TensorBoard's event files, read back with its own EventAccumulator, hold exactly metrics.jsonl's
values at the same steps (the older copies of the retrained steps hidden); the offline wandb runs
(one per call, one run id kept in the run folder) hold the same values in their history, read from
their ``.wandb`` transaction logs, and the run's config. Only rank 0 of two gloo processes logs;
the experiments' chunked runs append to one log per run; an unknown tracker, or one whose package
is missing, is refused with one ``error:`` line and exit status 2 by every command that trains.
"""

import dataclasses
import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ranks import free_port, launch_ranks, wait_ranks

from unmask import tracking
from unmask.cli import main
from unmask.config import ModelConfig, TrainConfig

UNMASK = str(Path(sys.executable).with_name("unmask"))  # the installed console script
FLAGS = ["--preset", "tiny", "--context-len", "32", "--batch-size", "4", "--steps", "6", "--checkpoint-every", "2", "--eval-every", "3",
         "--log-every", "1", "--precision", "fp32", "--device", "cpu"]
RESUME_STEP = 4  # the retrained steps 5 and 6 log new tokens_per_s and elapsed_s
TRAIN_TAGS = {f"train/{field}" for field in ("tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")}
VAL_TAGS = {f"val/{field}" for field in ("tokens", "flops", "nats_per_token", "stderr", "ppl")}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def metrics(run_dir: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(tag, step): value}, the tag being "<kind>/<field>" less the field's "val_" prefix."""
    values = {}
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in ("kind", "step"):
                values[f"{record['kind']}/{key.removeprefix('val_')}", record["step"]] = value
    return values


def tensorboard_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """The scalars of every event file in ``folder`` as TensorBoard reads them: {(tag, step): value}; no step twice."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(folder), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)  # the reader TensorBoard serves from
    events.Reload()
    scalars = {}
    for tag in events.PluginTagToContent("scalars"):
        points = [(event.step, make_ndarray(event.tensor_proto).item()) for event in events.Tensors(tag)]
        assert len({step for step, _ in points}) == len(points), f"{tag}: a step logged twice {points}"
        scalars.update(((tag, step), value) for step, value in points)
    return scalars


def tensorboard_hparams(folder: Path) -> dict:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(folder))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    return {key: value.number_value if value.HasField("number_value") else value.string_value for key, value in start.hparams.items()}


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log: a 7-byte header (":W&B", magic, version),
    then LevelDB-log chunks (crc32c, length, type: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(folder: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run folder."""
    [log] = folder.glob("run-*.wandb")
    run_id, config, rows = None, {}, []
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update((item.key, json.loads(item.value_json)) for item in record.run.config.update)
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return run_id, config, rows


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([UNMASK, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, small_data):
    """A run trained with every installed tracker (a comma list), then resumed from step 4 (the flag repeated)."""
    trackers = [name for name in ("tensorboard", "wandb") if installed(name)]
    if not trackers:
        pytest.skip("neither tensorboard nor wandb is installed: pip install -e '.[track]' (also in [dev])")
    home = tmp_path_factory.mktemp("wandb-home")  # wandb's settings and caches, kept out of the user's home
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "OMP_NUM_THREADS": "1", "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home), "WANDB_DATA_DIR": str(home)}
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    first = cli("train", "--run-dir", str(run_dir), "--data", str(small_data), *FLAGS, "--log-to", ",".join(trackers), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = metrics(run_dir)
    repeated = [arg for name in trackers for arg in ("--log-to", name)]
    again = cli("train", "--run-dir", str(run_dir), "--resume-from", str(RESUME_STEP), "--device", "cpu", *repeated, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    after = metrics(run_dir)
    assert {key for key in after if before[key] != after[key]} >= {("train/tokens_per_s", 5), ("train/elapsed_s", 6)}  # new timings
    return run_dir


def test_tensorboard_scalars_equal_metrics(tracked_run):
    if not installed("tensorboard"):
        pytest.skip("tensorboard is not installed: pip install -e '.[track]' (also in [dev])")
    folder = tracked_run / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # the resumed run appended to the same folder
    expected, logged = metrics(tracked_run), tensorboard_scalars(folder)
    assert {tag for tag, _ in logged} == TRAIN_TAGS | VAL_TAGS
    assert logged == expected  # exact (doubles), and the steps logged before the resume are hidden
    config = json.loads((tracked_run / "config.json").read_text())
    hparams = tensorboard_hparams(folder)
    assert hparams["train.lr"] == config["train"]["lr"] and hparams["model.n_layer"] == config["model"]["n_layer"]
    assert hparams["train.objective"] == "mdm"


def test_wandb_offline_history_equals_metrics(tracked_run):
    if not installed("wandb"):
        pytest.skip("wandb is not installed: pip install -e '.[track]' (also in [dev])")
    run_id = (tracked_run / "wandb" / "run-id").read_text().strip()
    folders = sorted((tracked_run / "wandb").glob("offline-run-*"))  # offline, as WANDB_MODE was not set
    assert len(folders) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in folders)
    runs = [wandb_run(folder) for folder in folders]
    assert [rid for rid, _, _ in runs] == [run_id, run_id]  # the resumed call continued the same run
    config = json.loads((tracked_run / "config.json").read_text())
    assert runs[-1][1]["train"]["lr"] == config["train"]["lr"] and runs[-1][1]["model"] == config["model"]
    assert sorted({row["step"] for row in runs[1][2]}) == [5, 6]  # the second call logged the steps it trained
    history = {}
    for _, _, rows in runs:  # later rows replace the earlier ones of a step trained again
        for row in rows:
            history.update(((key, row["step"]), value) for key, value in row.items() if "/" in key)
    assert {tag for tag, _ in history} == TRAIN_TAGS | VAL_TAGS
    assert history == metrics(tracked_run)


WORKER = textwrap.dedent(
    """
    import json, os, sys
    from unmask.config import ModelConfig, TrainConfig
    from unmask.train import train

    run_dir, data, model, cfg, port = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    os.environ["MASTER_PORT"] = port
    train(run_dir, ModelConfig(**model), TrainConfig(**cfg), data, device="cpu", progress=False, log_to=("tensorboard",))
    """
)


def tiny_configs(steps: int) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(vocab_size=512, context_len=16, n_layer=2, n_head=2, n_embd=32)
    cfg = TrainConfig(steps=steps, batch_size=2, lr=3e-3, warmup_steps=1, precision="fp32", log_every=1, eval_every=2, eval_windows=2,
                      eval_draws=2, checkpoint_every=1000)
    return model, cfg


def test_only_rank_zero_logs(tmp_path, small_data):
    pytest.importorskip("tensorboard", reason="pip install -e '.[track]' (also in [dev])")
    model, cfg = tiny_configs(steps=3)
    run_dir = tmp_path / "ddp"
    wait_ranks(launch_ranks(["-c", WORKER, str(run_dir), str(small_data), json.dumps(dataclasses.asdict(model)), json.dumps(dataclasses.asdict(cfg)),
                             str(free_port())]), timeout=240)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(run_dir / "tensorboard") == metrics(run_dir)


def test_experiment_runs_log_every_chunk(tmp_path, small_data):
    pytest.importorskip("tensorboard", reason="pip install -e '.[track]' (also in [dev])")
    from unmask.experiments.runner import RunSpec, run_grid

    model, cfg = tiny_configs(steps=4)
    spec = RunSpec("tiny", model, cfg, str(small_data))
    run_grid(tmp_path, [spec], lambda spec, run_dir: {}, device="cpu", progress=False, chunk=2, log_to=("tensorboard",))
    run_dir = tmp_path / "runs" / "tiny"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per chunk, one log
    assert tensorboard_scalars(run_dir / "tensorboard") == metrics(run_dir)


def as_if_installed(monkeypatch) -> None:
    """Every tracker's package counts as installed (each asks for one that is)."""
    monkeypatch.setattr(tracking, "TRACKERS", {name: tracking.Tracker("json", tracker.open) for name, tracker in tracking.TRACKERS.items()})


EXPERIMENTS = {"scaling": "scaling", "reverse-curse": "reverse_curse", "conditional": "conditional", "shift": "shift"}


@pytest.mark.parametrize("command", EXPERIMENTS)
def test_experiments_pass_log_to(command, monkeypatch, tmp_path):
    module = importlib.import_module(f"unmask.experiments.{EXPERIMENTS[command]}")
    seen = []
    monkeypatch.setattr(module, "run", lambda *args, log_to=(), **kwargs: seen.append(log_to))
    as_if_installed(monkeypatch)
    assert main(["experiment", command, "--out", str(tmp_path), "--log-to", "tensorboard", "--log-to", "wandb,tensorboard"]) == 0
    assert seen == [("tensorboard", "wandb")]


def test_names_from_repeated_flags_and_comma_lists(monkeypatch):
    as_if_installed(monkeypatch)
    assert tracking.tracker_names(["wandb", " tensorboard, wandb ", ""]) == ("wandb", "tensorboard")
    assert tracking.tracker_names("tensorboard,wandb") == ("tensorboard", "wandb")  # one string from Python
    assert tracking.tracker_names(None) == tracking.tracker_names([]) == ()


COMMANDS = [["train", "--run-dir"], ["finetune", "--run-dir"], *(["experiment", name, "--out"] for name in EXPERIMENTS)]


def test_unknown_tracker_refused_by_the_console_script(tmp_path):
    run = subprocess.run([UNMASK, "train", "--run-dir", str(tmp_path / "run"), "--log-to", "tensorboard,mlflow"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["error: --log-to mlflow: unknown tracker; choose tensorboard or wandb (repeat the flag or "
                                       "separate names with commas)"]
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command[:-1]))
def test_unknown_or_missing_tracker_refused(command, tmp_path, capsys, monkeypatch):
    assert main([*command, str(tmp_path / "out"), "--log-to", "mlflow"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --log-to mlflow: unknown tracker; choose tensorboard or wandb (repeat the "
                                                    "flag or separate names with commas)"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert main([*command, str(tmp_path / "out"), "--log-to", "wandb"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --log-to wandb needs the wandb package: pip install 'unmask[track]'"]
    assert not (tmp_path / "out").exists()
