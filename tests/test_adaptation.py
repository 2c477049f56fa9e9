"""AR -> MDM adaptation: initialised weights, the kept shift, the annealed attention mask."""

import dataclasses
import json

import pytest
import torch

from unmask.adaptation import adapted_config, annealed_mask, initial_weights, source_config
from unmask.checkpoint import TrainerState, load_model, save_checkpoint
from unmask.cli import main
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.data import TokenDataset
from unmask.errors import UnmaskError
from unmask.model import Transformer
from unmask.train import train


def ar_run(tmp_path, vocab=512, tok_json=None):
    cfg = ModelConfig(vocab_size=vocab, context_len=32, n_layer=2, n_head=4, n_embd=64, causal=True, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "ar", model, RunConfig(model=cfg, train=TrainConfig(objective="ar")), TrainerState(0, 0), tok_json)
    return model


def test_causal_mask_and_kept_shift_reproduce_the_ar_model(tmp_path):
    ar = ar_run(tmp_path)
    cfg = adapted_config(source_config(tmp_path / "ar"), keep_shift=True)
    assert (cfg.causal, cfg.shift_logits, cfg.n_kv_head) == (False, True, 2)
    mdm = Transformer(cfg).eval()
    mdm.load_state_dict(initial_weights(tmp_path / "ar", cfg))
    x = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    x[:, 7:12] = cfg.mask_id  # also with MASK tokens in the input
    start = annealed_mask(0, 100, 32, seed=0)
    with torch.no_grad():
        ours, theirs = mdm(x, attn_mask=start), ar(x)
        torch.testing.assert_close(ours[:, 1:], theirs[:, :-1], atol=1e-5, rtol=1e-5)
        # without the annealing mask the network is bidirectional: position 1 now sees the future
        assert not torch.allclose(mdm(x)[:, 1:], theirs[:, :-1], atol=1e-3)
        # without the shift, position i's logits are the AR model's at i (predicting token i + 1)
        plain = Transformer(dataclasses.replace(cfg, shift_logits=False)).eval()
        plain.load_state_dict(mdm.state_dict())
        torch.testing.assert_close(plain(x, attn_mask=start), theirs, atol=1e-5, rtol=1e-5)


def test_annealed_mask_runs_from_causal_to_bidirectional():
    n, length = 100, 64
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(annealed_mask(0, n, length, seed=3), causal)
    assert annealed_mask(n, n, length, seed=3) is None and annealed_mask(n + 5, n, length, seed=3) is None
    future = ~causal
    for step in (25, 50, 75):
        m = annealed_mask(step, n, length, seed=3)
        assert (m & causal).sum() == causal.sum()  # the causal part stays visible
        assert abs(m[future].float().mean().item() - step / n) < 0.05
        assert torch.equal(m, annealed_mask(step, n, length, seed=3))  # a function of (seed, step)
    assert not torch.equal(annealed_mask(50, n, length, seed=3), annealed_mask(50, n, length, seed=4))


def test_init_from_loads_the_source_weights(tmp_path, small_data):
    tok = TokenDataset(small_data, "train").tokenizer
    ar = ar_run(tmp_path, vocab=tok.vocab_size, tok_json=tok.to_json())
    cfg = adapted_config(source_config(tmp_path / "ar"), keep_shift=True)
    tiny_lr = dict(steps=1, batch_size=4, lr=1e-12, warmup_steps=0, eval_every=1000, checkpoint_every=1000, log_every=1, eval_windows=2, eval_draws=2)
    train(tmp_path / "mdm", cfg, TrainConfig(objective="mdm", init_from=str(tmp_path / "ar"), anneal_steps=10, **tiny_lr), small_data, progress=False)
    adapted, run = load_model(tmp_path / "mdm")
    assert run.train.init_from == str(tmp_path / "ar") and run.model.shift_logits
    for name, weight in ar.state_dict().items():  # one step at lr 1e-12 leaves the source's weights
        torch.testing.assert_close(adapted.state_dict()[name], weight, atol=1e-9, rtol=0)
    with pytest.raises(UnmaskError, match="n_layer"):
        initial_weights(tmp_path / "ar", dataclasses.replace(cfg, n_layer=3))


def test_cli_adapts_an_ar_run(tmp_path, small_data):
    tok = TokenDataset(small_data, "train").tokenizer
    ar_run(tmp_path, vocab=tok.vocab_size, tok_json=tok.to_json())
    common = ["--data", str(small_data), "--batch-size", "4", "--eval-every", "1000", "--log-every", "1", "--checkpoint-every", "1000"]
    assert main(["train", "--run-dir", str(tmp_path / "m"), "--objective", "mdm", "--init-from", str(tmp_path / "ar"),
                 "--keep-shift", "--anneal-attention", "3", "--steps", "4", *common]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["shift_logits"] and not saved["model"]["causal"] and saved["train"]["adapt"]["anneal_steps"] == 3
    assert main(["train", "--run-dir", str(tmp_path / "x"), "--keep-shift", "--steps", "2", *common]) == 2
    assert main(["train", "--run-dir", str(tmp_path / "y"), "--objective", "ar", "--anneal-attention", "3", "--steps", "2", *common]) == 2


def test_init_from_a_published_folder(tmp_path):
    """--init-from a LLaMA folder saved by transformers: converted in memory, the same weights as `unmask import`."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.data import prepare_dataset
    from unmask.interop import import_checkpoint

    vocab = 64
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32))  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    words = HFTokenizer(models.WordLevel({("<|endoftext|>" if i == 0 else f"w{i}"): i for i in range(vocab)}, unk_token="<|endoftext|>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_checkpoint(tmp_path / "hf", tmp_path / "imported")
    tok = checkpoint_tokenizer(tmp_path / "imported")
    docs = [" ".join(f"w{(i * j) % 63 + 1}" for i in range(200)) for j in range(1, 9)]
    data = prepare_dataset(tmp_path / "data", tok, docs[:7], docs[7:], progress=False)
    cfg = adapted_config(source_config(tmp_path / "hf"), keep_shift=True)
    tiny_lr = dict(steps=1, batch_size=2, lr=1e-12, warmup_steps=0, eval_every=1000, checkpoint_every=1000, log_every=1, eval_windows=2, eval_draws=2)
    train(tmp_path / "mdm", cfg, TrainConfig(objective="mdm", init_from=str(tmp_path / "hf"), anneal_steps=5, **tiny_lr), data, progress=False)
    adapted, _ = load_model(tmp_path / "mdm")
    imported, _ = load_model(tmp_path / "imported")
    for name, weight in imported.state_dict().items():
        torch.testing.assert_close(adapted.state_dict()[name], weight, atol=1e-9, rtol=0)
