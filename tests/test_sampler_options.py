"""Every entry point that samples takes the same sampler options from one place, and each sampler
keeps its own defaults unless an option is given."""

import json

import click
import pytest
import typer

from unmask.cli import main
from unmask.cli.app import app
from unmask.cli.sampler_options import OPTIONS
from unmask.generation import generate
from unmask.sampling import SamplerSpec


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("runs")
    for objective in ("mdm", "ar"):
        assert main([
            "train", "--run-dir", str(root / objective), "--objective", objective, "--data", str(small_data),
            "--steps", "2", "--batch-size", "2", "--context-len", "32", "--eval-every", "2", "--checkpoint-every", "2",
        ]) == 0
    return root


def _command(*path: str) -> click.Command:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", [("sample",), ("eval", "genppl"), ("eval", "harness")])
def test_every_sampling_command_takes_every_sampler_option(path):
    params = {p.name: p for p in _command(*path).params}
    for name in OPTIONS:
        assert name in params, f"{' '.join(path)} lacks {name}"
        assert params[name].default is None  # not given: the sampler's own default
    reference = {p.name: p.opts for p in _command("sample").params}
    assert all(params[name].opts == reference[name] for name in OPTIONS)


@pytest.fixture
def specs(monkeypatch):
    """The SamplerSpec every MDM decoding runs with."""
    seen = []
    original = SamplerSpec.run

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SamplerSpec, "run", spy)
    return seen


def test_threshold_decodes_at_its_own_temperature_unless_one_is_given(capsys, trained, specs):
    for extra, temperature in (([], 0.0), (["--temperature", "0.7"], 0.7)):
        assert main(["sample", "--checkpoint", str(trained / "mdm"), "--length", "8", "--sampler", "threshold", *extra]) == 0
        assert specs[-1].config.temperature == temperature
    assert main(["sample", "--checkpoint", str(trained / "mdm"), "--length", "8", "--sampler", "confidence", "--steps", "4"]) == 0
    assert specs[-1].config.temperature == 1.0 and specs[-1].config.top_p == 1.0 and specs[-1].config.precision == "float64"


def test_genppl_decodes_with_the_given_sampler_and_cache(capsys, trained, specs):
    code = main(["eval", "genppl", "--checkpoint", str(trained / "mdm"), "--judge", str(trained / "ar"), "--num-samples", "2",
                 "--length", "8", "--sampler", "confidence", "--steps", "4", "--block-len", "4", "--cache", "dual", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    spec = specs[-1]
    assert spec.sampler == "confidence" and spec.config.steps == 4 and spec.block_len == 4 and spec.cache.kind == "dual"
    assert record["sampling"] == {"sampler": "confidence", "steps": 4, "block_len": 4, "cache": "dual"}
    assert record["nfe"] == 4 and record["generated_tokens"] == 16


def test_harness_generation_takes_the_sampler_options(trained, specs):
    pytest.importorskip("lm_eval")
    from unmask.evaluation.harness import UnmaskLM

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = UnmaskLM(trained / "mdm", sampler="threshold", tau=0.5, block_len=4, cache="prefix", seed=3)
    [text] = lm.generate_until([Req("KING", {"until": [], "max_gen_toks": 8})])
    spec = specs[-1]
    assert spec.sampler == "threshold" and spec.config.tau == 0.5 and spec.cache.kind == "prefix" and spec.config.temperature == 0.0
    # the same decoding as `unmask sample` with the same options and seed
    ours = generate(trained / "mdm", "KING", 1, 8, seed=3, sampler="threshold", tau=0.5, block_len=4, cache="prefix")
    assert ours["samples"][0]["text"] == "KING" + text


@pytest.mark.parametrize("flags,message", [
    (["--cache-refresh", "2"], "--cache-refresh=2 needs a cache"),
    (["--cache", "lru"], "--cache 'lru' is not one of"),
    (["--sampler", "first-hitting", "--steps", "8"], "--steps: not an option of --sampler first-hitting"),
    (["--sampler", "confidence", "--tau", "0.5"], "--tau: not an option of --sampler confidence"),
])
def test_bad_sampler_options_name_the_flag(capsys, trained, flags, message):
    assert main(["sample", "--checkpoint", str(trained / "mdm"), "--length", "8", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cache_on_an_ar_checkpoint_is_refused(capsys, trained):
    assert main(["sample", "--checkpoint", str(trained / "ar"), "--length", "8", "--cache", "dual"]) == 2
    assert "--cache" in capsys.readouterr().err


NEW_OPTION = '''
import contextlib, io, json, sys
from unmask.sampling.options import OPTIONS, Option, check_value

OPTIONS["jitter"] = Option("jitter", int, "A new option, declared in the table only.", rule=">= 1", field="jitter")

from unmask.cli import main
from unmask.errors import OptionError
from unmask.sampling import SamplerSpec

out = {}
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    main(["sample", "--help"])
out["help"] = help_text.getvalue()
with contextlib.redirect_stderr(io.StringIO()) as err:
    out["usage_code"] = main(["sample", "--checkpoint", sys.argv[1], "--jitter", "0"])
out["usage"] = err.getvalue()
for make in (lambda: SamplerSpec.from_options("confidence", jitter=2), lambda: check_value(OPTIONS["jitter"], 0)):
    try:
        make()
    except OptionError as exc:
        out.setdefault("refused", []).append([exc.param, str(exc)])
try:
    from unmask.serve.schemas import CompletionRequest, sampler_options
except ImportError:  # no [serve] extra
    pass
else:
    out["field"] = CompletionRequest.model_json_schema()["properties"].get("jitter")
    out["given"] = sampler_options(CompletionRequest(model="m", prompt="x", jitter=2))
print(json.dumps(out))
'''


def test_an_option_added_to_the_table_reaches_the_cli_the_checks_and_the_server(trained):
    """One entry in the option table, nothing else: the flag, its range (a usage error), the library's
    checks naming it, and the server's request field with its range and description."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NEW_OPTION, str(trained / "mdm")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "--jitter" in out["help"] and "A new option" in out["help"]
    assert out["usage_code"] == 2 and "--jitter" in out["usage"]
    assert out["refused"] == [["jitter", "jitter: not an option of sampler confidence, which takes steps, score, allocation, cfg_scale, "
                                         "temperature, top_k, top_p, precision"],
                              ["jitter", "jitter=0 must be an integer >= 1"]]
    if "field" in out:
        assert out["field"]["description"].startswith("A new option") and {"minimum": 1, "type": "integer"} in out["field"]["anyOf"]
        assert out["given"] == {"jitter": 2}


def test_errors_name_the_parameter_and_each_caller_spells_it():
    """The library names an option by its parameter; the command line spells it as its flag, the
    server as its request field, from the same table."""
    from unmask.cli.spelling import flag_of
    from unmask.errors import OptionError

    with pytest.raises(OptionError) as refused:
        SamplerSpec.from_options("threshold", tau=1.5, block_len=2)
    exc = refused.value
    assert exc.param == "tau" and str(exc) == "tau=1.5 must be in (0, 1]"
    assert exc.spelled(flag_of) == "--tau=1.5 must be in (0, 1]"
    schemas = pytest.importorskip("unmask.serve.schemas", reason="the server's field names need the [serve] extra")
    assert exc.spelled(schemas.field_of) == "threshold=1.5 must be in (0, 1]" and schemas.field_of("block_len") == "block_length"
    with pytest.raises(OptionError) as refused:
        SamplerSpec.from_options("first-hitting", steps=8, cfg_scale=1.0)
    assert refused.value.param == "steps" and refused.value.spelled(flag_of).startswith("--steps: not an option of --sampler first-hitting")
