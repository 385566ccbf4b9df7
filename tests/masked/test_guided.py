"""FK steering and SVDD on the masked samplers (:mod:`diffsamplers.guidance.masked`), with the same ``FKSteering``
and ``SVDD`` objects as for continuous models, against the exact Markov-chain model: for the reward r(x) = the
number of 2s in the sequence, the reward-tilted law p(x)·exp(λ r(x)) (Singhal et al. 2025, Eq. 1; Li et al. 2024,
the target p·exp(r/α)) is enumerable over the 81 sequences."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffsamplers.guidance.classifier_free import ClassifierFree
from diffsamplers.guidance.fk_steering import FKSteering
from diffsamplers.guidance.masked import GuidedMaskedSampler, argmax_x0
from diffsamplers.guidance.svdd import SVDD
from diffsamplers.masked.samplers import AncestralSampler, FirstHittingSampler, MaskedDiffusion, first_hitting_step
from diffsamplers.models.markov_chain import default_markov_chain

pytestmark = pytest.mark.usefixtures("single_thread")

CHAIN = default_markov_chain()
SEQUENCES = CHAIN.sequences
P = CHAIN.probabilities


def twos(x: torch.Tensor) -> torch.Tensor:
    """r(x): the number of tokens 2 in each sequence."""
    return (x == 2).sum(dim=1).to(torch.float64)


def _diffusion(time_conditioned: bool = False) -> MaskedDiffusion:
    # the exact denoiser ignores t: declared time-conditioned, the samplers must pass t and give the same law
    return MaskedDiffusion(CHAIN, CHAIN.vocab_size, context_length=CHAIN.length, time_conditioned=time_conditioned)


def _tilted(scale: float) -> torch.Tensor:
    w = P * torch.exp(scale * twos(SEQUENCES))
    return w / w.sum()


def _counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(CHAIN.index(tokens), minlength=P.numel()).double()


def _chi2_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """χ² over the sequences, the cells expected < 5 times pooled into one."""
    counts = _counts(tokens)
    expected = counts.sum() * probs
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def _tv(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = _counts(tokens)
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def _one_per_group(tokens: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """One uniformly chosen particle of each group: independent draws (particles of a group are correlated)."""
    groups = tokens.shape[0] // k
    pick = torch.randint(0, k, (groups,), generator=torch.Generator().manual_seed(seed)) + torch.arange(groups) * k
    return tokens[pick]


def _soft_value_table(alpha: float) -> torch.Tensor:
    """The exact soft value v(x) = α log E[exp(r(x0)/α) | the unmasked tokens of x] of every partially masked state
    (the exact denoiser is time-agnostic), indexed by the base-(V + 1) digits of the state (mask = V)."""
    v = CHAIN.vocab_size
    every = torch.cartesian_prod(*[torch.arange(v + 1)] * CHAIN.length)
    agree = (every[:, None, :] == SEQUENCES[None]) | (every[:, None, :] == v)
    w = agree.all(dim=2).double() * P
    return alpha * torch.log((w * torch.exp(twos(SEQUENCES) / alpha)).sum(1) / w.sum(1))


def _run(sampler, guidance, batch, seed, diffusion=None, **kw):
    return GuidedMaskedSampler(sampler, guidance).sample(
        diffusion or _diffusion(), batch=batch, length=CHAIN.length, generator=torch.Generator().manual_seed(seed), **kw
    )


SAMPLERS = [FirstHittingSampler(), AncestralSampler(8)]


# --- FK steering ----------------------------------------------------------------------------------------------------


def test_fk_steering_on_the_first_hitting_sampler_samples_the_tilted_law():
    """K = 64 particles, 4000 groups, λ = 1: one particle per group follows p·exp(λ r) (χ² over the sequences);
    the plain sampler's samples do not (measured: χ² p = 0.72, TV 0.033, mean reward 3.11 against the target's
    3.12; plain: p ≈ 0, mean 1.14)."""
    k, groups, lam = 64, 4000, 1.0
    fk = FKSteering(twos, k, lam=lam)
    out = _run(FirstHittingSampler(), fk, k * groups, seed=0)
    target = _tilted(lam)
    steered = _one_per_group(out.tokens, k, seed=1)
    assert _chi2_p(steered, target) > 1e-3
    plain = FirstHittingSampler().sample(
        _diffusion(), batch=groups, length=4, generator=torch.Generator().manual_seed(2)
    )
    assert _chi2_p(plain.tokens, target) < 1e-12
    assert abs(float(twos(steered).mean()) - float((target * twos(SEQUENCES)).sum())) < 0.05
    # the records, as for continuous models: one per step (every step weighs), the final one resampling every group
    assert [r.index for r in fk.history] == [0, 1, 2, 3]
    assert all(bool(r.resampled.all()) for r in fk.history)
    assert tuple(fk.log_weights.shape) == (groups, k) and bool((fk.log_weights == 0).all())
    assert torch.equal(fk.rewards, twos(out.tokens))
    assert out.nfe == 4  # the x̂0 call of each step is the next step's model call (a time-agnostic model)


def _ancestral_law(steps: int) -> torch.Tensor:
    """The exact law over the sequences of the ``steps``-step ancestral sampler on the linear schedule (the chain's
    grid bias included): the distribution over the (V + 1)^L partially masked states propagated through the
    ancestral kernel, which factorises over positions (a clean token stays; a masked one stays masked w.p. m_s/m_t,
    else becomes v w.p. (1 − m_s/m_t)·p(v | x))."""
    v, length = CHAIN.vocab_size, CHAIN.length
    every = torch.cartesian_prod(*[torch.arange(v + 1)] * length)
    n = every.shape[0]
    probs = torch.softmax(CHAIN(every), dim=-1)  # (n, L, V)
    a, b = every[:, None, :], every[None, :, :].expand(n, -1, -1)
    p_b = probs.unsqueeze(1).expand(-1, n, -1, -1).gather(3, b.clamp(max=v - 1).unsqueeze(-1)).squeeze(-1)
    dist = torch.zeros(n, dtype=torch.float64)
    dist[-1] = 1.0  # all masked
    for k in range(steps):
        stay = (1 - (k + 1) / steps) / (1 - k / steps)
        factor = torch.where(a != v, (a == b).double(), torch.where(b == v, stay, (1 - stay) * p_b))
        dist = dist @ factor.prod(dim=2)
    clean = (every != v).all(dim=1)
    law = torch.zeros(P.numel(), dtype=torch.float64)
    law[CHAIN.index(every[clean])] = dist[clean]
    return law


def test_fk_steering_on_the_ancestral_sampler_samples_the_tilt_of_its_own_law():
    """On a 4-step ancestral grid, whose law p_4 is off the chain's by TV 0.12 (enumerated), FK steering (K = 64,
    4000 groups, λ = 1) samples p_4·exp(λ r) (χ²), not p·exp(λ r) (measured: p = 0.58 and p ≈ 1e-100)."""
    k, groups, lam = 64, 4000, 1.0
    law = _ancestral_law(4)
    assert 0.1 < 0.5 * float((law - P).abs().sum()) < 0.15 and abs(float(law.sum()) - 1) < 1e-12
    fk = FKSteering(twos, k, lam=lam)
    out = _run(AncestralSampler(4), fk, k * groups, seed=3)
    steered = _one_per_group(out.tokens, k, seed=4)
    tilted = law * torch.exp(lam * twos(SEQUENCES))
    assert _chi2_p(steered, tilted / tilted.sum()) > 1e-3
    assert _chi2_p(steered, _tilted(lam)) < 1e-6
    assert [r.index for r in fk.history] == [0, 1, 2, 3] and out.nfe == 4


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["fhs", "ancestral"])
def test_fk_steering_at_lambda_zero_is_the_plain_sampler(sampler):
    """λ = 0: equal weights, systematic resampling keeps every particle, and with the guidance's own stream the
    sampler's draws are the plain ones: the same tokens bit for bit, at the same NFE."""
    plain = sampler.sample(_diffusion(), batch=512, length=4, generator=torch.Generator().manual_seed(5))
    fk = FKSteering(twos, 64, lam=0.0)
    out = _run(sampler, fk, 512, seed=5, guidance_generator=torch.Generator().manual_seed(6))
    assert torch.equal(out.tokens, plain.tokens)
    assert out.nfe == plain.nfe and out.steps == plain.steps
    assert len(fk.history) == plain.steps


def test_fk_steering_with_a_time_conditioned_model():
    """A model declared time-conditioned gets its t, no model output is reused (one more call per weighting step),
    and the tokens are those of the time-agnostic run (the exact denoiser ignores t)."""
    runs = [
        _run(FirstHittingSampler(), FKSteering(twos, 8, lam=1.0), 256, seed=7, diffusion=_diffusion(tc))
        for tc in (False, True)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].nfe, runs[1].nfe) == (4, 7)


def test_fk_steering_schedule_and_adaptive_resampling():
    """``interval`` and ``start`` pick the weighting steps by the sampler's time (the ancestral grid's t_k), the last
    step always weighs; with an ESS threshold some groups keep their weights; without a final resampling the
    weights stay."""
    fk = FKSteering(twos, 16, lam=1.0, interval=2)
    _run(AncestralSampler(8), fk, 64, seed=8)
    assert [r.index for r in fk.history] == [1, 3, 5, 7]
    fk = FKSteering(twos, 16, lam=1.0, start=0.5)  # t_k = 1 − k/8 ≤ 0.5 from k = 4
    _run(AncestralSampler(8), fk, 64, seed=8)
    assert [r.index for r in fk.history] == [4, 5, 6, 7]
    fk = FKSteering(twos, 16, lam=1.0, start=1e-9)  # first-hitting: the rows' largest time, never that small
    _run(FirstHittingSampler(), fk, 64, seed=8)
    assert [r.index for r in fk.history] == [3]
    fk = FKSteering(twos, 16, lam=1.0, ess_threshold=0.5)
    _run(FirstHittingSampler(), fk, 16 * 64, seed=9)
    kept = torch.stack([r.resampled for r in fk.history[:-1]])
    assert bool(kept.any()) and not bool(kept.all()) and bool(fk.history[-1].resampled.all())
    fk = FKSteering(twos, 16, lam=1.0, resample_final=False)
    out = _run(FirstHittingSampler(), fk, 64, seed=10)
    assert not bool(fk.history[-1].resampled.any()) and bool((fk.log_weights != 0).any())
    assert torch.equal(fk.rewards, twos(out.tokens))


# --- SVDD -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["fhs", "ancestral"])
def test_svdd_reward_rises_with_the_candidates(sampler):
    """SVDD-PM at α = 0 (argmax): the mean reward rises with M ∈ {1, 2, 4, 8} (measured on 4096 samples: FHS 1.19,
    2.25, 3.37, 3.91; ancestral 1.16, 2.11, 3.03, 3.55); M = 1 is the plain sampler bit for bit."""
    plain = sampler.sample(_diffusion(), batch=4096, length=4, generator=torch.Generator().manual_seed(11))
    means = []
    for m in (1, 2, 4, 8):
        svdd = SVDD(twos, m)
        out = _run(sampler, svdd, 4096, seed=11)
        if m == 1:
            assert torch.equal(out.tokens, plain.tokens) and out.nfe == plain.nfe
            assert svdd.history == [] and svdd.values is None
        else:
            assert len(svdd.history) == out.steps and tuple(svdd.values.shape) == (out.steps, 4096)
            record = svdd.history[-1]
            assert tuple(record.values.shape) == (4096, m)
            assert torch.equal(record.chosen_values, record.values.max(dim=1).values)  # α = 0: the argmax
            assert torch.equal(record.chosen_values, twos(out.tokens))  # the last step is valued by r itself
        means.append(float(twos(out.tokens).mean()))
    assert all(b > a + 0.3 for a, b in zip(means, means[1:])), means


def test_svdd_with_the_exact_soft_value_approaches_the_tilted_law():
    """With the exact soft value v = α log E[exp(r/α) | x] at α = 1 on the first-hitting sampler, the selection of
    one of M candidates ∝ exp(v/α) is self-normalised importance sampling of the soft-optimal step: the law
    approaches p·exp(r/α) as M grows (TV on 20 000 samples: 0.57, 0.19, 0.019 for M = 1, 4, 32)."""
    alpha = 1.0
    table = _soft_value_table(alpha)
    powers = (CHAIN.vocab_size + 1) ** torch.arange(CHAIN.length - 1, -1, -1)
    seen_times = []

    def soft_value(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_times.append(t)
        return table[(x * powers).sum(dim=1)]

    target = _tilted(1.0 / alpha)
    tvs = [_tv(_run(FirstHittingSampler(), SVDD(twos, 1, alpha=alpha, value=soft_value), 20_000, 12).tokens, target)]
    for m in (4, 32):
        svdd = SVDD(twos, m, alpha=alpha, value=soft_value)
        tvs.append(_tv(_run(FirstHittingSampler(), svdd, 20_000, seed=12).tokens, target))
    assert tvs[0] > 0.4 and tvs[1] < tvs[0] - 0.2 and tvs[2] < tvs[1] / 3 and tvs[2] < 0.05, tvs
    assert seen_times and all(t.dtype == torch.float64 and t.shape == (20_000 * 32,) for t in seen_times[-3:])
    assert all(math.isnan(r.sigma) for r in svdd.history)


def test_svdd_on_a_time_conditioned_model_and_by_rollouts():
    """Time-conditioned: the candidates' model call runs on the B·M rows at their own hitting times, with the same
    tokens as the time-agnostic run (one call on B rows). ``value="mc"`` (rollouts of the plain sampler) raises the
    reward with M too."""
    runs = [_run(FirstHittingSampler(), SVDD(twos, 4), 256, seed=13, diffusion=_diffusion(tc)) for tc in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].nfe, runs[1].nfe) == (4, 7)
    for sampler in SAMPLERS:
        means = [
            float(twos(_run(sampler, SVDD(twos, m, value="mc", rollouts=4), 1024, seed=14).tokens).mean())
            for m in (1, 8)
        ]
        assert means[1] > means[0] + 1.5, means
    svdd = SVDD(twos, 2, value="mc", rollout_steps=2)
    out = _run(AncestralSampler(8), svdd, 64, seed=15)
    assert [r.sigma for r in svdd.history] == [1 - k / 8 for k in range(1, 9)]
    assert out.nfe > 8


def test_first_hitting_step_candidates():
    """``candidates=M`` replays the step M times per row from one model output: each candidate unmasks one masked
    position of its row and keeps the rest; with precomputed logits the draws are the same as without."""
    d = _diffusion()
    x = torch.tensor([[3, 0, 3, 3], [1, 1, 3, 2]])
    t = torch.tensor([0.9, 0.5], dtype=torch.float64)
    out, times = first_hitting_step(d, x, t, torch.Generator().manual_seed(0), candidates=5)
    assert tuple(out.shape) == (10, 4) and tuple(times.shape) == (10,)
    owners = x.repeat_interleave(5, dim=0)
    assert torch.equal(((out != owners).sum(dim=1)), torch.ones(10, dtype=torch.int64))
    assert bool(((owners == 3) | (out == owners)).all()) and bool((times < t.repeat_interleave(5)).all())
    again, _ = first_hitting_step(d, x, t, torch.Generator().manual_seed(0), candidates=5, logits=d.logits(x, None))
    assert torch.equal(out, again)
    assert torch.equal(argmax_x0(d, x, d.logits(x, None))[:, 1], x[:, 1])


# --- bad inputs -----------------------------------------------------------------------------------------------------


def test_bad_inputs():
    fhs = FirstHittingSampler()
    with pytest.raises(ValueError, match="multiple of 8"):
        _run(fhs, FKSteering(twos, 8), 12, seed=0)

    def nan_reward(x):
        return torch.full((x.shape[0],), math.nan, dtype=torch.float64)

    with pytest.raises(ValueError, match=r"nan_reward.*step 1 of 4"):
        _run(fhs, FKSteering(nan_reward, 4), 8, seed=0)

    def short_reward(x):
        return torch.zeros(x.shape[0] - 1)

    with pytest.raises(ValueError, match=r"short_reward.*shape \(16,\)"):
        _run(fhs, SVDD(short_reward, 2), 8, seed=0)
    with pytest.raises(ValueError, match="gradient_scale"):
        GuidedMaskedSampler(fhs, FKSteering(twos, 4, gradient_scale=1.0))
    with pytest.raises(ValueError, match="ClassifierFree"):
        GuidedMaskedSampler(fhs, ClassifierFree(2.0))
    with pytest.raises(ValueError, match="rollout_steps=3"):
        GuidedMaskedSampler(fhs, SVDD(twos, 2, value="mc", rollout_steps=3))
    with pytest.raises(ValueError, match="candidates"):
        first_hitting_step(_diffusion(), torch.full((2, 4), 3), torch.ones(2), None, candidates=0)
    with pytest.raises(ValueError, match="time-agnostic"):
        x = torch.full((2, 4), 3)
        first_hitting_step(_diffusion(True), x, torch.ones(2), None, logits=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="token id 7"):
        GuidedMaskedSampler(fhs, SVDD(twos, 2)).sample(_diffusion(), torch.tensor([[7, 3, 3, 3]]))
    with pytest.raises(ValueError, match="start_time"):
        _run(fhs, SVDD(twos, 2), 4, seed=0, start_time=0.0)
