"""Fréchet distance between Gaussian fits of features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule…", Eq. 6): d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}).

Statistics accumulate in float64 as running sums (n, Σx, Σxxᵀ), so they merge exactly across batches,
shards and processes, and save/load as ``.npz`` with ``mu`` and ``sigma`` (the convention of pytorch-fid,
clean-fid and EDM) plus ``n``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["FeatureStats", "frechet_distance", "load_stats", "save_stats"]


@dataclass
class FeatureStats:
    """Running float64 sums of features: n, Σx and Σxxᵀ."""

    dim: int
    n: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim))

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        f = (
            features.detach().cpu().double().numpy()
            if isinstance(features, torch.Tensor)
            else np.asarray(features, np.float64)
        )
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN/Inf")
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-dimensional statistics into {self.dim}-dimensional ones")
        self.n += other.n
        self.total += other.total
        self.outer += other.outer
        return self

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self.total / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by n − 1), as torchmetrics, pytorch-fid and clean-fid."""
        self._need(2)
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"need at least {k} samples for these statistics, have {self.n}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d²(N(μ₁, Σ₁), N(μ₂, Σ₂)), with tr((Σ₁Σ₂)^{1/2}) = Σ √λᵢ(Σ₁Σ₂) (the eigenvalues are real and ≥ 0 for
    PSD Σ₁, Σ₂; tiny negative or imaginary round-off is dropped)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics of different feature spaces: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int, **metadata: str) -> None:
    """Write ``mu``, ``sigma``, ``n`` (and string metadata) to an ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        n=np.int64(n),
        **{k: np.str_(v) for k, v in metadata.items()},
    )
    os.replace(tmp, path)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(mu, sigma, metadata) from an ``.npz`` with ``mu`` and ``sigma`` (any producer's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (found {sorted(data.files)})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        meta = {k: str(data[k]) for k in data.files if k not in ("mu", "sigma")}
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: sigma has shape {sigma.shape} for a mean of size {mu.size}")
    return mu, sigma, meta
