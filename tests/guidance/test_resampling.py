"""Resampling of weighted particles: the four schemes are unbiased, the low-variance ones keep ⌊K·w⌋ … ⌈K·w⌉
copies, groups never mix, adaptive resampling gates on the ESS, and bad weights fail loudly."""

import math

import pytest
import torch

from diffsamplers.guidance.resampling import (
    SCHEMES,
    effective_sample_size,
    normalised_weights,
    resample,
    resample_adaptively,
)

K = 8
WEIGHTS = torch.tensor([0.30, 0.02, 0.18, 0.05, 0.25, 0.0, 0.12, 0.08], dtype=torch.float64)


def _uniforms(groups: int, seed: int) -> torch.Tensor:
    return torch.rand(groups, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _counts(ancestors: torch.Tensor, groups: int) -> torch.Tensor:
    local = ancestors.view(groups, K) % K
    return torch.stack([torch.bincount(row, minlength=K) for row in local]).to(torch.float64)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_unbiased(scheme):
    """Over 4,000 groups with the same weights, the mean number of offspring is K·w (to 4 standard errors)."""
    groups = 4000
    log_w = WEIGHTS.log().expand(groups, K)
    counts = _counts(resample(log_w, _uniforms(groups, 1), scheme), groups)
    assert torch.equal(counts.sum(dim=1), torch.full((groups,), float(K), dtype=torch.float64))
    mean, err = counts.mean(dim=0), counts.std(dim=0) / math.sqrt(groups)
    expected = K * WEIGHTS
    assert torch.all((mean - expected).abs() <= 4 * err + 1e-12), (mean, expected)
    assert counts[:, 5].max() == 0  # a particle of weight 0 never has offspring


@pytest.mark.parametrize("scheme", ["systematic", "residual", "stratified"])
def test_low_variance_schemes_keep_the_expected_copies(scheme):
    """Systematic and residual resampling give every particle ⌊K·w⌋ or more copies (systematic: at most ⌈K·w⌉);
    their variance is below multinomial's."""
    groups = 2000
    log_w = WEIGHTS.log().expand(groups, K)
    counts = _counts(resample(log_w, _uniforms(groups, 2), scheme), groups)
    floor, ceil = torch.floor(K * WEIGHTS), torch.ceil(K * WEIGHTS)
    if scheme in ("systematic", "residual"):
        assert torch.all(counts >= floor)
    if scheme == "systematic":
        assert torch.all(counts <= ceil)
    multinomial = _counts(resample(log_w, _uniforms(groups, 2), "multinomial"), groups)
    assert counts.var(dim=0).sum() < multinomial.var(dim=0).sum()


def test_groups_never_mix_and_indices_are_flat_rows():
    log_w = torch.stack([WEIGHTS.log(), WEIGHTS.flip(0).log(), torch.zeros(K, dtype=torch.float64)])
    ancestors = resample(log_w, _uniforms(3, 3), "systematic").view(3, K)
    for g in range(3):
        assert torch.all((ancestors[g] >= g * K) & (ancestors[g] < (g + 1) * K))
    assert torch.equal(ancestors[2], torch.arange(2 * K, 3 * K))  # equal weights: systematic keeps each once


def test_a_single_survivor_is_copied_everywhere():
    log_w = torch.full((1, K), -math.inf, dtype=torch.float64)
    log_w[0, 3] = 0.0
    for scheme in SCHEMES:
        assert torch.equal(resample(log_w, _uniforms(1, 4), scheme), torch.full((K,), 3))


def test_effective_sample_size_and_weights():
    equal = torch.zeros(2, K, dtype=torch.float64)
    assert torch.allclose(effective_sample_size(equal), torch.full((2,), float(K), dtype=torch.float64))
    one = torch.full((1, K), -math.inf, dtype=torch.float64)
    one[0, 0] = 5.0
    assert effective_sample_size(one).item() == pytest.approx(1.0)
    w = normalised_weights(WEIGHTS.log().unsqueeze(0) + 100.0)  # shifts cancel; no overflow
    assert torch.allclose(w[0], WEIGHTS)


def test_adaptive_resampling_gates_on_the_ess():
    peaked = torch.tensor([[0.0] + [-20.0] * (K - 1)], dtype=torch.float64)  # ESS ≈ 1
    flat = torch.zeros(1, K, dtype=torch.float64)  # ESS = K
    log_w = torch.cat([flat, peaked])
    ancestors, new_log_w, resampled = resample_adaptively(log_w, _uniforms(2, 5), threshold=0.5)
    assert resampled.tolist() == [False, True]
    assert torch.equal(ancestors[:K], torch.arange(K))  # kept: identity, weights unchanged
    assert torch.equal(new_log_w[0], flat[0]) and torch.equal(new_log_w[1], torch.zeros(K, dtype=torch.float64))
    assert torch.equal(ancestors[K:], torch.full((K,), K))  # resampled: all copies of the survivor


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: resample(torch.full((2, K), -math.inf), _uniforms(2, 0)), r"group\(s\) \[0, 1\] has weight 0"),
        (lambda: resample(torch.tensor([[0.0, math.nan]]), torch.rand(1, 2)), "NaN or \\+inf"),
        (lambda: resample(torch.zeros(K), torch.rand(K)), r"shape \(groups, particles\), got \(8,\)"),
        (lambda: resample(torch.zeros(2, K), torch.rand(2, K - 1)), r"uniforms must have shape \(2, 8\)"),
        (lambda: resample(torch.zeros(1, K), torch.rand(1, K), "bogus"), "unknown resampling scheme 'bogus'"),
        (lambda: resample_adaptively(torch.zeros(1, K), torch.rand(1, K), 0.0), r"threshold must lie in \(0, 1\]"),
        (lambda: resample_adaptively(torch.zeros(1, K), torch.rand(1, K), 1.5), "got 1.5"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
