"""Uniform-state diffusion (UDLM, Duo) against exact references: the continuous-time NELBO of an
enumerable joint with its exact denoiser (the entropy, by quadrature), the limit of the discrete-time
sum of posterior KLs, the operator T against closed forms, quadrature and argmax frequencies, the
relaxed input's tau -> 0 limit, and both objectives through the one training loop (exact resume,
two ranks equal one process, eval ppl, export refused)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from ranks import free_port, launch_ranks, wait_ranks
from runs import assert_resume_is_exact

from unmask.config import ModelConfig, TrainConfig
from unmask.errors import OptionError, UnmaskError
from unmask.model import Transformer
from unmask.objectives import Batch, objective_for
from unmask.schedule import Schedule
from unmask.uniform import (
    GaussianCorruption, UniformCorruption, corrupt_uniform, diffusion_operator, gaussian_latents, relaxed_input, udlm_elbo, udlm_loss,
    udlm_nelbo,
)


# --- an enumerable joint p(x) over K^L sequences and its exact denoisers --------------------------------------------


class UniformOracle(torch.nn.Module):
    """The exact denoiser of the uniform process for an explicit joint p(x) over K tokens and L positions.

    ``leave_one_out`` (the optimum of the bound): position i gets p(x^i | z_t^{-i}), the posterior given the
    OTHER noisy tokens; otherwise p(x^i | z_t), the posterior marginal given all of z_t. Both by enumerating x."""

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int, schedule: Schedule, leave_one_out: bool = True):
        super().__init__()
        self.probs, self.k, self.length, self.schedule, self.leave_one_out = probs, vocab_size, length, schedule, leave_one_out
        self.seqs = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
        self.config = ModelConfig(vocab_size=vocab_size, context_len=length, n_layer=1, n_head=1, n_embd=2, time_conditioning=True,
                                  noise="uniform")
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the oracle a device

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        alpha = self.schedule.alpha(t.double())[:, None, None]
        q = alpha * (tokens[:, None, :] == self.seqs[None]).double() + (1 - alpha) / self.k  # (N, X, L): q(z^j | x^j)
        out = torch.zeros(tokens.shape[0], self.length, self.k, dtype=torch.float64)
        for i in range(self.length):
            others = [j for j in range(self.length) if j != i or not self.leave_one_out]
            weight = self.probs[None, :] * q[:, :, others].prod(dim=-1)  # (N, X)
            out[:, i] = weight @ torch.nn.functional.one_hot(self.seqs[:, i], self.k).double()
        return (out / out.sum(-1, keepdim=True)).log()


def random_joint(k: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(k**length, generator=gen, dtype=torch.float64) ** 3 + 1e-3
    return probs / probs.sum()


def panels() -> tuple[torch.Tensor, torch.Tensor]:
    """Composite Gauss-Legendre nodes and weights on [0, 1], geometrically refined towards t = 0, where the integrand
    has a log-type singularity (a token z_t != x costs ~ log(1/(1 - alpha)) as alpha -> 1)."""
    edges = [0.0] + [10.0**-e for e in range(12, 0, -1)] + [1.0]
    x, w = np.polynomial.legendre.leggauss(12)
    nodes = [lo + (hi - lo) * (x + 1) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    weights = [(hi - lo) / 2 * w for lo, hi in zip(edges[:-1], edges[1:])]
    return torch.tensor(np.concatenate(nodes)), torch.tensor(np.concatenate(weights))


def expected_nelbo(oracle: UniformOracle, schedule: Schedule) -> float:
    """E_{x ~ p} of the UDLM NELBO in nats/token: z_t enumerated exactly, t by composite Gauss-Legendre (all nodes at once)."""
    seqs, n = oracle.seqs, len(oracle.seqs)
    t, weights = panels()
    alpha = schedule.alpha(t)[:, None, None]  # (T, X, Z)
    logits = oracle(seqs.repeat(len(t), 1), t.repeat_interleave(n)).view(len(t), 1, n, oracle.length, oracle.k)
    x, z = seqs[None, :, None].expand(len(t), n, n, -1), seqs[None, None].expand(len(t), n, n, -1)
    q = (alpha[..., None] * (x == z).double() + (1 - alpha[..., None]) / oracle.k).prod(dim=-1)  # q(z | x)
    rows = lambda a: a.reshape(-1, *a.shape[3:])  # noqa: E731  (T, X, Z, ...) -> (T X Z, ...)
    at = lambda a: a[:, None, None].expand(len(t), n, n).reshape(-1)  # noqa: E731
    logits = logits.expand(len(t), n, n, oracle.length, oracle.k)
    nats = udlm_nelbo(rows(logits), rows(z), rows(x), at(schedule.alpha(t)), at(schedule.alpha_prime(t))).sum(-1).view(len(t), n, n)
    return (weights[:, None, None] * oracle.probs[None, :, None] * q * nats).sum().item() / oracle.length


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_nelbo_of_the_exact_denoiser_is_the_entropy(kind):
    """K = 3, L = 3: with x_theta = p(x^i | z_t^{-i}) the model's reverse rates are the true ones and the bound is
    tight, E_p[NELBO] = H(p) / L. The posterior marginal given all of z_t, p(x^i | z_t), is NOT the optimum of
    the mean parameterisation (it double-counts z_t^i, which the posterior formula already conditions on):
    its bound is strictly larger, as is that of a perturbed exact denoiser."""
    k, length, schedule = 3, 3, Schedule(kind, eps=0.0)
    probs = random_joint(k, length, seed=4)
    entropy = -(probs * probs.log()).sum().item() / length
    exact = UniformOracle(probs, k, length, schedule)
    assert expected_nelbo(exact, schedule) == pytest.approx(entropy, abs=1e-7)
    marginal = UniformOracle(probs, k, length, schedule, leave_one_out=False)
    assert expected_nelbo(marginal, schedule) > entropy + 1e-2
    perturbed = UniformOracle(probs, k, length, schedule)
    real_forward = perturbed.forward
    perturbed.forward = lambda tokens, t, **_: real_forward(tokens, t) + 0.3 * torch.sin(3.0 * tokens[..., None] + torch.arange(k))
    assert expected_nelbo(perturbed, schedule) > entropy + 1e-4


def test_the_monte_carlo_bound_of_the_exact_denoiser_is_the_nll_of_each_window():
    """udlm_elbo (stratified draws of t and z_t, eps = 0 whatever the training schedule) is unbiased: for the exact
    denoiser the NELBO of every sequence is its NLL, so the estimate over all K^L windows matches their mean NLL."""
    k, length = 3, 3
    probs = random_joint(k, length, seed=2)
    oracle = UniformOracle(probs, k, length, Schedule("linear", eps=0.0))
    result = udlm_elbo(oracle, oracle.seqs, draws=64, schedule=Schedule("linear"), batch_size=64, seed=0)
    nll = -probs.log().mean().item() / length
    assert result.kind == "elbo" and result.num_tokens == k**length * length and result.stderr > 0
    assert abs(result.nats_per_token - nll) < 4 * result.stderr


# --- the closed form against the discrete-time posteriors -------------------------------------------------------


def discrete_posterior(alpha_s: torch.Tensor, alpha_t: torch.Tensor, zt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q(z_s | z_t, x) for s < t, written as in the UDLM paper (x a probability vector (..., K), z_t one-hot)."""
    k = x.shape[-1]
    a_ts = alpha_t / alpha_s
    num = k * alpha_t * x * zt + (a_ts - alpha_t) * zt + (alpha_s - alpha_t) * x + (1 - a_ts) * (1 - alpha_s) / k
    return num / (k * alpha_t * (x * zt).sum(-1, keepdim=True) + 1 - alpha_t)


def discrete_kl_sum(steps: int, schedule: Schedule, x: int, table: torch.Tensor, slope: torch.Tensor) -> float:
    """sum over T steps of E_{z_t ~ q(. | x)} KL(q(z_s | z_t, x) || q(z_s | z_t, x_theta(z_t, t))), all z_t enumerated."""
    k = table.shape[0]
    t = (torch.arange(1, steps + 1, dtype=torch.float64) / steps)[:, None, None]
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(t - 1 / steps)
    zt = torch.eye(k, dtype=torch.float64)[None]  # (1, Z, K)
    x_onehot = torch.nn.functional.one_hot(torch.tensor(x), k).double().expand(1, k, k)
    x_theta = torch.softmax(table + t * slope, dim=-1)  # (T, Z, K)
    q = discrete_posterior(alpha_s, alpha_t, zt, x_onehot)
    p = discrete_posterior(alpha_s, alpha_t, zt, x_theta)
    kl = (torch.xlogy(q, q) - q * p.log()).sum(-1)  # (T, Z)
    qz = alpha_t[..., 0] * (torch.arange(k) == x).double() + (1 - alpha_t[..., 0]) / k
    return (qz * kl).sum().item()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_closed_form_is_the_limit_of_the_discrete_time_kl_sum(kind):
    """A random denoiser x_theta(z_t, t) = softmax(A[z_t] + t B[z_t]) over K = 4: the integral of udlm_nelbo equals the
    T -> infinity limit of the discrete-time sum of KLs between the true and model posteriors: the gap halves with
    each doubling of T, and the Richardson extrapolation 2 S(2T) - S(T) lands within 1e-7 of the integral."""
    k, x, schedule = 4, 2, Schedule(kind, eps=0.0)
    gen = torch.Generator().manual_seed(7)
    table, slope = torch.randn(k, k, generator=gen, dtype=torch.float64), torch.randn(k, k, generator=gen, dtype=torch.float64)
    zt, x0 = torch.arange(k)[:, None], torch.full((k, 1), x)
    continuous = 0.0
    for t, weight in zip(*panels()):
        alpha = schedule.alpha(t)
        values = udlm_nelbo((table + t * slope)[:, None, :], zt, x0, alpha.expand(k), schedule.alpha_prime(t).expand(k))[:, 0]
        qz = alpha * (torch.arange(k) == x).double() + (1 - alpha) / k
        continuous += weight.item() * (qz * values).sum().item()
    coarse, fine = discrete_kl_sum(2000, schedule, x, table, slope), discrete_kl_sum(4000, schedule, x, table, slope)
    assert 1.9 < (coarse - continuous) / (fine - continuous) < 2.1  # the gap is first order in 1/T, and closes
    assert abs(2 * fine - coarse - continuous) < 1e-7


def test_the_uniform_forward_process_keeps_or_draws_uniformly():
    """z_t ~ Cat(alpha x + (1 - alpha) / K): the counts of z_t given x against their expectation (chi-square, fixed seed)."""
    k, n, alpha = 5, 40000, 0.3
    x0 = torch.full((n, 1), 2)
    zt = corrupt_uniform(x0, torch.full((n,), alpha), k, torch.Generator().manual_seed(0))
    counts = torch.bincount(zt.flatten(), minlength=k).double()
    expected = n * (alpha * (torch.arange(k) == 2).double() + (1 - alpha) / k)
    assert ((counts - expected) ** 2 / expected).sum().item() < 18.5  # chi-square, 4 dof, p = 0.001


# --- Duo: the operator T, the latents, the relaxed input ----------------------------------------------------------


def test_the_operator_matches_its_closed_form_and_quadrature():
    """K = 2: T = P(alpha~ + sigma~ e1 > sigma~ e2) scaled = erf(nu / 2), nu = exp(-gamma/2), and its derivative.
    K = 3, 50, 50257: alpha = (K P - 1) / (K - 1), P = E_u[Phi(u + nu)^(K-1)] by numpy's Gauss-Hermite quadrature.
    The inverse gives gamma back."""
    gammas = torch.linspace(-12, 12, 97, dtype=torch.float64)
    nu = torch.exp(-gammas / 2)
    two = diffusion_operator(2)
    torch.testing.assert_close(two.alpha(gammas), torch.erf(nu / 2), atol=1e-8, rtol=0)
    torch.testing.assert_close(two.alpha_prime(gammas), -nu / 2 * torch.exp(-nu**2 / 4) / math.sqrt(math.pi), atol=1e-6, rtol=0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(300)
    phi = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2)))
    for k, tol in ((3, 1e-8), (50, 1e-8), (50257, 1e-6)):
        points = np.array([-6.0, -3.5, -2.5, -1.75, 0.0, 3.0])
        want = [(k * (weights * phi(nodes + math.exp(-g / 2)) ** (k - 1)).sum() / math.sqrt(2 * math.pi) - 1) / (k - 1) for g in points]
        operator = diffusion_operator(k)
        assert np.abs(operator.alpha(torch.tensor(points)).numpy() - np.array(want)).max() < tol, k
        inside = torch.tensor([-3.0, -1.0, 0.5])
        torch.testing.assert_close(operator.gamma_for_alpha(operator.alpha(inside)), inside.double(), atol=1e-8, rtol=0)


def test_the_argmax_of_the_gaussian_latents_is_the_uniform_process_at_t_of_gamma():
    """Draws of argmax(alpha~ e_x + sigma~ eps), K = 5: the counts of each token against n (T(gamma) x + (1 - T(gamma)) / K)
    (chi-square, fixed seed), at three noise levels."""
    k, n, x = 5, 20000, 3
    gen = torch.Generator().manual_seed(1)
    for gamma in (-2.0, 0.0, 2.0):
        eps = torch.randn((n, 1, k), generator=gen)
        z = gaussian_latents(torch.full((n, 1), x), torch.full((n,), gamma), eps).argmax(-1).flatten()
        alpha = diffusion_operator(k).alpha(torch.tensor(gamma)).item()
        expected = n * (alpha * (torch.arange(k) == x).double() + (1 - alpha) / k)
        counts = torch.bincount(z, minlength=k).double()
        assert ((counts - expected) ** 2 / expected).sum().item() < 18.5, gamma  # 4 dof, p = 0.001


def test_the_relaxed_input_tends_to_the_one_hot_input():
    """softmax(w / tau) -> one_hot(argmax w) as tau -> 0, and a network fed it (soft_tokens) gives the logits of the
    tokens themselves; the one-hot soft input is exactly the embedding lookup."""
    torch.manual_seed(0)
    k = 11
    model = Transformer(ModelConfig(vocab_size=k, context_len=8, n_layer=1, n_head=2, n_embd=16, time_conditioning=True,
                                    noise="uniform")).double().eval()
    gen = torch.Generator().manual_seed(3)
    w = gaussian_latents(torch.randint(0, k, (4, 8), generator=gen), torch.full((4,), -1.0),
                         torch.randn((4, 8, k), generator=gen, dtype=torch.float64))
    zt, t = w.argmax(-1), torch.full((4,), 0.4, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(zt, k).double()
    top2 = w.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()  # the closest runner-up over all positions
    taus = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5)
    gaps = [(relaxed_input(w, tau) - onehot).abs().max().item() for tau in taus]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-9
    assert all(gap <= (k - 1) * math.exp(-margin / tau) for gap, tau in zip(gaps, taus))  # every other weight <= exp(-margin / tau)
    with torch.no_grad():
        plain = model(zt, t=t)
        torch.testing.assert_close(model(zt, t=t, soft_tokens=onehot), plain, atol=1e-12, rtol=0)
        torch.testing.assert_close(model(zt, t=t, soft_tokens=relaxed_input(w, 1e-5)), plain, atol=1e-8, rtol=0)


# --- the objectives through the one loop -----------------------------------------------------------------------------


def tiny_run(objective: str, batch_size: int = 4, **settings) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32, time_conditioning=True, noise="uniform")
    cfg = TrainConfig(objective=objective, steps=6, batch_size=batch_size, warmup_steps=1, lr=3e-3, precision="fp32", seed=3,
                      log_every=1, eval_every=3, eval_windows=4, eval_draws=2, checkpoint_every=1000, **settings)
    return model, cfg


def test_duo_draws_gaussian_latents_during_its_curriculum_then_the_uniform_process():
    model, cfg = tiny_run("duo", curriculum_steps=2, tau=0.01)
    objective = objective_for(cfg, model)
    batch, kinds = Batch(torch.randint(0, 512, (4, 17))), []
    for step in range(4):
        objective.before_step(step, None)
        kinds.append(type(objective.draw_noise(batch, torch.Generator().manual_seed(step))))
    assert kinds == [GaussianCorruption, GaussianCorruption, UniformCorruption, UniformCorruption]
    drawn = objective_for(cfg, model).draw_noise(batch, torch.Generator().manual_seed(0))  # a new objective starts at step 0
    low, high = diffusion_operator(512).alpha(torch.tensor([-1.75, -3.5], dtype=torch.float64)).tolist()
    assert ((drawn.alpha >= low - 1e-6) & (drawn.alpha <= high + 1e-6)).all() and drawn.tau == 0.01  # T(gamma) covers the range


@pytest.mark.parametrize("objective", ["udlm", "duo"])
def test_the_objectives_train_resume_exactly_and_are_scored_by_eval_ppl(objective, tmp_path, small_data):
    from unmask.evaluation import evaluate_checkpoint
    from unmask.interop.hf_export import export_run

    settings = {"curriculum_steps": 3, "tau": 0.01} if objective == "duo" else {"schedule": "cosine"}
    model, cfg = tiny_run(objective, **settings)
    full = assert_resume_is_exact(tmp_path, model, cfg, small_data, stop_after=2)  # resumed inside duo's curriculum
    assert all(math.isfinite(loss) for loss in full.losses)
    val = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in val] == [3, 6] and all(v["val_stderr"] > 0 for v in val)
    res = evaluate_checkpoint(tmp_path / "full", windows=4, draws=4, batch_size=4, device="cpu", progress=False)
    assert (res["objective"], res["kind"], res["estimator"]) == (objective, "elbo", "udlm") and res["stderr"] > 0
    assert res["nats_per_token"] < math.log(512) + 0.5  # the bound of a barely trained network, near the uniform code length
    with pytest.raises(OptionError, match="uniform-state network"):
        evaluate_checkpoint(tmp_path / "full", windows=2, draws=2, estimator="k-dce", device="cpu", progress=False)
    with pytest.raises(UnmaskError, match="uniform-state network"):
        export_run(tmp_path / "full", tmp_path / "hf")


def test_the_settings_of_duo_are_checked_and_its_own():
    with pytest.raises(OptionError, match="apply to objective duo only"):
        TrainConfig(objective="udlm", tau=0.1)
    with pytest.raises(OptionError, match="gamma_min=-1.0 must be below gamma_max=-2.0"):
        TrainConfig(objective="duo", gamma_min=-1.0, gamma_max=-2.0)
    with pytest.raises(OptionError, match="tau=0.0 must be"):
        TrainConfig(objective="duo", tau=0.0)
    cfg = TrainConfig(objective="duo")
    assert cfg.duo is not None and TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


WORKER = """
import json, os, sys
from unmask.config import ModelConfig, TrainConfig
from unmask.train import train

root, data, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for name, model, cfg, port in jobs:
    os.environ["MASTER_PORT"] = str(port)
    train(os.path.join(root, name), ModelConfig(**model), TrainConfig(**cfg), data, device="cpu", progress=False)
"""


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, small_data):
    """udlm and duo (across its curriculum's end): 2 processes x micro-batch 2 give the losses and weights of one
    process x 4, because the noise (duo: the latents' per-row seeds) is drawn for the global batch."""
    from unmask.checkpoint import load_weights
    from unmask.train import train

    runs = {"udlm": {}, "duo": {"curriculum_steps": 2, "tau": 0.01}}
    jobs = []
    for name, settings in runs.items():
        model, cfg = tiny_run(name, batch_size=2, **settings)
        jobs.append([name, dataclasses.asdict(model), dataclasses.asdict(dataclasses.replace(cfg, steps=4)), free_port()])
    wait_ranks(launch_ranks(["-c", WORKER, str(tmp_path / "ddp"), str(small_data), json.dumps(jobs)]), timeout=240)
    for name, settings in runs.items():
        model, cfg = tiny_run(name, batch_size=4, **settings)
        train(tmp_path / "single" / name, model, dataclasses.replace(cfg, steps=4), small_data, device="cpu", progress=False)
        losses = [[r["loss"] for r in map(json.loads, (tmp_path / where / name / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"] for where in ("ddp", "single")]
        assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5), name
        a, b = load_weights(tmp_path / "ddp" / name)[0], load_weights(tmp_path / "single" / name)[0]
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0, msg=f"{name}: {key}")
