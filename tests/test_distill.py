"""Distillation for few-step sampling (docs/algorithms.md, 'Distillation for few-step sampling').

SDTT: the target is the teacher's two ancestral steps, checked against a slow loop over positions (and
its expectation against the enumeration of every intermediate state). DCD: the two ends of a Gaussian
trajectory, read from three numbers per position, equal the argmax of the full latents, the trajectory
is the probability-flow ODE's (integrated here), and the tokens have the uniform-state marginals of
Duo's operator T. For both, a student equal to its teacher has the documented loss (the divergence of
the teacher from itself one step along, computed here independently); `unmask distill` makes a run
that `unmask sample` reads, resumes exactly across rounds, and two processes train it like one.
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
from unmask.objectives.dcd import ArgmaxNoise, draw_argmax_noise, draw_trajectory, gamma_at
from unmask.objectives.sdtt import TwoStepNoise, draw_two_steps, teacher_target
from unmask.schedule import Schedule
from unmask.uniform import diffusion_operator, gaussian_coefficients, gaussian_latents
from unmask.train import train
from unmask.training.data import WindowData
from unmask.training.step import DATA_STREAM, NOISE_STREAM, stream_seed

TEACHER_NET = ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32, init_std=0.3)
NETS = {"mdm": TEACHER_NET, "duo": dataclasses.replace(TEACHER_NET, noise="uniform", time_conditioning=True)}
METHODS = {"sdtt": "mdm", "dcd": "duo"}  # what each distils


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """One-step MDM and Duo runs with peaked predictions: the teachers."""
    root = tmp_path_factory.mktemp("teachers")
    cfg = dict(steps=1, batch_size=2, precision="fp32", eval_windows=2, eval_draws=2)
    train(root / "mdm", NETS["mdm"], TrainConfig(**cfg), small_data, device="cpu", progress=False)
    train(root / "duo", NETS["duo"], TrainConfig(objective="duo", curriculum_steps=0, **cfg), small_data, device="cpu", progress=False)
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


def test_the_argmax_of_a_gaussian_trajectory_is_read_from_three_numbers_and_the_ode_keeps_its_noise():
    k, gen = 7, torch.Generator().manual_seed(5)
    x0 = torch.randint(0, k, (64, 6), generator=gen)
    eps = torch.randn((64, 6, k), generator=gen, dtype=torch.float64)
    rival, other = eps.scatter(-1, x0[..., None], -torch.inf).max(dim=-1)  # the largest noise of the other tokens
    noise = ArgmaxNoise(eps.gather(-1, x0[..., None]).squeeze(-1), rival, other)
    for gamma in (-3.0, 0.0, 2.5):
        g = torch.full((64,), gamma, dtype=torch.float64)
        assert torch.equal(noise.tokens(x0, g), gaussian_latents(x0, g, eps).argmax(dim=-1))
    # the probability-flow ODE dw = [f w - g^2 score / 2] dgamma of the Gaussian process (f = -sigma~^2 / 2, g^2 = sigma~^2 in
    # gamma), with the clean data's score -(w - alpha~ e_x) / sigma~^2, by RK4 from gamma 1 to -2: it ends at the same eps
    onehot = torch.nn.functional.one_hot(x0, k).double()

    def drift(w, gamma):
        alpha, sigma = gaussian_coefficients(torch.tensor(gamma, dtype=torch.float64))
        return -sigma**2 / 2 * w + sigma**2 / 2 * (w - alpha * onehot) / sigma**2

    w, gamma, h = gaussian_latents(x0, torch.full((64,), 1.0, dtype=torch.float64), eps), 1.0, -3.0 / 300
    for _ in range(300):
        a = drift(w, gamma)
        b = drift(w + h / 2 * a, gamma + h / 2)
        c = drift(w + h / 2 * b, gamma + h / 2)
        d = drift(w + h * c, gamma + h)
        w, gamma = w + h / 6 * (a + 2 * b + 2 * c + d), gamma + h
    torch.testing.assert_close(w, gaussian_latents(x0, torch.full((64,), -2.0, dtype=torch.float64), eps), atol=1e-9, rtol=0)


def test_the_trajectory_tokens_have_the_uniform_state_marginals_of_duos_operator():
    k, n = 5, 40000
    x0 = torch.zeros((n, 1), dtype=torch.long)
    noise = draw_argmax_noise(x0, k, torch.Generator().manual_seed(6))
    operator, schedule = diffusion_operator(k), Schedule()
    t = torch.tensor([0.8, 0.3], dtype=torch.float64)
    gamma = gamma_at(t, schedule, k)
    torch.testing.assert_close(operator.alpha(gamma), schedule.alpha(t), atol=1e-6, rtol=0)  # T(gamma_t) = alpha(t)
    zt, zs = (noise.tokens(x0, g.expand(n)) for g in gamma)
    for z, alpha in zip((zt, zs), schedule.alpha(t).tolist()):
        p = alpha + (1 - alpha) / k  # q(z = x0) of the uniform-state process
        assert abs((z == 0).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
        counts = torch.bincount(z[z != 0], minlength=k)[1:].double()  # the other tokens, uniform
        assert ((counts - counts.mean()) ** 2 / counts.mean()).sum().item() < 18.5  # chi-square, 3 dof, p ~ 3e-4
    assert ((zs != 0) <= (zt == zs)).all()  # one trajectory: a token noisy at s is the same at t (less signal)
    assert ((zt != zs) <= (zs == 0)).all()


def distill_config(method: str, teacher, **settings) -> TrainConfig:
    return TrainConfig(**{"objective": method, "teacher": str(teacher), "init_from": str(teacher), "rounds": 2, "steps_per_round": 2,
                          "teacher_steps": 8, "steps": 4, "batch_size": 4, "warmup_steps": 0, "precision": "fp32", "log_every": 1,
                          "eval_every": 1000, "eval_windows": 2, "eval_draws": 2, "checkpoint_every": 1000, **settings})


@torch.no_grad()
def own_divergence(method: str, teacher, x0: torch.Tensor, noise_gen: torch.Generator) -> float:
    """The loss of a student equal to ``teacher`` on windows x0, recomputed: SDTT, per row the mean over its masked positions
    of 1{still masked after the first step} KL(p_T(. | z_u) || p_T(. | z_t)) (slow loop); DCD, per row the mean over its
    positions of KL(p_T(. | z_s, s) || p_T(. | z_t, t)); the mean over rows."""
    rows = []
    if method == "sdtt":
        noise = draw_two_steps(x0, 8, Schedule(), teacher.config.mask_id, noise_gen)
        for b in range(x0.shape[0]):
            p1, p2, first = slow_two_steps(teacher, noise.xt[b], noise.t[b].item(), noise.u[b].item(), noise.coins[b], noise.draws[b],
                                           teacher.config.mask_id)
            kl, masked = (p2 * (p2.log() - p1.log())).sum(dim=-1), noise.masked[b]
            rows.append(float((kl * (masked & ~first)).sum() / max(1, int(masked.sum()))))
        return sum(rows) / len(rows)
    noise = draw_trajectory(x0, 8, Schedule(), teacher.config.vocab_size, noise_gen)
    for b in range(x0.shape[0]):
        ps = teacher(noise.zs[b:b + 1], t=noise.s[b:b + 1].float())[0].double().softmax(dim=-1)
        pt = teacher(noise.zt[b:b + 1], t=noise.t[b:b + 1].float())[0].double().softmax(dim=-1)
        rows.append(float((ps * (ps.log() - pt.log())).sum(dim=-1).mean()))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("method", ["sdtt", "dcd"])
def test_a_student_equal_to_its_teacher_has_the_divergence_of_the_teacher_one_step_along(method, runs, small_data, tmp_path):
    """At a learning rate too small to move a weight, every step's loss is the teacher's divergence from itself one step along."""
    net, teacher_dir = NETS[METHODS[method]], runs / METHODS[method]
    cfg = distill_config(method, teacher_dir, rounds=1, steps_per_round=2, steps=2, lr=1e-30, weight_decay=0.0)
    losses = train(tmp_path / "student", net, cfg, small_data, device="cpu", progress=False).losses
    teacher, _ = load_model(teacher_dir)
    data = WindowData(small_data, net.context_len)
    data_rng = np.random.default_rng(stream_seed(cfg.seed, DATA_STREAM))
    noise_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, NOISE_STREAM))
    for loss in losses:
        assert loss == pytest.approx(own_divergence(method, teacher, data.sample(data_rng, cfg.batch_size).tokens[:, 1:], noise_gen), rel=1e-4)
        assert loss > 1e-3  # a teacher whose predictions move along the chain


@pytest.mark.parametrize("method", ["sdtt", "dcd"])
def test_distillation_resumes_exactly_inside_a_later_round(method, runs, small_data, tmp_path):
    cfg = distill_config(method, runs / METHODS[method], lr=1e-3)
    assert len(assert_resume_is_exact(tmp_path, NETS[METHODS[method]], cfg, small_data, stop_after=3).losses) == 4
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["teacher_steps"], r["student_steps"]) for r in lines if r["kind"] == "train"] == [(1, 8, 4)] * 2 + [(2, 4, 2)] * 2
    assert (tmp_path / "split" / "teachers" / "round_1.safetensors").is_file()  # the second round's teacher, read back on resume


def test_distill_refuses_a_run_of_another_kind_by_name(runs, capsys):
    assert main(["distill", str(runs / "duo"), "--method", "sdtt", "--out", str(runs / "x")]) == 2
    assert "sdtt distils MDM runs (objective mdm or sdtt); teacher " in capsys.readouterr().err
    assert main(["distill", str(runs / "mdm"), "--method", "dcd", "--out", str(runs / "x")]) == 2
    assert "dcd distils Duo runs (objective duo or dcd); teacher " in capsys.readouterr().err
    assert main(["distill", str(runs / "mdm"), "--method", "sdtt", "--rounds", "3", "--teacher-steps", "12", "--out", str(runs / "x")]) == 2
    assert "--teacher-steps=12 must be a multiple of 8 = 2^3: each of the 3 --rounds halves" in capsys.readouterr().err


WORKER = """
import json, os, sys
from unmask.cli import main

for port, args in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(port)
    assert main(args) == 0, args
"""


def test_distill_on_two_processes_trains_like_one_and_sample_reads_the_run(runs, small_data, tmp_path, capsys):
    jobs = [[free_port(), ["distill", str(runs / METHODS[method]), "--method", method, "--rounds", "2", "--steps-per-round", "2",
                           "--teacher-steps", "8", "--out", str(tmp_path / method), "--batch-size", "2", "--precision", "fp32", "--lr",
                           "3e-3", "--log-every", "1", "--device", "cpu"]] for method in METHODS]
    wait_ranks(launch_ranks(["-c", WORKER, json.dumps(jobs)]), timeout=240)
    for method in METHODS:
        out = tmp_path / method
        saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
        assert saved.train.distill.student_steps == 2 and saved.train.objective == method
        single = train(tmp_path / f"{method}-single", saved.model, dataclasses.replace(saved.train, batch_size=4), small_data, device="cpu",
                       progress=False)
        ddp = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
        assert ddp == pytest.approx(single.losses, abs=1e-5), method
        a, _, _ = load_weights(out)
        b, _, _ = load_weights(tmp_path / f"{method}-single")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0, msg=f"{method}: {key}")
        capsys.readouterr()
        assert main(["sample", "--checkpoint", str(out), "--steps", "2", "--length", "8", "--num-samples", "1", "--json", "--device",
                     "cpu"]) == 0
        sample = json.loads(capsys.readouterr().out)
        assert sample["nfe"] <= 2 and len(sample["samples"]) == 1 and sample["sampler"] == ("ancestral" if method == "sdtt" else "uniform")
