"""The minority score (Um, Lee & Ye 2024, Eq. 5) and its equal-frequency quantisation (Eq. 6)."""

from __future__ import annotations

import pytest
import torch

from diffsamplers.models.gmm import GaussianMixture, default_process
from diffsamplers.tuning.minority import assign_levels, minority_levels, minority_score

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tight_gaussian():
    """One Gaussian N(0, 0.1² I) in 4 dimensions and its exact denoiser on DDPM's linear-β process."""
    gmm = GaussianMixture.from_covariances(torch.zeros(1, 4), 0.01 * torch.eye(4)[None], sample_shape=(4,))
    return gmm, gmm.as_denoiser(default_process())


def test_score_is_seeded_and_independent_of_the_batch(tight_gaussian):
    gmm, den = tight_gaussian
    x0 = gmm.sample(9, generator=torch.Generator().manual_seed(0)).float()
    a = minority_score(den, x0, num_draws=3, seed=5, clip=None)
    assert a.shape == (9,) and a.dtype == torch.float32
    assert torch.equal(a, minority_score(den, x0, num_draws=3, seed=5, clip=None, batch_size=2))
    assert not torch.equal(a, minority_score(den, x0, num_draws=3, seed=6, clip=None))


def test_an_outlier_scores_higher_than_typical_samples(tight_gaussian):
    """Tweedie's x̂0 is pulled to the mode: a sample 8 standard deviations out is reconstructed badly."""
    gmm, den = tight_gaussian
    typical = gmm.sample(64, generator=torch.Generator().manual_seed(1)).float()
    outlier = torch.full((1, 4), 0.8)
    scores = minority_score(den, torch.cat([typical, outlier]), num_draws=8, seed=0, clip=None)
    assert scores[-1] > 3 * scores[:-1].max()


def test_perturbation_level_as_time_or_sigma_tilde(tight_gaussian):
    gmm, den = tight_gaussian
    x0 = gmm.sample(5, generator=torch.Generator().manual_seed(2)).float()
    sigma_tilde = float(den.process.sigma_tilde(0.6 * den.process.t_max))
    by_time = minority_score(den, x0, time=0.6, seed=0, clip=None)
    torch.testing.assert_close(by_time, minority_score(den, x0, time=None, sigma_tilde=sigma_tilde, seed=0, clip=None))
    with pytest.raises(ValueError, match="exactly one of time"):
        minority_score(den, x0, time=0.6, sigma_tilde=1.0)
    with pytest.raises(ValueError, match=r"normalised perturbation time in \(0, 1\], got 1.5"):
        minority_score(den, x0, time=1.5)


def test_distances(tight_gaussian):
    gmm, den = tight_gaussian
    x0 = gmm.sample(3, generator=torch.Generator().manual_seed(3)).float()
    # a callable distance; with one draw the squared distance is the square of "l2"
    squared = minority_score(den, x0, distance=lambda a, b: ((a - b) ** 2).sum(1), seed=0, clip=None, num_draws=1)
    plain = minority_score(den, x0, distance="l2", seed=0, clip=None, num_draws=1)
    torch.testing.assert_close(squared, plain**2)
    with pytest.raises(ValueError, match="unknown distance 'lp'"):
        minority_score(den, x0, distance="lp")
    with pytest.raises(FileNotFoundError, match="vgg"):  # no LPIPS weights on this machine: named, not downloaded
        minority_score(den, x0, distance="lpips")


def test_equal_frequency_levels():
    for n, levels in ((1438, 10), (1000, 10), (37, 4), (20, 10)):
        scores = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        labels, thresholds = minority_levels(scores, levels)
        counts = torch.bincount(labels, minlength=levels)
        assert labels.min() == 0 and labels.max() == levels - 1 and counts.numel() == levels
        assert set(counts.tolist()) <= {n // levels, -(-n // levels)}, counts
        assert thresholds.shape == (levels - 1,) and bool((thresholds.diff() > 0).all())
        # a higher score never gets a lower level, and new scores are placed by the same thresholds
        order = scores.argsort()
        assert bool((labels[order].diff() >= 0).all())
        assert torch.equal(assign_levels(scores, thresholds), labels)
    assert assign_levels(torch.tensor([-1e9, 1e9]), thresholds).tolist() == [0, levels - 1]


def test_level_errors():
    with pytest.raises(ValueError, match="at least 2"):
        minority_levels(torch.randn(10), 1)
    with pytest.raises(ValueError, match="3 scores cannot fill 5"):
        minority_levels(torch.randn(3), 5)
    with pytest.raises(ValueError, match="NaN"):
        minority_levels(torch.tensor([0.0, float("nan"), 1.0]), 2)
