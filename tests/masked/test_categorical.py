"""Precise categorical sampling: correctness in both precisions, the float32 truncation and its effect on the
effective temperature of the MDLM ancestral step (Zheng et al. 2024, arXiv:2409.02908, Sec. 5), chunking."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffsamplers.masked.categorical import categorical, effective_temperature
from diffsamplers.masked.samplers import ancestral_probabilities

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_draws_follow_the_distribution(kind, dtype):
    p = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    x = (p.log() + 7.0) if kind == "logits" else 3.0 * p  # unnormalised either way
    g = torch.Generator().manual_seed(11)
    n = 40_000
    draws = categorical(x.expand(n, 5), g, kind=kind, dtype=dtype)
    counts = torch.bincount(draws, minlength=5)
    assert counts[4] == 0  # a token of probability 0 is never drawn
    assert stats.chisquare(counts[:4].numpy(), n * p[:4].numpy()).pvalue > 1e-3


def test_float32_uniforms_cap_the_gumbel_noise():
    """float32 uniforms are multiples of 2^-24, so the Gumbel noise −log(−log U) never exceeds 16.63; a token of
    relative weight 1e-9 then never wins: w_1/E_1 ≤ 1e-9/5.96e-8 = 0.017 < 1/E_0 unless E_0 > 60, impossible in
    float32 (E_0 ≤ 16.6)."""
    x = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(10**6, generator=g, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u))
    assert float(gumbel.max()) <= 16.64 and float(-torch.log(-torch.log(torch.tensor(1 - 2**-24)))) > 16.6
    assert (categorical(x.expand(10**5, 2), g, kind="probs", dtype=torch.float32) == 0).all()


def test_chunking_gives_identical_samples():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 5, 11, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        whole = categorical(logits, torch.Generator().manual_seed(5), dtype=dtype)
        for chunk_rows in (1, 7, 64, 10_000):
            chunked = categorical(logits, torch.Generator().manual_seed(5), dtype=dtype, chunk_rows=chunk_rows)
            assert torch.equal(whole, chunked)
        assert whole.shape == (37, 5)


def test_bad_arguments():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="'softmax'"):
        categorical(x, None, kind="softmax")
    with pytest.raises(ValueError, match="float16"):
        categorical(x, None, dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk_rows.*0"):
        categorical(x, None, chunk_rows=0)


def test_effective_temperature_recovers_a_known_temperature():
    """The MLE fit on an exactly tempered float64 sampler: T = 0.7 within 4 standard errors, and T = 1 for p."""
    v = 200
    p = torch.arange(1, v + 1, dtype=torch.float64) ** -1.1
    p /= p.sum()
    for temperature in (0.7, 1.0, 1.5):
        tempered = p.log() / temperature
        fit = effective_temperature(
            lambda n, gen, tempered=tempered: categorical(tempered.expand(n, v), gen),
            p,
            draws=20_000,
            generator=torch.Generator().manual_seed(1),
        )
        assert fit.events == 20_000
        assert abs(fit.temperature - temperature) < 4 * fit.stderr, (temperature, fit.temperature, fit.stderr)
        assert fit.stderr < 0.03 * temperature


def test_float32_lowers_the_effective_temperature_of_the_ancestral_step():
    """The MDLM ancestral step at the first of T = 4096 steps (m_t = 1, m_s = 1 − 1/4096: each masked position
    unmasks with probability 2.4e-4), on a long-tailed p over V = 5000 tokens: one token of probability 0.5 and 4999
    tokens sharing the other half (p ≈ 1.0e-4 each, so p·Δm/m_s ≈ 0.4·2^-24). In float32 the race's noise is
    capped (E ≥ 5.96e-8), so a tail token beats the mask only when the mask's E is large: tail tokens are
    under-drawn and the fitted temperature falls below 1 (≈ 0.84 by a semi-analytic estimate that ignores
    token–token competition; 0.905 ± 0.034 at this seed); in float64 it is 1 within tolerance (1.05 ± 0.05).

    The effect changes at most one outcome per 2^24 uniforms, hence the size: 1.2e9 float32 and 6e8 float64
    uniforms (≈ 58 and 29 unmask events)."""
    v = 5000
    p = torch.full((v,), 0.5 / (v - 1), dtype=torch.float64)
    p[0] = 0.5
    steps = 4096
    row = ancestral_probabilities(p, 1.0, 1.0 - 1.0 / steps)  # (V + 1,): tokens, then the mask (index V: dropped)

    def fit(dtype: torch.dtype, rows: int):
        sampler = lambda n, gen: categorical(row.expand(n, v + 1), gen, kind="probs", dtype=dtype, chunk_rows=2000)
        return effective_temperature(sampler, p, draws=rows, generator=torch.Generator().manual_seed(7), batch=40_000)

    low = fit(torch.float32, 240_000)
    exact = fit(torch.float64, 120_000)
    print(
        f"float32: T = {low.temperature:.3f} ± {low.stderr:.3f} ({low.events} events); "
        f"float64: T = {exact.temperature:.3f} ± {exact.stderr:.3f} ({exact.events} events)"
    )
    assert low.temperature + 2 * low.stderr < 1.0
    assert abs(exact.temperature - 1.0) < 3 * exact.stderr
    # the events themselves: the share of tail tokens, 1/2 exactly, is far lower in float32
    tail32 = float(low.counts[1:].sum()) / low.events
    tail64 = float(exact.counts[1:].sum()) / exact.events
    assert tail32 < 0.5 - 2 * math.sqrt(0.25 / low.events) < tail64
