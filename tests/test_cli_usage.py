"""Bad command lines: one ``error:`` line and exit status 2, never a traceback; counts and sizes
that are not positive, and NaN or infinite floats, refused by every command and by the Python API
before anything is written."""

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unmask.cli import main
from unmask.errors import UnmaskError

UNMASK = Path(sys.executable).with_name("unmask")  # the installed console script


def unmask(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(UNMASK), *map(str, argv)], capture_output=True, text=True, timeout=600)


def assert_one_error_line(code: int, err: str, named: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err, err


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_data):
    """A tiny MDM run made through the CLI, and the folders the bad command lines refer to."""
    root = tmp_path_factory.mktemp("usage")
    assert main(["train", "--run-dir", str(root / "mdm"), "--data", str(small_data), "--steps", "2", "--batch-size", "2",
                 "--context-len", "32", "--eval-every", "2", "--checkpoint-every", "2"]) == 0
    (root / "pairs.jsonl").write_text('{"prompt": "Who?", "response": "Romeo."}\n' * 4)
    (root / "text.txt").write_text("O Romeo, Romeo, wherefore art thou Romeo?\n" * 20)
    return {"run": root / "mdm", "data": small_data, "pairs": root / "pairs.jsonl", "text": root / "text.txt"}


def fill(argv: list[str], paths: dict, tmp_path: Path) -> list[str]:
    return [a.format(tmp=tmp_path, **paths) for a in argv]


# --- usage errors through the installed script: unknown option, bad int, bad float, missing option

@pytest.mark.parametrize("argv,named", [
    (["train", "--stepz", "3"], "--stepz"),
    (["train", "--run-dir", "r", "--steps", "abc"], "--steps"),
    (["train", "--run-dir", "r", "--lr", "fast"], "--lr"),
    (["train", "--steps", "3"], "--run-dir"),
    (["sample", "--checkpoint", "r", "--temperature", "warm"], "--temperature"),
    (["eval", "ppl", "--checkpoint", "r", "--batch-size", "1.5"], "--batch-size"),
    (["data", "prepare", "a.txt"], "--out"),
    (["evaluate"], "evaluate"),
])
def test_usage_errors_are_one_line(argv, named):
    proc = unmask(*argv)
    assert_one_error_line(proc.returncode, proc.stderr, named)
    assert proc.stdout == ""


def test_ctrl_c_prints_one_line(tmp_path, small_data):
    """SIGINT during training: the line ``aborted`` and exit status 130, no traceback."""
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        [str(UNMASK), "train", "--run-dir", str(run_dir), "--data", str(small_data), "--steps", "1000000", "--batch-size", "2",
         "--context-len", "32", "--log-every", "1", "--eval-every", "1000000", "--checkpoint-every", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):  # training has begun
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "aborted" and "Traceback" not in err, err


# --- numbers out of range: one subprocess per command kind, the full list in-process below

@pytest.mark.parametrize("argv,named", [
    (["train", "--run-dir", "{tmp}/new", "--data", "{data}", "--lr", "nan"], "--lr"),
    (["sample", "--checkpoint", "{run}", "--length", "4", "--temperature", "nan"], "--temperature"),
    (["eval", "ppl", "--checkpoint", "{run}", "--batch-size", "-3"], "--batch-size"),
    (["data", "prepare", "{text}", "--out", "{tmp}/new", "--workers", "-1"], "--workers"),
    (["serve", "--checkpoint", "{run}", "--timeout", "inf"], "--timeout"),
    (["experiment", "reverse-curse", "--out", "{tmp}/new", "--cfg-scales", "0,nan"], "--cfg-scales"),
])
def test_bad_numbers_through_the_script(run, tmp_path, argv, named):
    proc = unmask(*fill(argv, run, tmp_path))
    assert_one_error_line(proc.returncode, proc.stderr, named)
    assert not (tmp_path / "new").exists()  # refused before anything is written


TRAIN = ["train", "--run-dir", "{tmp}/new", "--data", "{data}"]
FINETUNE = ["finetune", "--run-dir", "{tmp}/new", "--init-from", "{run}", "--pairs", "{pairs}"]
SAMPLE = ["sample", "--checkpoint", "{run}", "--length", "4", "--prompt", "KING"]
PPL = ["eval", "ppl", "--checkpoint", "{run}", "--windows", "2"]
HARNESS = ["eval", "harness", "--checkpoint", "{run}", "--limit", "1"]
GENPPL = ["eval", "genppl", "--checkpoint", "{run}", "--judge", "{run}", "--num-samples", "1", "--length", "4"]
PREPARE = ["data", "prepare", "{text}", "--out", "{tmp}/new"]
SERVE = ["serve", "--checkpoint", "{run}", "--port", "0"]
DEMO = ["demo", "--run-root", "{tmp}/new"]
EXPERIMENT = ["experiment"]
OUT = ["--out", "{tmp}/new"]

BAD_NUMBERS = [
    *[(TRAIN + [flag, value], flag) for flag, value in [
        ("--steps", "0"), ("--batch-size", "-3"), ("--grad-accum", "0"), ("--warmup-steps", "-1"), ("--eval-every", "0"),
        ("--checkpoint-every", "0"), ("--log-every", "0"), ("--global-batch-tokens", "-1"), ("--context-len", "0"),
        ("--anneal-attention", "-1"), ("--seed", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--weight-decay", "nan"),
        ("--weight-decay", "-0.1"), ("--ema", "nan"), ("--ema", "inf"),
    ]],
    (TRAIN + ["--objective", "bd3", "--block-size", "0"], "--block-size"),
    (TRAIN + ["--objective", "bd3", "--block-size", "4", "--mask-rate-max", "nan"], "--mask-rate-max"),
    *[(FINETUNE + [flag, value], flag) for flag, value in [
        ("--steps", "0"), ("--batch-size", "0"), ("--length", "0"), ("--lr", "nan"), ("--lr", "-inf"), ("--cfg-dropout", "nan"),
        ("--seed", "-2"),
    ]],
    *[(SAMPLE + [flag, value], flag) for flag, value in [
        ("--num-samples", "0"), ("--length", "-1"), ("--steps", "0"), ("--top-k", "-1"), ("--block-len", "-4"),
        ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--top-p", "nan"), ("--top-p", "0"),
        ("--top-p", "1.5"), ("--cfg", "nan"), ("--cfg", "inf"),
    ]],
    (SAMPLE + ["--sampler", "first-hitting", "--k", "0"], "--k"),
    (SAMPLE + ["--sampler", "threshold", "--tau", "nan"], "--tau"),
    (SAMPLE + ["--cache", "prefix", "--cache-refresh", "-1"], "--cache-refresh"),
    *[(PPL + [flag, value], flag) for flag, value in [
        ("--batch-size", "-3"), ("--batch-size", "0"), ("--draws", "0"), ("--windows", "0"),
    ]],
    (["eval", "ppl", "--checkpoint", "{run}", "--text", "{text}", "--limit-documents", "-1"], "--limit-documents"),
    *[(HARNESS + [flag, value], flag) for flag, value in [
        ("--draws", "0"), ("--batch-size", "0"), ("--limit", "0"), ("--num-fewshot", "-1"), ("--cfg", "nan"),
    ]],
    *[(GENPPL + [flag, value], flag) for flag, value in [
        ("--num-samples", "0"), ("--length", "0"), ("--top-p", "nan"), ("--temperature", "inf"),
    ]],
    *[(PREPARE + [flag, value], flag) for flag, value in [("--workers", "-1"), ("--val-fraction", "nan")]],
    *[(SERVE + [flag, value], flag) for flag, value in [
        ("--port", "-1"), ("--port", "70000"), ("--max-tokens", "0"), ("--max-n", "0"), ("--max-steps", "0"), ("--max-active", "0"),
        ("--max-queue", "0"), ("--timeout", "nan"), ("--timeout", "0"),
    ]],
    *[(DEMO + [flag, value], flag) for flag, value in [
        ("--steps", "0"), ("--draws", "1"), ("--spans", "0"), ("--examples", "-1"), ("--seed", "-1"),
    ]],
    (EXPERIMENT + ["scaling", *OUT, "--bootstrap", "5"], "--bootstrap"),
    *[(EXPERIMENT + ["reverse-curse", *OUT, flag, value], flag) for flag, value in [
        ("--facts", "0"), ("--repeats", "0"), ("--steps", "0"), ("--distractors", "0"), ("--context-len", "0"), ("--cfg-scales", "nan"),
    ]],
    *[(EXPERIMENT + ["conditional", *OUT, flag, value], flag) for flag, value in [
        ("--facts", "0"), ("--steps", "0"), ("--mdm-steps", "0"), ("--sft-steps", "0"), ("--sft-lr", "nan"), ("--cfg-dropout", "nan"),
        ("--distractors", "0"), ("--cfg-scales", "inf"),
    ]],
    *[(EXPERIMENT + ["shift", *OUT, flag, value], flag) for flag, value in [
        ("--steps", "0"), ("--vocab-size", "-1"), ("--draws", "1"), ("--windows", "0"), ("--ar-fractions", "nan"), ("--seed", "-1"),
    ]],
]


@pytest.mark.parametrize("argv,named", BAD_NUMBERS, ids=[" ".join(a[:2] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused(capsys, run, tmp_path, argv, named):
    if argv[:2] == ["eval", "harness"]:
        pytest.importorskip("lm_eval")
    code = main(fill(argv, run, tmp_path))
    assert_one_error_line(code, capsys.readouterr().err, named)
    # no config.json, checkpoints, pairs or results left behind (fine-tuning takes the run's lock first)
    assert [p.name for p in (tmp_path / "new").glob("**/*")] in ([], ["train.lock"])


# --- the Python API refuses the same values, naming the parameter

def test_train_config_refuses_non_finite_and_non_positive_values():
    from unmask.config import TrainConfig

    for bad, named in [({"lr": math.nan}, "^lr=nan"), ({"lr": math.inf}, "^lr=inf"), ({"weight_decay": math.nan}, "^weight_decay=nan"),
                       ({"beta1": math.nan}, "beta1"), ({"grad_clip": -math.inf}, "grad_clip"), ({"min_lr_ratio": math.nan}, "min_lr_ratio"),
                       ({"eval_windows": 0}, "eval_windows"), ({"seed": -1}, "^seed=-1"), ({"warmup_steps": math.nan}, "^warmup_steps=nan")]:
        with pytest.raises(UnmaskError, match=named):
            TrainConfig(**bad)


@pytest.mark.parametrize("options,named", [
    ({"temperature": math.nan}, "temperature"), ({"cfg_scale": math.nan}, "cfg_scale"), ({"cfg_scale": math.inf}, "cfg_scale"),
    ({"top_p": math.nan}, "top_p"), ({"temperature": -math.inf}, "temperature"),
])
def test_sampler_configs_refuse_non_finite_values(options, named):
    """The Python API names the parameter (the command line spells it as its flag: test_cli)."""
    from unmask.errors import OptionError
    from unmask.sampling import AncestralConfig, SamplerSpec
    from unmask.sampling.ar import ARConfig

    for make in (AncestralConfig, ARConfig, lambda **o: SamplerSpec.from_options(sampler="confidence", **o)):
        with pytest.raises(OptionError, match=f"^{named}=-?(nan|inf) must be a finite number") as refused:
            make(**options)
        assert refused.value.param == named


def test_evaluation_refuses_non_positive_sizes(run):
    import torch

    from unmask.checkpoint import load_model
    from unmask.evaluation import evaluate_checkpoint
    from unmask.likelihood import mc_elbo

    for kwargs, named in [({"batch_size": 0}, "^batch_size=0"), ({"batch_size": -3}, "^batch_size=-3"), ({"draws": 1}, "^draws=1"),
                          ({"windows": 0}, "^windows=0")]:
        with pytest.raises(UnmaskError, match=named):
            evaluate_checkpoint(run["run"], progress=False, **kwargs)
    with pytest.raises(UnmaskError, match="^batch_size=0"):
        mc_elbo(load_model(run["run"])[0], torch.zeros(2, 8, dtype=torch.long), draws=2, batch_size=0)


def test_server_limits_and_experiment_settings_refuse_non_finite_values():
    from unmask.experiments.conditional import Settings as Conditional
    from unmask.experiments.reverse_curse import Settings as ReverseCurse
    from unmask.serve.engine import Limits

    for make, named in [(lambda: Limits(timeout=math.nan), "^timeout=nan"), (lambda: ReverseCurse(cfg_scales=(0.0, math.nan)), "^cfg_scales=nan"),
                        (lambda: Conditional(sft_lr=math.nan), "^sft_lr=nan"), (lambda: Conditional(cfg_scales=(math.inf,)), "^cfg_scales=inf")]:
        with pytest.raises(UnmaskError, match=named):
            make()


@pytest.mark.parametrize("options,named", [({"temperature": math.nan}, "^temperature=nan"), ({"top_p": math.inf}, "^top_p=inf"),
                                           ({"cfg_scale": math.nan}, "^cfg_scale=nan"), ({"batch_size": 0}, "^batch_size=0")])
def test_harness_adapter_refuses_bad_options_before_scoring(run, options, named):
    pytest.importorskip("lm_eval")
    from unmask.evaluation.harness import UnmaskLM

    with pytest.raises(UnmaskError, match=named):
        UnmaskLM(run["run"], **options)


def test_a_parameter_is_spelled_by_the_flag_of_the_command_being_run():
    """``schedule`` is train's --schedule, while sampling has no flag for the sampler option of that
    name; a switch's off side is its own flag."""
    from unmask.cli.spelling import flag_of, invoked_flags

    assert flag_of("schedule", invoked_flags(["train", "--schedule", "x"])) == "--schedule"
    assert flag_of("schedule", invoked_flags(["sample", "--checkpoint", "x"])) == "schedule"
    assert flag_of("windows", invoked_flags(["eval", "ppl"])) == "--windows"
    assert flag_of("no_kv_cache", invoked_flags(["sample"])) == "--no-kv-cache"
    assert invoked_flags(["eval"]) == {} and invoked_flags([]) == {}
    assert flag_of("anneal_steps") == "--anneal-attention" and flag_of("init_std") == "init_std"


def test_an_option_error_survives_pickling():
    """Ranks send it to each other (torch.distributed pickles objects); it arrives whole."""
    import pickle

    from unmask.errors import OptionError

    sent = OptionError("run_dir", "{run_dir} {_dir} is locked; wait or pick another {run_dir}", _dir="/tmp/run")
    got = pickle.loads(pickle.dumps(sent))
    assert (type(got), got.param, got.template, got.values, str(got)) == (OptionError, sent.param, sent.template, sent.values, str(sent))
