"""Mean and covariance of a data set, the statistics of the Gaussian score approximation.

Wang & Vastola 2024, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications" (TMLR; arXiv:2412.09726): the score of a trained model at moderate-to-high noise is
close to that of N(μ, Σ) with the data's mean and covariance. :class:`GaussianStatistics` holds
Σ = U diag(λ) Uᵀ + ρ (I − U Uᵀ): r eigenpairs plus an isotropic variance ρ for the other d − r directions
(ρ = 0 and r = d for the full covariance; the paper's low-rank variant has ρ = 0 off the span). It comes

* from data (:meth:`GaussianStatistics.from_data`): a tensor, or a stream of batches accumulated in float64 —
  exactly (Chan et al. 1979 pairwise update of mean and scatter matrix) for the full covariance, or, for large
  images, with the single-pass Nyström sketch of Tropp, Yurtsever, Udell & Cevher 2017 ("Fixed-rank
  approximation of a positive-semidefinite matrix from streaming data", Alg. 3) plus the exact trace;
* from moments (:meth:`GaussianStatistics.from_moments`), with a check that Σ is symmetric positive
  semi-definite (negative eigenvalues are clipped to 0 with a warning, or raise with ``psd="error"``);
* analytically from a :class:`~diffsamplers.models.gmm.GaussianMixture` (:meth:`GaussianStatistics.from_gmm`).

Statistics save and load as safetensors with JSON metadata.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..artifacts import load_artifact, save_artifact
from ..data import DataSource, iter_batches

__all__ = [
    "GaussianStatistics",
    "StatisticsAccumulator",
    "class_statistics",
    "load_class_statistics",
    "save_class_statistics",
]

PsdPolicy = Literal["clip", "error"]
_KIND = "gaussian_statistics"
_CLASS_KIND = "gaussian_statistics_by_class"


def _psd_eigh(cov: torch.Tensor, psd: PsdPolicy, what: str = "covariance") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (descending) of a symmetric PSD matrix; negative eigenvalues beyond round-off per ``psd``."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError(f"{what} contains NaN or Inf")
    scale = float(cov.abs().max()) or 1.0
    asym = float((cov - cov.T).abs().max())
    if asym > 1e-8 * scale:
        raise ValueError(f"{what} is not symmetric: max |Σ − Σᵀ| = {asym:.3g}")
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    vals, vecs = vals.flip(0), vecs.flip(1)
    tol = 1e-10 * max(float(vals[0]), 0.0) * cov.shape[0] + 1e-300
    smallest = float(vals[-1])
    if smallest < -tol:
        msg = f"{what} is not positive semi-definite: smallest eigenvalue {smallest:.6g} (largest {float(vals[0]):.6g})"
        if psd == "error":
            raise ValueError(msg)
        if psd != "clip":
            raise ValueError(f"unknown psd policy {psd!r}: expected 'clip' or 'error'")
        warnings.warn(msg + "; negative eigenvalues clipped to 0", RuntimeWarning, stacklevel=3)
    return vals.clamp_min(0.0), vecs


@dataclass(frozen=True)
class GaussianStatistics:
    """N(μ, U diag(λ) Uᵀ + ρ (I − U Uᵀ)) over samples of shape ``sample_shape`` (float64 tensors on the CPU)."""

    mean: torch.Tensor  # (d,)
    eigvals: torch.Tensor  # (r,), descending, ≥ 0
    eigvecs: torch.Tensor  # (d, r), orthonormal columns
    residual_variance: float = 0.0
    sample_shape: tuple[int, ...] = ()
    num_samples: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        d = self.mean.numel()
        shape = tuple(int(s) for s in (self.sample_shape or (d,)))
        object.__setattr__(self, "sample_shape", shape)
        if math.prod(shape) != d:
            raise ValueError(f"sample_shape {shape} does not hold the {d} values of the mean")
        if self.eigvecs.ndim != 2 or self.eigvecs.shape[0] != d or self.eigvals.shape != (self.eigvecs.shape[1],):
            raise ValueError(
                f"inconsistent shapes: mean ({d},), eigvals {tuple(self.eigvals.shape)}, eigvecs {tuple(self.eigvecs.shape)}"
            )
        if torch.any(self.eigvals < 0) or not torch.isfinite(self.eigvals).all():
            raise ValueError(f"eigenvalues must be finite and non-negative, min {float(self.eigvals.min()):.3g}")
        if not math.isfinite(self.residual_variance) or self.residual_variance < 0:
            raise ValueError(f"residual_variance must be finite and non-negative, got {self.residual_variance}")
        for name in ("mean", "eigvals", "eigvecs"):
            object.__setattr__(self, name, getattr(self, name).detach().to("cpu", torch.float64))

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def rank(self) -> int:
        return int(self.eigvals.numel())

    def covariance(self) -> torch.Tensor:
        """The full d × d covariance (only for moderate d)."""
        u = self.eigvecs
        cov = (u * self.eigvals) @ u.T
        if self.residual_variance and self.rank < self.dim:
            cov = cov + self.residual_variance * (torch.eye(self.dim, dtype=torch.float64) - u @ u.T)
        return cov

    def truncate(self, rank: int) -> GaussianStatistics:
        """Keep the top ``rank`` eigenpairs; the rest becomes the isotropic residual (same total variance)."""
        if not 0 < rank <= self.rank:
            raise ValueError(f"rank must lie in 1..{self.rank}, got {rank}")
        dropped = float(self.eigvals[rank:].sum()) + self.residual_variance * (self.dim - self.rank)
        rho = dropped / (self.dim - rank) if rank < self.dim else 0.0
        return GaussianStatistics(
            self.mean,
            self.eigvals[:rank],
            self.eigvecs[:, :rank],
            rho,
            self.sample_shape,
            self.num_samples,
            self.source,
        )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_moments(
        cls,
        mean: Any,
        covariance: Any,
        sample_shape: Sequence[int] | None = None,
        rank: int | None = None,
        psd: PsdPolicy = "clip",
        num_samples: int | None = None,
        source: str = "moments",
    ) -> GaussianStatistics:
        """From a mean and a covariance matrix; a covariance that is not PSD is repaired (``psd="clip"``, with a
        warning naming the smallest eigenvalue) or rejected (``psd="error"``)."""
        mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        if cov.shape != (mu.numel(), mu.numel()):
            raise ValueError(f"covariance must be {mu.numel()} × {mu.numel()}, got {tuple(cov.shape)}")
        if not torch.isfinite(mu).all():
            raise ValueError("mean contains NaN or Inf")
        vals, vecs = _psd_eigh(cov, psd)
        stats = cls(mu, vals, vecs, 0.0, tuple(sample_shape or (mu.numel(),)), num_samples, source)
        return stats if rank is None or rank == stats.rank else stats.truncate(rank)

    @classmethod
    def from_data(
        cls,
        data: DataSource,
        rank: int | None = None,
        batch_size: int = 1024,
        method: Literal["auto", "full", "sketch"] = "auto",
        max_full_dim: int = 4096,
        oversample: int | None = None,
        seed: int = 0,
        psd: PsdPolicy = "clip",
    ) -> GaussianStatistics:
        """Estimate from a tensor or a stream of batches (see the module docstring).

        ``method="full"`` accumulates the exact d × d scatter matrix (default up to ``max_full_dim``);
        ``"sketch"`` keeps only a d × (rank + oversample) Nyström sketch (needs ``rank``; ``oversample``
        defaults to rank + 20, which finds the leading eigenvalues of the digits data to 1e-4).
        """
        acc = StatisticsAccumulator(
            rank=rank, method=method, max_full_dim=max_full_dim, oversample=oversample, seed=seed
        )
        for x, _ in iter_batches(data, batch_size):
            acc.update(x)
        return acc.finalize(psd=psd)

    @classmethod
    def from_gmm(cls, gmm: Any) -> GaussianStatistics:
        """The exact mean and covariance of a Gaussian mixture: μ = Σ π_k μ_k, Σ = Σ π_k (Σ_k + μ_k μ_kᵀ) − μ μᵀ."""
        w = gmm.weights.double()
        mu_k = gmm.means.double()
        cov_k = torch.einsum("kde,ke,kfe->kdf", gmm.eigvecs.double(), gmm.eigvals.double(), gmm.eigvecs.double())
        mu = w @ mu_k
        second = torch.einsum("k,kdf->df", w, cov_k + mu_k[:, :, None] * mu_k[:, None, :])
        return cls.from_moments(mu, second - torch.outer(mu, mu), gmm.sample_shape, source="gaussian mixture (exact)")

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write as safetensors (``mean``, ``eigvals``, ``eigvecs``) with the rest as JSON metadata."""
        return save_artifact(
            path,
            {"mean": self.mean, "eigvals": self.eigvals, "eigvecs": self.eigvecs},
            {
                "kind": _KIND,
                "residual_variance": self.residual_variance,
                "sample_shape": list(self.sample_shape),
                "num_samples": self.num_samples,
                "source": self.source,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> GaussianStatistics:
        tensors, meta = load_artifact(path, _KIND)
        return cls(
            tensors["mean"],
            tensors["eigvals"],
            tensors["eigvecs"],
            float(meta["residual_variance"]),
            tuple(meta["sample_shape"]),
            meta.get("num_samples"),
            meta.get("source", ""),
        )


class StatisticsAccumulator:
    """Streaming float64 accumulation of the data mean and covariance (exact, or a low-rank sketch).

    Exact mode merges each batch's mean and scatter matrix into the running ones (Chan, Golub & LeVeque
    1979), which stays accurate for data with a large mean. Sketch mode accumulates, around the first
    batch's mean c, the count, Σ(x − c), Σ‖x − c‖² and the sketch Σ(x − c)(x − c)ᵀ Ω for an orthonormal
    d × k test matrix Ω; the centred covariance times Ω, and its trace, follow exactly at the end.
    """

    def __init__(
        self,
        rank: int | None = None,
        method: Literal["auto", "full", "sketch"] = "auto",
        max_full_dim: int = 4096,
        oversample: int | None = None,
        seed: int = 0,
    ):
        if method not in ("auto", "full", "sketch"):
            raise ValueError(f"unknown method {method!r}: expected 'auto', 'full' or 'sketch'")
        if rank is not None and rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if method == "sketch" and rank is None:
            raise ValueError("the sketch method needs a rank")
        self.rank, self.method, self.max_full_dim = rank, method, int(max_full_dim)
        self.oversample = (rank or 0) + 20 if oversample is None else int(oversample)
        self.seed = int(seed)
        self.n = 0
        self.sample_shape: tuple[int, ...] | None = None

    def _start(self, x: torch.Tensor) -> None:
        self.sample_shape = tuple(x.shape[1:])
        d = math.prod(self.sample_shape)
        if self.method == "auto":
            self.method = "full" if d <= self.max_full_dim or self.rank is None else "sketch"
        if self.method == "full" and d > self.max_full_dim and self.rank is None:
            warnings.warn(f"accumulating a full {d} × {d} covariance", RuntimeWarning, stacklevel=3)
        if self.method == "full":
            self.mean = torch.zeros(d, dtype=torch.float64)
            self.scatter = torch.zeros(d, d, dtype=torch.float64)
        else:
            k = min(d, self.rank + self.oversample)
            g = torch.Generator().manual_seed(self.seed)
            self.omega = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
            self.shift = x.reshape(x.shape[0], -1).double().mean(0)
            self.sum = torch.zeros(d, dtype=torch.float64)
            self.sum_sq = 0.0
            self.sketch = torch.zeros(d, k, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``(b, *sample_shape)``."""
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"a batch must have shape (b, *sample_shape) with b > 0, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the data contain NaN or Inf")
        if self.sample_shape is None:
            self._start(x)
        elif tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"batch sample shape {tuple(x.shape[1:])} differs from the first batch's {self.sample_shape}"
            )
        flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
        b = flat.shape[0]
        if self.method == "full":
            m_b = flat.mean(0)
            centred = flat - m_b
            delta = m_b - self.mean
            total = self.n + b
            self.scatter += centred.T @ centred + torch.outer(delta, delta) * (self.n * b / total)
            self.mean += delta * (b / total)
        else:
            centred = flat - self.shift
            self.sum += centred.sum(0)
            self.sum_sq += float((centred * centred).sum())
            self.sketch += centred.T @ (centred @ self.omega)
        self.n += b

    def finalize(self, psd: PsdPolicy = "clip") -> GaussianStatistics:
        if self.n < 2:
            raise ValueError(f"need at least 2 samples to estimate a covariance, got {self.n}")
        d = math.prod(self.sample_shape)
        if self.method == "full":
            stats = GaussianStatistics.from_moments(
                self.mean, self.scatter / (self.n - 1), self.sample_shape, rank=self.rank, psd=psd, num_samples=self.n
            )
            return GaussianStatistics(
                stats.mean, stats.eigvals, stats.eigvecs, stats.residual_variance, stats.sample_shape, self.n, "data"
            )
        offset = self.sum / self.n  # μ − c
        y = (self.sketch - self.n * torch.outer(offset, offset @ self.omega)) / (self.n - 1)  # Σ Ω
        trace = (self.sum_sq - self.n * float(offset @ offset)) / (self.n - 1)
        vals, vecs = _nystrom(y, self.omega)
        r = min(self.rank, vals.numel())
        vals, vecs = vals[:r], vecs[:, :r]
        rho = max(trace - float(vals.sum()), 0.0) / (d - r) if r < d else 0.0
        return GaussianStatistics(
            self.shift + offset, vals, vecs, rho, self.sample_shape, self.n, "data (Nyström sketch)"
        )


def _nystrom(y: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the Nyström approximation (ΣΩ)(ΩᵀΣΩ)⁺(ΣΩ)ᵀ, stabilised by a tiny shift (Tropp et al. 2017,
    Alg. 3)."""
    nu = math.sqrt(y.shape[0]) * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(y, ord=2))
    y_nu = y + nu * omega
    b = omega.T @ y_nu
    chol = torch.linalg.cholesky(0.5 * (b + b.T))  # lower: b = L Lᵀ
    e = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_ν L⁻ᵀ
    u, s, _ = torch.linalg.svd(e, full_matrices=False)
    return (s * s - nu).clamp_min(0.0), u


def class_statistics(
    data: DataSource,
    rank: int | None = None,
    batch_size: int = 1024,
    method: Literal["auto", "full", "sketch"] = "auto",
    psd: PsdPolicy = "clip",
) -> dict[int, GaussianStatistics]:
    """Per-class statistics of labelled data (``(samples, labels)`` or batches with labels), for a
    class-conditional model (one Gaussian per class, as Wang & Vastola 2024 do for class-conditional models)."""
    accs: dict[int, StatisticsAccumulator] = {}
    for x, cond in iter_batches(data, batch_size):
        if cond is None:
            raise ValueError("class statistics need labelled data: (samples, labels) or batches with labels")
        labels = cond["class_labels"].reshape(-1).cpu()
        for c in labels.unique().tolist():
            acc = accs.setdefault(int(c), StatisticsAccumulator(rank=rank, method=method))
            acc.update(x[(labels == c).to(x.device)])
    return {c: acc.finalize(psd=psd) for c, acc in sorted(accs.items())}


def save_class_statistics(path: str | Path, stats: dict[int, GaussianStatistics]) -> Path:
    """One safetensors file for per-class statistics (``<class>.mean`` etc.)."""
    tensors, meta = {}, {}
    for c, st in stats.items():
        tensors.update({f"{c}.mean": st.mean, f"{c}.eigvals": st.eigvals, f"{c}.eigvecs": st.eigvecs})
        meta[str(c)] = {
            "residual_variance": st.residual_variance,
            "sample_shape": list(st.sample_shape),
            "num_samples": st.num_samples,
            "source": st.source,
        }
    return save_artifact(path, tensors, {"kind": _CLASS_KIND, "classes": meta})


def load_class_statistics(path: str | Path) -> dict[int, GaussianStatistics]:
    tensors, meta = load_artifact(path, _CLASS_KIND)
    return {
        int(c): GaussianStatistics(
            tensors[f"{c}.mean"],
            tensors[f"{c}.eigvals"],
            tensors[f"{c}.eigvecs"],
            float(m["residual_variance"]),
            tuple(m["sample_shape"]),
            m.get("num_samples"),
            m.get("source", ""),
        )
        for c, m in meta["classes"].items()
    }
