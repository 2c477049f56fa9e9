"""Published checkpoints in and out, checked against ``transformers``' own forward passes.

Tiny random LLaMA/Qwen2/Mistral models are built and saved with ``transformers``, imported, and
must give the same logits (fp32) and greedy tokens; exported runs must load natively in
``transformers`` with the same logits. LLaDA and Dream layouts are synthetic folders with their
published tensor names, compared with an independent reference built from ``transformers``
(LLaMA without the causal mask for LLaDA; Qwen2 without it, logits shifted, for Dream).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers  # noqa: E402

from unmask.checkpoint import checkpoint_tokenizer, load_model  # noqa: E402
from unmask.cli.spelling import flag_of  # noqa: E402
from unmask.errors import OptionError, UnmaskError  # noqa: E402
from unmask.interop import Conversion, export_run, import_checkpoint  # noqa: E402
from unmask.model import NEVER_LOGIT, Transformer  # noqa: E402
from unmask.sampling.ar import ARConfig, ar_sample  # noqa: E402

V = 96
TOL = dict(atol=2e-5, rtol=1e-4)
UNMASK = str(Path(sys.executable).with_name("unmask"))  # the installed console script


def unmask(*args) -> subprocess.CompletedProcess:
    """Run the ``unmask`` command as a user does."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([UNMASK, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused command (exit status 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def word_tokenizer(n: int, specials: dict[int, str] | None = None) -> HFTokenizer:
    """A word-level tokenizer with ids 0..n-1: id 0 is <|endoftext|>, ``specials`` name other ids."""
    names = {0: "<|endoftext|>", **(specials or {})}
    vocab = {names.get(i, f"w{i}"): i for i in range(n)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def small(cls_config, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return cls_config(**{**base, **kw})


def save_hf(model, folder, tokenizer: HFTokenizer, shard: str | None = None):
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def random_hf(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random norms and biases too, so a dropped or swapped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    return model


def tokens(b=2, l=12, seed=1, vocab=V):
    return torch.randint(1, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


CAUSAL_CASES = {
    "llama-gqa-tied-llama3rope": lambda: random_hf(
        transformers.LlamaForCausalLM,
        small(
            transformers.LlamaConfig,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=50000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ),
    "qwen2-bias": lambda: random_hf(transformers.Qwen2ForCausalLM, small(transformers.Qwen2Config, num_key_value_heads=2, tie_word_embeddings=False)),
    # a window shorter than the inputs below: attention past it must be Mistral's
    "mistral": lambda: random_hf(transformers.MistralForCausalLM, small(transformers.MistralConfig, num_key_value_heads=1, sliding_window=5)),
    "qwen2-window": lambda: random_hf(
        transformers.Qwen2ForCausalLM,
        small(transformers.Qwen2Config, num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=0),
    ),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_import_causal_models_match_transformers(case, tmp_path):
    hf = CAUSAL_CASES[case]()
    # the LLaMA case is saved in shards to exercise model.safetensors.index.json
    folder = save_hf(hf, tmp_path / "hf", word_tokenizer(V), shard="40KB" if case.startswith("llama") else None)
    if case.startswith("llama"):
        assert (folder / "model.safetensors.index.json").is_file()
    import_checkpoint(folder, tmp_path / "run")
    model, run = load_model(tmp_path / "run")
    assert run.model.causal and run.train.objective == "ar"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, **TOL)
        prompt = tokens(1, 4, seed=3)
        ours = ar_sample(model, prompt, torch.Generator(), ARConfig(max_new_tokens=10, temperature=0.0)).tokens
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    tok = checkpoint_tokenizer(tmp_path / "run")
    assert tok.vocab_size == V and tok.mask_id == V  # MASK appended after the vocabulary


def test_qwen2_config_records_layout_switches(tmp_path):
    folder = save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    cfg = Conversion(folder).config
    assert (cfg.qkv_bias, cfg.n_kv_head, cfg.tie_embeddings, cfg.causal) == (True, 2, False, True)


def test_export_ar_run_loads_natively_in_transformers(tmp_path):
    hf = CAUSAL_CASES["qwen2-bias"]()  # biases, GQA, untied: the LLaMA layout must carry them
    import_checkpoint(save_hf(hf, tmp_path / "hf", word_tokenizer(V)), tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    model, _ = load_model(tmp_path / "run")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x), **TOL)
        torch.testing.assert_close(back(x).logits, hf(x).logits, **TOL)


def test_export_refuses_learned_absolute_positions(tmp_path):
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import ModelConfig, RunConfig, TrainConfig

    cfg = ModelConfig(vocab_size=V, context_len=16, n_layer=1, n_head=2, n_embd=16, causal=True, positions="absolute")
    save_checkpoint(tmp_path / "run", Transformer(cfg), RunConfig(model=cfg, train=TrainConfig(objective="ar")), TrainerState(0, 0),
                    word_tokenizer(V).to_str())
    with pytest.raises(UnmaskError, match="absolute positions has no LLaMA layout"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_trained_ar_run_with_tied_embeddings(tmp_path):
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import ModelConfig, RunConfig, TrainConfig
    from unmask.data import default_tokenizer

    tok = default_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_len=32, n_layer=2, n_head=4, n_embd=32, causal=True, tie_embeddings=True, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "run", model, RunConfig(model=cfg, train=TrainConfig(objective="ar")), TrainerState(0, 0), tok.to_json())
    export_run(tmp_path / "run", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(vocab=tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x), **TOL)


def test_export_mdm_round_trip_and_records_bidirectional(tmp_path):
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import ModelConfig, RunConfig, TrainConfig
    from unmask.data import default_tokenizer

    tok = default_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_len=32, n_layer=2, n_head=4, n_embd=32, qkv_bias=True)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "run", model, RunConfig(model=cfg, train=TrainConfig(objective="mdm")), TrainerState(0, 0), tok.to_json())
    export_run(tmp_path / "run", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["unmask"]["objective"] == "mdm" and meta["unmask"]["bidirectional"] is True
    assert meta["unmask"]["mask_token_id"] == cfg.mask_id and meta["vocab_size"] == cfg.vocab_size + 1
    import_checkpoint(tmp_path / "out", tmp_path / "back")
    again, run = load_model(tmp_path / "back")
    assert run.model == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert meta["model_type"] == "unmask_mdm"  # transformers runs it with the folder's code (tests below)


def test_export_config_describes_the_network_not_the_objective():
    """What a network is published as is read from the network: a bidirectional one is an MDM whatever
    objective trained it (bd3 or any other name), with its MASK row, its remote code, no KV cache and
    the record "objective": "mdm" that `unmask import` reads back (an objective name there is refused)."""
    from unmask.config import ModelConfig
    from unmask.interop.hf_export import hf_config
    from unmask.interop.layouts import MDM_MODEL_TYPE

    cfg = ModelConfig(vocab_size=V, context_len=32, n_layer=2, n_head=4, n_embd=32)
    meta = hf_config(cfg, torch.float32, 0, 0)
    assert (meta["model_type"], meta["vocab_size"], meta["use_cache"], meta["mask_token_id"]) == (MDM_MODEL_TYPE, V + 1, False, V)
    assert "AutoModel" in meta["auto_map"]
    assert meta["unmask"]["objective"] == "mdm" and meta["unmask"]["mask_token_id"] == V


# ---- LLaDA and Dream layouts: synthetic folders with the published tensor names --------------------


def llada_folder(tmp_path, tied=False, qkv_bias=False, mask_id=90):
    """A tiny LLaDA-layout folder and the LLaMA (transformers) model holding the same weights."""
    llama = random_hf(
        transformers.LlamaForCausalLM,
        small(transformers.LlamaConfig, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=qkv_bias),
        seed=5,
    )
    sd = llama.state_dict()
    names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ff_norm": "post_attention_layernorm"}  # fmt: skip
    out = {"model.transformer.wte.weight": sd["model.embed_tokens.weight"], "model.transformer.ln_f.weight": sd["model.norm.weight"]}
    if not tied:
        out["model.transformer.ff_out.weight"] = sd["lm_head.weight"]
    for i in range(2):
        for ours, theirs in names.items():
            out[f"model.transformer.blocks.{i}.{ours}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
        if qkv_bias:
            for p in "qkv":
                out[f"model.transformer.blocks.{i}.{p}_proj.bias"] = sd[f"model.layers.{i}.self_attn.{p}_proj.bias"]
            with torch.no_grad():  # LLaDA has no output bias: zero LLaMA's so the reference matches
                llama.model.layers[i].self_attn.o_proj.bias.zero_()
    folder = tmp_path / "llada"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "mlp_hidden_size": 64, "mlp_ratio": 4, "vocab_size": V, "embedding_size": V, "max_sequence_length": 64, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "weight_tying": tied, "include_bias": False, "include_qkv_bias": qkv_bias, "block_type": "llama",
        "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False, "scale_logits": False,
        "input_emb_norm": False, "attention_layer_norm": False, "clip_qkv": None, "mask_token_id": mask_id,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    word_tokenizer(V, {mask_id: "<|mdm_mask|>"}).save(str(folder / "tokenizer.json"))
    return folder, llama


def bidirectional(hf, x):
    """transformers' forward with every position attending to every other (a 4-D all-True mask)."""
    full = torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool)
    return hf(x, attention_mask=full).logits


@pytest.mark.parametrize("tied,qkv_bias", [(False, False), (True, True)])
def test_llada_layout_imports_as_bidirectional_mdm(tmp_path, tied, qkv_bias):
    folder, llama = llada_folder(tmp_path, tied=tied, qkv_bias=qkv_bias)
    import_checkpoint(folder, tmp_path / "run")  # refuses missing or unexpected tensors
    model, run = load_model(tmp_path / "run")
    cfg = run.model
    assert (cfg.causal, cfg.mask_id, cfg.embed_rows, cfg.shift_logits, run.train.objective) == (False, 90, V, False, "mdm")
    x = tokens()
    x[:, 5] = cfg.mask_id
    with torch.no_grad():
        ours = model(x)
        ref = bidirectional(llama, x)
    keep = torch.arange(V) != cfg.mask_id
    torch.testing.assert_close(ours[..., keep], ref[..., keep], **TOL)
    assert (ours[..., cfg.mask_id] == NEVER_LOGIT).all()  # MASK is never predicted
    # bidirectional: changing the last token changes the first position's logits
    y = x.clone()
    y[:, -1] = (y[:, -1] % (V - 2)) + 1
    with torch.no_grad():
        assert not torch.allclose(model(y)[:, 0], ours[:, 0])
    tok = checkpoint_tokenizer(tmp_path / "run")
    assert (tok.mask_id, tok.vocab_size) == (90, V) and tok.encode("w3 <|mdm_mask|>") == [3, 90]


def dream_folder(tmp_path, mask_id=93):
    qwen = random_hf(transformers.Qwen2ForCausalLM, small(transformers.Qwen2Config, num_key_value_heads=2, rms_norm_eps=1e-6), seed=7)
    folder = tmp_path / "dream"
    qwen.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": mask_id})
    (folder / "config.json").write_text(json.dumps(config))
    word_tokenizer(V - 3, {91: "<|beginoftext|>"}).save(str(folder / "tokenizer.json"))  # MASK (93) is added on import
    return folder, qwen


def test_dream_layout_keeps_the_logit_shift(tmp_path):
    folder, qwen = dream_folder(tmp_path)
    import_checkpoint(folder, tmp_path / "run")
    model, run = load_model(tmp_path / "run")
    cfg = run.model
    assert (cfg.causal, cfg.mask_id, cfg.shift_logits, cfg.qkv_bias) == (False, 93, True, True)
    x = tokens()
    x[:, 4:7] = cfg.mask_id
    with torch.no_grad():
        ours = model(x)
        ref = bidirectional(qwen, x)
    keep = torch.arange(V) != cfg.mask_id
    # position i's logits are the network's output at i - 1; position 0 keeps its own
    torch.testing.assert_close(ours[:, 1:][..., keep], ref[:, :-1][..., keep], **TOL)
    torch.testing.assert_close(ours[:, 0][..., keep], ref[:, 0][..., keep], **TOL)
    # the logit at position i is the network's at i - 1, so it depends on token i - 1 as that
    # position's own token, and position i's own token enters only through attention
    y = x.clone()
    y[:, 8] = (y[:, 8] % (V - 5)) + 1
    with torch.no_grad():
        changed = model(y)
        torch.testing.assert_close(changed[:, 9][..., keep], bidirectional(qwen, y)[:, 8][..., keep], **TOL)
    tok = checkpoint_tokenizer(tmp_path / "run")
    assert (tok.mask_id, tok.vocab_size) == (93, V)


def test_shifted_model_refuses_kv_cache(tmp_path):
    from unmask.model import KVCache

    folder, _ = dream_folder(tmp_path)
    import_checkpoint(folder, tmp_path / "run")
    model, run = load_model(tmp_path / "run")
    cache = KVCache.empty(run.model, 1, 8, "cpu", torch.float32)
    with pytest.raises(UnmaskError, match="shift_logits"):
        model(tokens(1, 4), kv_cache=cache)


def test_import_refuses_foreign_and_incomplete_checkpoints(tmp_path):
    folder, _ = llada_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(OptionError, match="as_ ar: a llada checkpoint is a masked diffusion model; import it with as_ mdm") as wrong:
        import_checkpoint(folder, tmp_path / "a", as_="ar")
    assert wrong.value.param == "as_" and wrong.value.spelled(flag_of).startswith("--as ar: ")  # the command line's spelling
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnmaskError, match="not a supported layout"):
        import_checkpoint(folder, tmp_path / "b")
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(UnmaskError, match="lacks"):
        import_checkpoint(folder, tmp_path / "c")
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 1}))
    with pytest.raises(UnmaskError, match="does not use"):
        import_checkpoint(folder, tmp_path / "d")
    (folder / "config.json").write_text(json.dumps({**config, "scale_logits": True}))
    with pytest.raises(UnmaskError, match="scale_logits"):
        import_checkpoint(folder, tmp_path / "e")
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_import_casts_dtype_on_request(tmp_path):
    folder = save_hf(CAUSAL_CASES["mistral"](), tmp_path / "hf", word_tokenizer(V))
    import_checkpoint(folder, tmp_path / "run", dtype="bfloat16")
    from safetensors import safe_open

    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_cli_import_sample_eval_export(tmp_path, capsys):
    from unmask.cli import main

    folder, _ = dream_folder(tmp_path)
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "logits shifted" in capsys.readouterr().err
    # sampling from the imported MDM: MASK (inside the vocabulary) is never committed
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "w5 w6", "--length", "8", "--steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = [i for s in out["samples"] for i in s["tokens"]]
    assert ids and 93 not in ids
    # the likelihood paths on a shifted model with MASK inside the vocabulary
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"w{(7 * i) % 80 + 1}" for i in range(300)))
    for estimator in ("k-dce", "chain-rule"):
        assert main(["eval", "ppl", "--checkpoint", str(tmp_path / "run"), "--text", str(text), "--draws", "2", "--estimator", estimator, "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert 0 < res["nats_per_token"] < 2 * torch.log(torch.tensor(float(V))).item()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["unmask"]["shift_logits"] is True
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    assert main(["import", str(folder), "--out", str(tmp_path / "r3"), "--dtype", "int8"]) == 2
    assert "--dtype" in capsys.readouterr().err


def test_import_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The converted tensors are written as they are made: earlier ones are freed, never all held."""
    import weakref

    import unmask.interop.hf_import as hf_import

    real = hf_import.write_streaming
    seen = {"peak": 0, "count": 0}

    def watched(items):
        refs = []
        for name, tensor in items:
            seen["peak"] = max(seen["peak"], sum(r() is not None for r in refs))
            refs.append(weakref.ref(tensor))
            seen["count"] += 1
            yield name, tensor

    monkeypatch.setattr(hf_import, "write_streaming", lambda path, specs, items, meta: real(path, specs, watched(items), meta))
    folder = save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    import_checkpoint(folder, tmp_path / "run")
    assert (seen["count"], seen["peak"]) == (1 + 2 * 7 + 1 + 1, 1)  # embed, 7 per layer, norm, head; only the last one alive


# ---- sliding windows: attention, not a shorter context ----------------------------------------------


def test_mistral_sliding_window_is_attention_not_a_shorter_context(tmp_path):
    hf = random_hf(transformers.MistralForCausalLM, small(transformers.MistralConfig, num_key_value_heads=2, sliding_window=16))
    proc = unmask("import", save_hf(hf, tmp_path / "hf", word_tokenizer(V)), "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "context 64, sliding window 16" in proc.stderr
    model, run = load_model(tmp_path / "run")
    assert (run.model.context_len, run.model.sliding_window) == (64, 16)
    x = tokens(l=64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, **TOL)
        prompt = tokens(1, 8, seed=3)  # decoded with the KV cache, 16 positions past the window
        ours = ar_sample(model, prompt, torch.Generator(), ARConfig(max_new_tokens=24, temperature=0.0)).tokens
        theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    with pytest.raises(UnmaskError, match="65 positions.*context_len=64"):
        model(tokens(l=65))


def test_layers_that_mix_full_and_window_attention_are_refused(tmp_path):
    folder = save_hf(CAUSAL_CASES["qwen2-window"](), tmp_path / "hf", word_tokenizer(V))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_window_layers": 1, "layer_types": ["full_attention", "sliding_attention"]}))
    assert "layer_types" in refused(unmask("import", folder, "--out", tmp_path / "run"))
    config.pop("layer_types")  # the older form: layers from max_window_layers on use the window
    (folder / "config.json").write_text(json.dumps({**config, "max_window_layers": 1}))
    assert "max_window_layers" in refused(unmask("import", folder, "--out", tmp_path / "run"))
    (folder / "config.json").write_text(json.dumps({**config, "use_sliding_window": False, "max_window_layers": 1}))
    assert Conversion(folder).config.sliding_window == 0


def test_mistral_as_mdm_has_a_symmetric_window(tmp_path):
    hf = CAUSAL_CASES["mistral"]()  # window 5: an MDM query sees keys at most 4 positions away on either side
    import_checkpoint(save_hf(hf, tmp_path / "hf", word_tokenizer(V)), tmp_path / "run", as_="mdm")
    model, run = load_model(tmp_path / "run")
    assert (run.model.causal, run.model.sliding_window) == (False, 5)
    x = tokens(l=20)
    x[:, 6] = run.model.mask_id
    i = torch.arange(20)
    near = ((i[:, None] - i[None, :]).abs() < 5).expand(2, 1, 20, 20)
    emb = hf.get_input_embeddings()
    with torch.no_grad():  # transformers' Mistral given that mask, MASK's input row appended to its embedding
        hf.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([emb.weight, model.embed.weight[V:]])))
        torch.testing.assert_close(model(x), hf(x, attention_mask=near).logits, **TOL)


@pytest.mark.parametrize("case,cls", [("mistral", "MistralForCausalLM"), ("qwen2-window", "Qwen2ForCausalLM")])
def test_export_windowed_ar_run_keeps_the_window(tmp_path, case, cls):
    hf = CAUSAL_CASES[case]()
    import_checkpoint(save_hf(hf, tmp_path / "hf", word_tokenizer(V)), tmp_path / "run")
    proc = unmask("export", tmp_path / "run", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == cls
    model, _ = load_model(tmp_path / "run")
    x = tokens(l=24)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x), **TOL)
        torch.testing.assert_close(back(x).logits, hf(x).logits, **TOL)


# ---- malformed folders and failed imports ------------------------------------------------------------


def test_malformed_config_json_is_refused_by_name(tmp_path):
    folder = save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    good = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "rope_parameters"}
    cases = {
        "[1, 2]": "config.json must be a JSON object",
        json.dumps({**good, "rope_theta": None}): "rope_theta",
        json.dumps({**good, "num_hidden_layers": "two"}): "num_hidden_layers",
        json.dumps({**good, "rope_scaling": "llama3"}): "rope_scaling",
    }
    for text, named in cases.items():
        (folder / "config.json").write_text(text)
        assert named in refused(unmask("import", folder, "--out", tmp_path / "run"))
        assert not (tmp_path / "run").exists()
    (folder / "config.json").write_text("[1, 2]")
    err = refused(unmask("train", "--run-dir", tmp_path / "t", "--init-from", folder, "--data", tmp_path / "nodata", "--steps", "1"))
    assert "config.json must be a JSON object" in err


def test_failed_import_leaves_nothing_in_out(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int32)  # e.g. a quantized tensor
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert "model.norm.weight" in refused(unmask("import", folder, "--out", tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
    (tmp_path / "mine").mkdir()  # an existing --out that holds no run is still written into, and kept on failure
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    refused(unmask("import", folder, "--out", tmp_path / "mine"))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    assert unmask("import", folder, "--out", tmp_path / "mine").returncode == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["checkpoints", "config.json", "notes.txt"]
    assert "already holds a run" in refused(unmask("import", folder, "--out", tmp_path / "mine"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"] + (["new"] if (tmp_path / "new").exists() else [])


def test_conversion_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import unmask.interop.hf_export as hf_export
    import unmask.interop.hf_import as hf_import
    from unmask.interop.tensors import write_streaming

    def full_disk(path, specs, items, meta):
        def items_then_fail():
            for n, item in enumerate(items):
                if n == 5:
                    raise OSError(28, "No space left on device")
                yield item

        write_streaming(path, specs, items_then_fail(), meta)

    folder = save_hf(CAUSAL_CASES["qwen2-bias"](), tmp_path / "hf", word_tokenizer(V))
    with monkeypatch.context() as patch:
        patch.setattr(hf_import, "write_streaming", full_disk)
        with pytest.raises((OSError, UnmaskError), match="No space"):
            import_checkpoint(folder, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    import_checkpoint(folder, tmp_path / "run")
    monkeypatch.setattr(hf_export, "write_streaming", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


# ---- exported MDMs load in transformers as bidirectional models (custom code), never as causal ones ----


def trained_layout_mdm(tmp_path):
    """A run in the trained layout: MASK an extra input row, q/k/v biases, grouped-query attention, tied head."""
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import ModelConfig, RunConfig, TrainConfig

    cfg = ModelConfig(vocab_size=V, context_len=32, n_layer=2, n_head=4, n_embd=32, qkv_bias=True, n_kv_head=2, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norms and biases away from 1 and 0
    save_checkpoint(tmp_path / "run", model, RunConfig(model=cfg, train=TrainConfig(objective="mdm")), TrainerState(0, 0), word_tokenizer(V).to_str())
    return tmp_path / "run"


def dream_run(tmp_path):
    import_checkpoint(dream_folder(tmp_path)[0], tmp_path / "run")
    return tmp_path / "run"


def windowed_mdm_run(tmp_path):
    import_checkpoint(save_hf(CAUSAL_CASES["mistral"](), tmp_path / "hf", word_tokenizer(V)), tmp_path / "run", as_="mdm")
    return tmp_path / "run"


MDM_RUNS = {"trained-layout": trained_layout_mdm, "dream-shift-mask-inside": dream_run, "mistral-window": windowed_mdm_run}


@pytest.mark.parametrize("case", sorted(MDM_RUNS))
def test_exported_mdm_loads_bidirectional_with_remote_code(tmp_path, case):
    run = MDM_RUNS[case](tmp_path)
    proc = unmask("export", run, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    model, cfg = load_model(run)
    cfg = cfg.model
    hf = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    x = tokens(l=16)
    x[:, 3:6] = cfg.mask_id
    pad = torch.ones_like(x, dtype=torch.bool)
    pad[1, :4] = False  # a padded row: no query attends to the padding
    with torch.no_grad():
        ours, theirs = model(x, key_mask=pad), hf(x, attention_mask=pad.long()).logits
    keep = torch.arange(cfg.vocab_size) != cfg.mask_id
    torch.testing.assert_close(theirs[..., : cfg.vocab_size][..., keep], ours[..., keep], **TOL)
    assert (theirs[..., cfg.mask_id] == float("-inf")).all()  # MASK is never predicted
    assert theirs.shape[-1] == cfg.embed_rows
    with torch.no_grad():  # without padding, an all-ones mask and no mask agree
        torch.testing.assert_close(hf(x).logits, hf(x, attention_mask=torch.ones_like(x)).logits)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_exported_mdm_is_never_loaded_as_a_causal_model(tmp_path):
    run = trained_layout_mdm(tmp_path)
    assert unmask("export", run, "--out", tmp_path / "out").returncode == 0
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    records = Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert any("unmask_mdm" in m for m in records.messages), records.messages


# ---- exported folders carry their tokenizer and generation settings ---------------------------------


def counting_ar_run(tmp_path):
    """An AR run that surely emits EOS: with zero attention/MLP outputs and a one-hot embedding, the
    next token is a function of the current one: w1 -> w2 -> ... -> w10 -> EOS (id 0)."""
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import ModelConfig, RunConfig, TrainConfig

    cfg = ModelConfig(vocab_size=V, context_len=64, n_layer=1, n_head=4, n_embd=128, causal=True)
    model = Transformer(cfg)
    nxt = [i + 1 for i in range(V)]
    nxt[10], nxt[V - 1] = 0, 1
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(V + 1, 128))
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].mlp.down.weight.zero_()
        model.head.weight.zero_()
        model.head.weight[nxt, torch.arange(V)] = 1.0
    save_checkpoint(tmp_path / "run", model, RunConfig(model=cfg, train=TrainConfig(objective="ar")), TrainerState(0, 0), word_tokenizer(V).to_str())
    return tmp_path / "run", model


def test_exported_ar_run_generates_until_eos_in_transformers(tmp_path):
    run, model = counting_ar_run(tmp_path)
    assert unmask("export", run, "--out", tmp_path / "out").returncode == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = tok("w3", return_tensors="pt")["input_ids"]
    assert prompt.tolist() == [[3]]
    with torch.no_grad():
        ours = ar_sample(model, prompt, torch.Generator(), ARConfig(max_new_tokens=8, temperature=0.0)).tokens
        out = hf.generate(prompt, max_new_tokens=20, do_sample=False)  # EOS and padding from generation_config.json
    assert out[0].tolist() == ours[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert tok.decode(out[0], skip_special_tokens=True) == "w3 w4 w5 w6 w7 w8 w9 w10"


def test_exported_mdm_tokenizer_names_mask(tmp_path):
    assert unmask("export", trained_layout_mdm(tmp_path), "--out", tmp_path / "out").returncode == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token, tok.mask_token_id) == (0, 0, "<|mask|>", V)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mask_token_id"] == V
