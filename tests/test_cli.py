"""The command line: a tiny end-to-end run, and one clear error line for each kind of bad input."""

import dataclasses
import json

import pytest

from unmask.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """One tiny MDM and AR run made through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    for objective in ("mdm", "ar"):
        code = main([
            "train", "--run-dir", str(root / objective), "--objective", objective, "--data", str(small_data),
            "--steps", "4", "--batch-size", "4", "--context-len", "32", "--eval-every", "4", "--checkpoint-every", "4",
        ])
        assert code == 0
    return root


def test_eval_json_keys(capsys, trained):
    code, out, _ = run(capsys, "eval", "ppl", "--checkpoint", str(trained / "mdm"), "--windows", "3", "--draws", "4", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["kind"] == "elbo" and res["stderr"] > 0 and res["num_tokens"] == 3 * 32 and res["draws"] == 4
    code, out, _ = run(capsys, "eval", "ppl", "--checkpoint", str(trained / "ar"), "--windows", "3", "--json")
    res_ar = json.loads(out)
    assert res_ar["kind"] == "exact" and res_ar["num_tokens"] == res["num_tokens"]


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_sample_json(capsys, trained, objective):
    steps = ["--steps", "4"] if objective == "mdm" else []  # an AR model takes one step per token
    code, out, err = run(capsys, "sample", "--checkpoint", str(trained / objective), "--prompt", "KING", "--length", "8",
                         *steps, "--num-samples", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["samples"]) == 2 and all(len(s["tokens"]) == 8 for s in res["samples"])
    assert all(s["text"].startswith("KING") for s in res["samples"])
    assert res["nfe"] == (4 if objective == "mdm" else 8)


def test_presets_lists_counts(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "tiny" in out and "1b" in out


def test_missing_checkpoint_folder(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "ppl", "--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "nope" in err and "does not exist" in err


def test_corrupt_safetensors(capsys, trained, tmp_path):
    import shutil

    from unmask.checkpoint import resolve_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(resolve_checkpoint(trained / "mdm"), bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, err = run(capsys, "sample", "--checkpoint", str(bad))
    assert code == 2 and "model.safetensors" in err and "safetensors" in err


def test_prompt_longer_than_context(capsys, trained):
    code, _, err = run(capsys, "sample", "--checkpoint", str(trained / "mdm"), "--prompt", "word " * 100, "--length", "8")
    assert code == 2 and "--prompt" in err and "context of 32" in err


def test_unknown_preset(capsys, tmp_path, small_data):
    code, _, err = run(capsys, "train", "--run-dir", str(tmp_path / "r"), "--preset", "giant", "--data", str(small_data))
    assert code == 2 and "unknown preset 'giant'" in err and "tiny" in err


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, "data", "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out"))
    assert code == 2 and "empty" in err.lower()


def test_prepare_one_big_text_file(capsys, tmp_path):
    (tmp_path / "my_corpus.txt").write_text("".join(f"Line {i:03d} of the only file, with some words in it.\n" for i in range(400)))
    code, out, err = run(capsys, "data", "prepare", str(tmp_path / "my_corpus.txt"), "--out", str(tmp_path / "mine"))
    assert code == 0, err
    assert "validation: the last 5.0% of the text of the single document (from line 381)" in out
    assert json.loads((tmp_path / "mine" / "meta.json").read_text())["splits"]["val"]["num_tokens"] > 0


def test_help_shows_extras_as_typed(capsys):
    """The help renderer must not eat the square brackets of an extra (`unmask[hf]`)."""
    for group in (["data", "prepare"], ["eval", "ppl"], ["eval", "harness"], ["eval", "genppl"], ["sample"], ["train"], []):
        code, out, _ = run(capsys, *group, "--help")
        text = " ".join(out.split())  # undo the line wrapping
        assert code == 0 and "Usage: unmask" in text and "'unmask'" not in text, group
    code, out, _ = run(capsys, "data", "prepare", "--help")
    assert "pip install 'unmask[hf]'" in " ".join(out.split())


def test_non_utf8_file(capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    code, _, err = run(capsys, "data", "prepare", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "out"))
    assert code == 2 and "latin1.txt" in err and "UTF-8" in err


def test_bad_objective_names_flag(capsys, tmp_path, small_data):
    code, _, err = run(capsys, "train", "--run-dir", str(tmp_path / "r"), "--objective", "gan", "--data", str(small_data))
    assert code == 2 and "--objective 'gan'" in err


@pytest.mark.parametrize("flags,nfe", [
    (["--sampler", "cached", "--steps", "16"], None),
    (["--sampler", "first-hitting"], 8),
    (["--sampler", "first-hitting", "--k", "4"], 2),
    (["--sampler", "confidence", "--score", "margin", "--steps", "4", "--block-len", "4", "--temperature", "0"], 4),
    (["--sampler", "threshold", "--tau", "0.5", "--block-len", "4"], None),
    (["--sampler", "ancestral", "--steps", "4", "--cfg", "1.5", "--top-k", "50", "--top-p", "0.9"], 4),
])
def test_sample_every_family(capsys, trained, flags, nfe):
    code, out, err = run(capsys, "sample", "--checkpoint", str(trained / "mdm"), "--prompt", "KING", "--length", "8", "--json", *flags)
    assert code == 0, err
    res = json.loads(out)
    assert all(len(s["tokens"]) == 8 and s["text"].startswith("KING") for s in res["samples"])
    assert nfe is None or res["nfe"] == nfe
    assert all(4096 not in s["tokens"] for s in res["samples"])  # no MASK left


def test_sample_infill_prompts_file_and_eos(capsys, trained, tmp_path):
    code, out, err = run(capsys, "sample", "--checkpoint", str(trained / "mdm"), "--infill", "ROMEO. [MASK:5] love [MASK]", "--json",
                         "--sampler", "first-hitting")
    assert code == 0, err
    assert all(s["text"].startswith("ROMEO.") and " love" in s["text"] for s in json.loads(out)["samples"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("KING\nO Romeo, Romeo, wherefore\n")
    for ckpt in ("mdm", "ar"):
        code, out, err = run(capsys, "sample", "--checkpoint", str(trained / ckpt), "--prompts-file", str(prompts), "--length", "6",
                             "--stop-at-eos", "--json")
        assert code == 0, err
        texts = [s["text"] for s in json.loads(out)["samples"]]
        assert texts[0].startswith("KING") and texts[1].startswith("O Romeo") and len(texts) == 2


@pytest.mark.parametrize("flags,message", [
    (["--block-len", "3"], "--block-len=3 must divide"),
    (["--sampler", "threshold", "--tau", "0"], "--tau=0.0 must be in (0, 1]"),
    (["--sampler", "magic"], "--sampler 'magic'"),
    (["--cfg", "1.0", "--prompt", ""], "--cfg needs a prompt"),
    (["--infill", "no spans here"], "no [MASK]"),
])
def test_sample_bad_combinations(capsys, trained, flags, message):
    code, _, err = run(capsys, "sample", "--checkpoint", str(trained / "mdm"), "--length", "8", *flags)
    assert code == 2 and message in err, err


def _canvases(checkpoint, **kwargs):
    """generate() on a checkpoint, recording every canvas the sampler shows the callback."""
    from unmask.generation import generate

    seen = []
    res = generate(checkpoint, num_samples=2, length=8, callback=lambda state: seen.append(state.tokens.clone()), **kwargs)
    return res, seen


@pytest.mark.parametrize("objective", ["mdm", "ar"])
@pytest.mark.parametrize("kwargs", [{"prompt": "KING"}, {"prompt": ""}, {"prompts": ["KING", "O Romeo, Romeo"]}])
def test_both_models_are_conditioned_on_the_document_separator(trained, objective, kwargs):
    """MDM and AR canvases start with EOS (the document separator of training and of the harness),
    then the prompt; the generated tokens and text exclude it."""
    from unmask.checkpoint import checkpoint_tokenizer

    tok = checkpoint_tokenizer(trained / objective)
    res, seen = _canvases(trained / objective, **kwargs)
    prompts = kwargs.get("prompts") or [kwargs["prompt"]] * 2
    for row, prompt in enumerate(prompts):
        ids = [tok.eos_id] + tok.encode(prompt)
        for canvas in seen:
            real = canvas[row][canvas[row] != tok.pad_id].tolist() if len(set(map(len, prompts))) > 1 else canvas[row].tolist()
            assert real[: len(ids)] == ids, (row, real)
        sample = res["samples"][row]
        assert len(sample["tokens"]) == 8 and sample["text"].startswith(prompt) and "<|eos|>" not in sample["text"]


def test_infill_canvas_starts_with_the_document_separator(trained):
    from unmask.checkpoint import checkpoint_tokenizer

    tok = checkpoint_tokenizer(trained / "mdm")
    res, seen = _canvases(trained / "mdm", infill="ROMEO. [MASK:3] love", sampler="first-hitting")
    assert all(canvas[:, 0].tolist() == [tok.eos_id] * 2 for canvas in seen)
    assert all(s["text"].startswith("ROMEO.") and s["text"].endswith(" love") and s["tokens"][0] != tok.eos_id for s in res["samples"])


def test_sample_matches_the_harness_conditioning(trained):
    """`unmask sample` and the lm-eval adapter build the same MDM canvas: same seed, same tokens."""
    pytest.importorskip("lm_eval")
    from unmask.evaluation.harness import UnmaskLM
    from unmask.generation import generate

    class Req:
        def __init__(self, *args):
            self.args = args

    for objective in ("mdm", "ar"):
        lm = UnmaskLM(trained / objective, steps=8, seed=3)
        [harness_text] = lm.generate_until([Req("KING", {"until": [], "max_gen_toks": 8})])
        ours = generate(trained / objective, "KING", 1, 8, steps=8, temperature=0.0, seed=3)["samples"][0]["text"]
        assert ours == "KING" + harness_text, objective


@pytest.mark.parametrize("flags,named", [
    (["--sampler", "first-hitting"], "--sampler"),
    (["--sampler", "ancestral"], "--sampler"),
    (["--steps", "4"], "--steps"),
    (["--block-len", "4"], "--block-len"),
    (["--cfg", "1.0"], "--cfg"),
    (["--k", "2"], "--k"),
    (["--score", "margin"], "--score"),
    (["--allocation", "schedule"], "--allocation"),
    (["--tau", "0.5"], "--tau"),
    (["--infill", "ROMEO. [MASK:3] love"], "--infill"),
])
def test_mdm_options_on_an_ar_checkpoint_are_refused(capsys, trained, flags, named):
    code, _, err = run(capsys, "sample", "--checkpoint", str(trained / "ar"), "--prompt", "KING", "--length", "8", *flags)
    assert code == 2 and named in err and "AR" in err, err


def test_options_with_an_ar_meaning_are_applied(capsys, trained):
    # --steps equal to --length is what an AR model does (one token per call); top-k 1 is greedy
    outs = []
    for seed in ("0", "1"):
        code, out, err = run(capsys, "sample", "--checkpoint", str(trained / "ar"), "--prompt", "KING", "--length", "8", "--steps", "8",
                             "--top-k", "1", "--seed", seed, "--json")
        assert code == 0, err
        outs.append([s["tokens"] for s in json.loads(out)["samples"]])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]  # greedy: the same tokens for every seed and row
    code, _, err = run(capsys, "sample", "--checkpoint", str(trained / "mdm"), "--length", "8", "--no-kv-cache")
    assert code == 2 and "--no-kv-cache" in err and "MDM" in err, err


def test_generators_live_on_the_model_device(monkeypatch, trained, generator_devices):
    """Samplers draw on the model's device, so their generator must be made there (a CPU generator
    fails on CUDA). No GPU here: the model is made to report another device, and every generator
    handed to a sampler must have been created for that device."""
    import torch

    import unmask.sampling.decoding as decoding_mod
    import unmask.sampling.spec as spec_mod
    from unmask.generation import generate

    made = generator_devices
    monkeypatch.setattr(decoding_mod, "device_of", lambda model: torch.device("cuda"))
    used = []
    for name in ("ancestral", "first-hitting"):
        sampler = spec_mod.SAMPLERS[name]

        def spy(model, state, generator, *args, _step=sampler.step, _name=name, **kwargs):
            used.append((_name, made.get(id(generator))))
            return _step(model, state, generator, *args, **kwargs)

        monkeypatch.setitem(spec_mod.SAMPLERS, name, dataclasses.replace(sampler, step=spy))
    monkeypatch.setattr(decoding_mod, "ar_sample", lambda model, x, generator, *a, _f=decoding_mod.ar_sample, **k: used.append(("ar", made.get(id(generator)))) or _f(model, x, generator, *a, **k))
    generate(trained / "mdm", "KING", length=8)
    generate(trained / "mdm", "KING", length=8, sampler="first-hitting")
    generate(trained / "ar", "KING", length=8)
    assert {name for name, _ in used} == {"ancestral", "first-hitting", "ar"}
    assert all(device == "cuda" for _, device in used)
