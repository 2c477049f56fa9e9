"""The objective protocol: the built-in objectives are registered by name, and an objective added in
one file (here: in this test) trains through the one loop, validates and resumes exactly."""

import json

import pytest
import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.errors import UnmaskError
from unmask.likelihood import LikelihoodResult, mc_elbo
from unmask.losses import Corruption, dce_loss
from unmask.objectives import OBJECTIVES, Batch, Objective, objective_for
from unmask.objectives.base import VALIDATION_SEED
from unmask.schedule import add_noise

RATE = 0.15


class MaskedLM(Objective):
    """BERT-style masked language modelling, the example of docs/extending.md: every token masked with
    probability RATE and the loss the mean cross-entropy over the masked tokens (no bound, so the
    held-out number is the MDM's k-DCE bound)."""

    name = "mlm"
    defaults = {"lr": 2e-3, "loss": "k-dce"}  # loss: the estimator of the bound reported (and of `eval ppl`)

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> Corruption:
        x0 = batch.tokens[:, 1:]
        b, length = x0.shape
        xt, masked = add_noise(x0, torch.full((b,), RATE), self.model.mask_id, generator)
        return Corruption(xt, masked, torch.full((b,), RATE), length / masked.sum(dim=1).clamp(min=1).float())

    def loss(self, model, batch: Batch, noise: Corruption) -> torch.Tensor:
        return dce_loss(model, batch.tokens[:, 1:], noise)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return mc_elbo(model, held_out.tokens[:, 1:], draws=self.train.eval_draws, estimator="k-dce", schedule=self.schedule,
                       batch_size=batch_size, seed=VALIDATION_SEED)


@pytest.fixture
def mlm(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, MaskedLM.name, MaskedLM)  # what register() does, undone after the test
    return MaskedLM


def test_the_built_in_objectives_are_registered_by_name():
    assert list(OBJECTIVES)[:4] == ["mdm", "ar", "bd3", "sft"] and "sdtt" in OBJECTIVES  # the later ones in their modules' order
    model = ModelConfig(vocab_size=64, context_len=16, n_layer=1, n_head=2, n_embd=16)
    picked = {name: type(objective_for(cfg, model)).name for name, cfg in [
        ("mdm", TrainConfig()), ("ar", TrainConfig(objective="ar")), ("bd3", TrainConfig(objective="bd3", block_size=4)),
        ("sft", TrainConfig(objective="ar", sft=True)), ("sft", TrainConfig(objective="mdm", sft=True, cfg_dropout=0.1))]}
    assert picked == {"mdm": "mdm", "ar": "ar", "bd3": "bd3", "sft": "sft"}
    with pytest.raises(UnmaskError, match="objective 'sft' is not one of: mdm, ar, bd3"):  # fine-tuning is the sft section
        TrainConfig(objective="sft")


def test_an_objective_in_one_file_trains_validates_and_resumes_through_the_loop(mlm, tmp_path, small_data):
    from unmask.train import train

    cfg = TrainConfig(objective="mlm", steps=8, batch_size=8, warmup_steps=2, eval_every=4, eval_windows=2, eval_draws=2,
                      log_every=1, checkpoint_every=4)
    assert (cfg.lr, cfg.loss) == (2e-3, "k-dce")  # its defaults
    model = ModelConfig(vocab_size=512, context_len=32, n_layer=1, n_head=2, n_embd=32)
    full = train(tmp_path / "full", model, cfg, small_data, device="cpu", progress=False)
    assert sum(full.losses[-2:]) < sum(full.losses[:2])
    val = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in val] == [4, 8] and all(v["val_stderr"] > 0 for v in val)  # a k-DCE bound, with its SE
    first = train(tmp_path / "split", model, cfg, small_data, device="cpu", progress=False, stop_after=3)
    second = train(tmp_path / "split", model, cfg, small_data, device="cpu", resume=True, progress=False)
    assert first.losses + second.losses == full.losses
    with pytest.raises(UnmaskError, match="needs causal=False"):  # the protocol's checks come with it
        train(tmp_path / "causal", ModelConfig(vocab_size=512, context_len=32, n_layer=1, n_head=2, n_embd=32, causal=True), cfg,
              small_data, device="cpu", progress=False)


def test_the_example_noise_masks_its_rate_and_weights_by_the_masked_count(mlm):
    objective = objective_for(TrainConfig(objective="mlm"), ModelConfig(vocab_size=64, context_len=200, n_layer=1, n_head=2, n_embd=16))
    tokens = torch.randint(0, 64, (64, 201), generator=torch.Generator().manual_seed(0))
    noise = objective.draw_noise(Batch(tokens), torch.Generator().manual_seed(1))
    n = noise.masked.numel()
    assert abs(noise.masked.float().mean().item() - RATE) < 4 * (RATE * (1 - RATE) / n) ** 0.5  # binomial, 4 sigma
    assert torch.equal(noise.xt[noise.masked], torch.full((int(noise.masked.sum()),), 64))
    torch.testing.assert_close(noise.weight * noise.masked.sum(dim=1), torch.full((64,), 200.0))
