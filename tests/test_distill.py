"""Distillation for few-step sampling (docs/algorithms.md, 'Distillation for few-step sampling').

SDTT: the target is the teacher's two ancestral steps, checked against a slow loop over positions (and
its expectation against the enumeration of every intermediate state); a student equal to its teacher
has the documented loss, the KL from the teacher's one-step to its two-step distribution, computed
here independently; `unmask distill` makes a run that `unmask sample` reads, resumes exactly across
rounds, and two processes train it like one.
"""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from ranks import free_port, launch_ranks, wait_ranks
from runs import assert_resume_is_exact

from unmask.checkpoint import load_model, load_weights
from unmask.cli import main
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.model import Transformer
from unmask.objectives.sdtt import TwoStepNoise, draw_two_steps, teacher_target
from unmask.schedule import Schedule
from unmask.train import train
from unmask.training.data import WindowData
from unmask.training.step import DATA_STREAM, NOISE_STREAM, stream_seed

TEACHER_NET = ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32, init_std=0.3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A one-step MDM run with peaked predictions (the teacher) and a one-step AR run."""
    root = tmp_path_factory.mktemp("teachers")
    cfg = dict(steps=1, batch_size=2, precision="fp32", eval_windows=2, eval_draws=2)
    train(root / "mdm", TEACHER_NET, TrainConfig(**cfg), small_data, device="cpu", progress=False)
    train(root / "ar", dataclasses.replace(TEACHER_NET, causal=True), TrainConfig(objective="ar", **cfg), small_data, device="cpu",
          progress=False)
    return root


def tiny_teacher(vocab: int = 6, length: int = 8, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, context_len=length, n_layer=1, n_head=2, n_embd=16, time_conditioning=True,
                                   init_std=0.5)).eval()


@torch.no_grad()
def slow_two_steps(teacher, xt, t: float, u: float, coins, draws, mask_id: int):
    """The teacher's two ancestral steps of one row, position by position: (p_T(. | z_t) (L, V), p_T(. | z_u) (L, V), the
    positions unmasked in the first step). Linear schedule: a masked position stays masked with probability m(u)/m(t) = u/t."""
    p1 = teacher(xt[None], t=torch.tensor([t], dtype=torch.float32))[0].double().softmax(dim=-1)
    z, first = xt.clone(), torch.zeros_like(xt, dtype=torch.bool)
    for i in range(len(xt)):
        if xt[i] == mask_id and coins[i] >= u / t:
            first[i] = True
            cumulative = 0.0
            for v in range(p1.shape[1]):  # the inverse CDF, one token at a time
                cumulative += p1[i, v].item()
                if cumulative > draws[i]:
                    break
            z[i] = v
    p2 = teacher(z[None], t=torch.tensor([u], dtype=torch.float32))[0].double().softmax(dim=-1)
    return p1, p2, first


def test_the_target_is_the_teachers_two_ancestral_steps_by_a_slow_loop():
    teacher = tiny_teacher()
    x0 = torch.randint(0, 6, (8, 8), generator=torch.Generator().manual_seed(1))
    noise = draw_two_steps(x0, 8, Schedule(), teacher.config.mask_id, torch.Generator().manual_seed(2))
    target, first = teacher_target(teacher, noise, Schedule())
    seen = {"first": 0, "second": 0}
    for b in range(8):
        p1, p2, slow_first = slow_two_steps(teacher, noise.xt[b], noise.t[b].item(), noise.u[b].item(), noise.coins[b], noise.draws[b], 6)
        assert torch.equal(first[b], slow_first)
        masked = noise.masked[b]
        rows = target[noise.masked[:b].sum():][: masked.sum()].double().exp()  # this row's masked positions, in order
        expected = torch.where(slow_first[:, None], p1, p2)[masked]
        torch.testing.assert_close(rows, expected, atol=1e-6, rtol=0)
        seen["first"] += int(slow_first.sum())
        seen["second"] += int((masked & ~slow_first).sum())
    assert seen["first"] > 0 and seen["second"] > 0  # both kinds of target were checked
    assert sorted(set(noise.t.tolist())) <= [0.25, 0.5, 0.75, 1.0] and torch.allclose(noise.u, noise.t - 1 / 8, atol=1e-12)


@torch.no_grad()
def expected_target(teacher, xt, t: float, u: float, mask_id: int) -> torch.Tensor:
    """E[target] (L, V) over the teacher's first step, by enumerating every intermediate state of the masked positions."""
    p1 = teacher(xt[None], t=torch.tensor([t], dtype=torch.float32))[0].double().softmax(dim=-1)
    masked = (xt == mask_id).nonzero().squeeze(1).tolist()
    stay = u / t
    total = torch.zeros_like(p1)
    for state in itertools.product(range(p1.shape[1] + 1), repeat=len(masked)):  # V: still masked
        z, weight = xt.clone(), 1.0
        for i, s in zip(masked, state):
            weight *= stay if s == p1.shape[1] else (1 - stay) * p1[i, s].item()
            z[i] = mask_id if s == p1.shape[1] else s
        p2 = teacher(z[None], t=torch.tensor([u], dtype=torch.float32))[0].double().softmax(dim=-1)
        total += weight * torch.where((z != mask_id)[:, None], p1, p2)
    return total[masked]


def test_the_mean_target_is_its_expectation_over_every_intermediate_state():
    teacher, n = tiny_teacher(vocab=3, length=4), 4000
    xt = torch.tensor([3, 1, 3, 3])
    t, u = 0.75, 0.625  # a student step of 1/4 from 3/4, the teacher's intermediate time 3/4 - 1/8
    expected = expected_target(teacher, xt, t, u, 3)
    gen = torch.Generator().manual_seed(3)
    noise = TwoStepNoise(xt.repeat(n, 1), (xt == 3).repeat(n, 1), torch.full((n,), t, dtype=torch.float64),
                         torch.full((n,), u, dtype=torch.float64), torch.rand((n, 4), generator=gen, dtype=torch.float64),
                         torch.rand((n, 4), generator=gen, dtype=torch.float64))
    draws = teacher_target(teacher, noise, Schedule())[0].double().exp().view(n, 3, 3)
    stderr = draws.std(dim=0) / n**0.5
    assert ((draws.mean(dim=0) - expected).abs() <= 5 * stderr + 1e-9).all()
    with torch.no_grad():  # the test tells the target from the teacher's one-step distribution alone
        one_step = teacher(xt[None], t=torch.tensor([t]))[0].double().softmax(dim=-1)[xt == 3]
    assert (expected - one_step).abs().max() > 10 * stderr.max()


def distill_config(teacher, **settings) -> TrainConfig:
    return TrainConfig(**{"objective": "sdtt", "teacher": str(teacher), "init_from": str(teacher), "rounds": 2, "steps_per_round": 2,
                          "teacher_steps": 8, "steps": 4, "batch_size": 4, "warmup_steps": 0, "precision": "fp32", "log_every": 1,
                          "eval_every": 1000, "eval_windows": 2, "eval_draws": 2, "checkpoint_every": 1000, **settings})


def test_a_student_equal_to_its_teacher_has_the_kl_from_its_one_step_to_its_two_step_distribution(runs, small_data, tmp_path):
    """At a learning rate too small to move a weight, every step's loss is the mean over rows of the mean over the row's
    masked positions of 1{still masked after the first step} KL(p_T(. | z_u) || p_T(. | z_t)), recomputed here."""
    cfg = distill_config(runs / "mdm", rounds=1, steps_per_round=3, steps=3, lr=1e-30, weight_decay=0.0)
    losses = train(tmp_path / "student", TEACHER_NET, cfg, small_data, device="cpu", progress=False).losses
    teacher, _ = load_model(runs / "mdm")
    data = WindowData(small_data, TEACHER_NET.context_len)
    data_rng = np.random.default_rng(stream_seed(cfg.seed, DATA_STREAM))
    noise_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, NOISE_STREAM))
    for loss in losses:
        x0 = data.sample(data_rng, cfg.batch_size).tokens[:, 1:]
        noise = draw_two_steps(x0, 8, Schedule(), TEACHER_NET.mask_id, noise_gen)
        rows = []
        for b in range(cfg.batch_size):
            p1, p2, first = slow_two_steps(teacher, noise.xt[b], noise.t[b].item(), noise.u[b].item(), noise.coins[b], noise.draws[b],
                                           TEACHER_NET.mask_id)
            kl = (p2 * (p2.log() - p1.log())).sum(dim=-1)
            masked = noise.masked[b]
            rows.append(float((kl * (masked & ~first)).sum() / max(1, int(masked.sum()))))
        assert loss == pytest.approx(sum(rows) / len(rows), rel=1e-4)
        assert loss > 1e-3  # a teacher whose two steps differ from one


def test_distillation_resumes_exactly_inside_a_later_round(runs, small_data, tmp_path):
    full = assert_resume_is_exact(tmp_path, TEACHER_NET, distill_config(runs / "mdm", lr=1e-3), small_data, stop_after=3)
    assert len(full.losses) == 4
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["teacher_steps"], r["student_steps"]) for r in lines if r["kind"] == "train"] == [(1, 8, 4)] * 2 + [(2, 4, 2)] * 2
    assert (tmp_path / "split" / "teachers" / "round_1.safetensors").is_file()  # the second round's teacher, read back on resume


def test_distill_refuses_a_run_of_another_kind_by_name(runs, capsys):
    assert main(["distill", str(runs / "ar"), "--method", "sdtt", "--out", str(runs / "x")]) == 2
    assert "sdtt distils MDM runs (objective mdm or sdtt)" in capsys.readouterr().err
    assert main(["distill", str(runs / "mdm"), "--method", "sdtt", "--rounds", "3", "--teacher-steps", "12", "--out", str(runs / "x")]) == 2
    assert "--teacher-steps=12 must be a multiple of 8 = 2^3: each of the 3 --rounds halves" in capsys.readouterr().err


def test_distill_on_two_processes_trains_like_one_and_sample_reads_the_run(runs, small_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ddp"
    args = ["-m", "unmask", "distill", str(runs / "mdm"), "--method", "sdtt", "--rounds", "2", "--steps-per-round", "2",
            "--teacher-steps", "8", "--out", str(out), "--batch-size", "2", "--precision", "fp32", "--lr", "3e-3", "--log-every", "1",
            "--device", "cpu"]
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    wait_ranks(launch_ranks(args), timeout=240)
    saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert saved.train.distill.student_steps == 2 and saved.train.objective == "sdtt"
    single = train(tmp_path / "single", saved.model, dataclasses.replace(saved.train, batch_size=4), small_data, device="cpu",
                   progress=False)
    ddp = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert ddp == pytest.approx(single.losses, abs=1e-5)
    a, _, _ = load_weights(out)
    b, _, _ = load_weights(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0)
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--steps", "2", "--length", "8", "--num-samples", "1", "--json", "--device", "cpu"]) == 0
    sample = json.loads(capsys.readouterr().out)
    assert sample["nfe"] <= 2 and len(sample["samples"]) == 1
