"""The ancestral (MDLM) and first-hitting samplers against an exact model: a length-4 Markov chain over 3 tokens
whose denoiser is enumerated (Zheng et al. 2024, arXiv:2409.02908: FHS is exact for an exact time-agnostic
denoiser; the T-step ancestral sampler converges to it as T grows)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from diffsamplers.masked.samplers import (
    AncestralSampler,
    FirstHittingSampler,
    MaskedDiffusion,
    ancestral_step,
    first_hitting_step,
)
from diffsamplers.masked.schedules import CosineMasking, LinearMasking, masking_schedule
from diffsamplers.models.markov_chain import MarkovChainModel, default_markov_chain

pytestmark = pytest.mark.usefixtures("single_thread")

N = 20_000


@pytest.fixture(scope="module")
def chain():
    return default_markov_chain()


def _diffusion(model, schedule=None, **kw):
    return MaskedDiffusion(
        model, model.vocab_size, schedule or LinearMasking(), context_length=model.length, time_conditioned=False, **kw
    )


def _counts(model, tokens):
    return torch.bincount(model.index(tokens), minlength=model.probabilities.numel()).double()


def _chi2_p(model, tokens):
    counts = _counts(model, tokens)
    return stats.chisquare(counts.numpy(), (counts.sum() * model.probabilities).numpy()).pvalue


def _tv(model, tokens):
    counts = _counts(model, tokens)
    return 0.5 * float((counts / counts.sum() - model.probabilities).abs().sum())


@pytest.fixture(scope="module")
def runs(chain):
    """Samples of every sampler on the exact chain, at fixed seeds (shared by the tests below)."""
    d = _diffusion(chain)
    out = {"exact": chain.sample(N, torch.Generator().manual_seed(0))}
    for k in (1, 2):
        out[f"fhs{k}"] = FirstHittingSampler(k).sample(d, batch=N, length=4, generator=torch.Generator().manual_seed(1))
    out["fhs-cosine"] = FirstHittingSampler().sample(
        _diffusion(chain, CosineMasking()), batch=N, length=4, generator=torch.Generator().manual_seed(2)
    )
    for steps in (2, 8, 32, 200):
        out[f"anc{steps}"] = AncestralSampler(steps).sample(
            d, batch=N, length=4, generator=torch.Generator().manual_seed(3)
        )
    return out


def test_first_hitting_sampler_is_exact(chain, runs):
    for name in ("fhs1", "fhs-cosine"):
        assert runs[name].nfe == 4  # one model call per token
        assert _chi2_p(chain, runs[name].tokens) > 1e-3, name
    assert _chi2_p(chain, runs["exact"]) > 1e-3


def test_fine_ancestral_grid_is_exact_and_a_coarse_one_is_not(chain, runs):
    assert _chi2_p(chain, runs["anc200"].tokens) > 1e-3
    # T = 2: positions unmasked in the same step are drawn independently from the same conditionals
    assert _chi2_p(chain, runs["anc2"].tokens) < 1e-12
    # parallel FHS (2 tokens per call) makes the same approximation
    assert _chi2_p(chain, runs["fhs2"].tokens) < 1e-12
    tv = {steps: _tv(chain, runs[f"anc{steps}"].tokens) for steps in (2, 8, 32, 200)}
    tv_fhs, tv_exact = _tv(chain, runs["fhs1"].tokens), _tv(chain, runs["exact"])
    print(f"TV: ancestral {tv}, FHS {tv_fhs:.4f}, exact samples {tv_exact:.4f}")
    assert tv[2] > tv[8] > tv[32] > tv[200] - 0.005
    assert tv[2] > 5 * tv_fhs and abs(tv[200] - tv_fhs) < 0.01


def test_infilling_from_a_partially_masked_start(chain):
    """From x = (0, mask, mask, 2), both samplers draw the two middle tokens from their exact conditional law."""
    d = _diffusion(chain)
    start = torch.tensor([[0, 3, 3, 2]]).expand(N, 4)
    compatible = (chain.sequences[:, 0] == 0) & (chain.sequences[:, 3] == 2)
    target = chain.probabilities * compatible
    target = (target / target.sum())[compatible]
    for sampler in (FirstHittingSampler(), AncestralSampler(100)):
        out = sampler.sample(d, start, generator=torch.Generator().manual_seed(4))
        assert (out.tokens[:, 0] == 0).all() and (out.tokens[:, 3] == 2).all()
        counts = _counts(chain, out.tokens)[compatible]
        assert stats.chisquare(counts.numpy(), (N * target).numpy()).pvalue > 1e-3, type(sampler).__name__
    assert FirstHittingSampler().sample(d, start, generator=torch.Generator().manual_seed(4)).nfe == 2


def test_first_hitting_time_law_for_the_cosine_schedule():
    """P(τ < s) = (m(s)/m(t))^n: the times the step function moves to (KS test), and the step at which the first
    token unmasks under a fine ancestral grid (binned, an independent mechanism: the per-step m_s/m_t)."""
    schedule = CosineMasking()
    d = MaskedDiffusion(lambda x, t: torch.zeros(*x.shape, 3), 3, schedule, time_conditioned=True)
    n, t0, rows = 5, 0.8, 20_000
    x = torch.full((rows, 8), 3)
    x[:, n:] = 0  # n masked tokens per row
    g = torch.Generator().manual_seed(5)
    _, tau = first_hitting_step(d, x, torch.full((rows,), t0, dtype=torch.float64), g)
    cdf = lambda s: (schedule.mask_probability(torch.as_tensor(s, dtype=torch.float64)) / schedule(t0)) ** n
    assert stats.kstest(tau.numpy(), lambda s: cdf(s).numpy()).pvalue > 1e-3
    assert not stats.kstest(tau.numpy(), lambda s: (s / t0) ** n).pvalue > 1e-3  # not the linear law
    # the fine ancestral grid: first step (from t0, 400 steps) in which any of the n tokens unmasks
    steps = 400
    grid = [t0 * (1 - k / steps) for k in range(steps + 1)]
    probs = torch.full((rows, 8, 3), 1 / 3, dtype=torch.float64)
    state, first = x.clone(), torch.full((rows,), steps)
    for k in range(steps):
        nxt = ancestral_step(d, state, probs, schedule(grid[k]), schedule(grid[k + 1]), g)
        first = torch.where((first == steps) & (nxt != state).any(dim=1), k, first)
        state = nxt
    bins = [0, 80, 160, 240, 320, 400]  # the first unmask falls in [t_{k+1}, t_k): binned by grid time
    edges = torch.tensor([grid[b] for b in bins], dtype=torch.float64)
    expected = (cdf(edges[:-1]) - cdf(edges[1:])) * rows
    observed = torch.histc(first.double(), bins=5, min=0, max=400)
    assert (
        stats.chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue
        > 1e-3
    )


def test_a_factorised_model_gives_every_sampler_the_same_law():
    """With independent positions (every transition row equal to the initial law) simultaneous unmasking is exact:
    all samplers at every T reproduce the product law."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    model = MarkovChainModel(pi, pi.expand(3, 3), 4)
    d = _diffusion(model, masking_schedule("poly:p=2"))
    for i, sampler in enumerate(
        [AncestralSampler(1), AncestralSampler(2), AncestralSampler(5), FirstHittingSampler(1), FirstHittingSampler(3)]
    ):
        out = sampler.sample(d, batch=N, length=4, generator=torch.Generator().manual_seed(10 + i))
        assert _chi2_p(model, out.tokens) > 1e-3, sampler


def test_cache_saves_calls_and_changes_nothing(chain):
    d = _diffusion(chain)
    counted = {"calls": 0}

    def model(x, t):
        counted["calls"] += 1
        return chain(x, t)

    dc = MaskedDiffusion(model, 3, context_length=4, time_conditioned=False)
    for steps in (1, 16, 200):
        cached = AncestralSampler(steps).sample(dc, batch=16, length=4, generator=torch.Generator().manual_seed(6))
        assert counted["calls"] == cached.nfe
        counted["calls"] = 0
        plain = AncestralSampler(steps, cache=False).sample(
            d, batch=16, length=4, generator=torch.Generator().manual_seed(6)
        )
        assert torch.equal(cached.tokens, plain.tokens)
        assert plain.nfe == steps
        assert cached.nfe <= min(steps, cached.changed_steps + 1)
        if steps == 200:
            assert cached.nfe < 70  # at most 16·4 unmask events, so at most 64 steps change a token
    # a time-conditioned model is never cached
    dt = MaskedDiffusion(chain, 3, context_length=4, time_conditioned=True)
    assert AncestralSampler(50).sample(dt, batch=2, length=4, generator=torch.Generator().manual_seed(0)).nfe == 50


def test_bad_input_names_the_value(chain):
    d = _diffusion(chain)
    with pytest.raises(ValueError, match="token id 7"):
        AncestralSampler(4).sample(d, torch.tensor([[0, 7, 3, 3]]))
    with pytest.raises(ValueError, match="token id -1"):
        FirstHittingSampler().sample(d, torch.tensor([[0, -1, 3, 3]]))
    with pytest.raises(ValueError, match="mask id 2"):
        MaskedDiffusion(chain, 3, mask_id=2)
    with pytest.raises(ValueError, match="length 5 exceeds the model's context of 4"):
        FirstHittingSampler().sample(d, batch=2, length=5)
    with pytest.raises(ValueError, match="steps=0"):
        AncestralSampler(0)
    with pytest.raises(ValueError, match="steps=-3"):
        AncestralSampler(-3)
    with pytest.raises(ValueError, match="k=0"):
        FirstHittingSampler(0)
    with pytest.raises(ValueError, match="shape"):
        chain(torch.full((1, 5), 3))
