"""Monte-Carlo estimate of the Align Your Steps objective: the KL-divergence upper bound (KLUB) per interval.

Sabour, Fidler & Kreis 2024, "Align Your Steps" (arXiv:2404.14507), Sec. 3, Eq. 9–11 and Alg. 2. Stochastic
DDIM solves the reverse SDE exactly with the denoiser frozen at the start of each interval; by Girsanov's
theorem the KL divergence between its path measure and the true one is bounded by a sum over intervals,

    KLUB(σ_a, σ_b) = 2 ∫_{σ_a}^{σ_b} σ⁻³ E ‖D(y_σ; σ) − D(y_b; σ_b)‖² dσ,
    y_σ = x0 + σ z,   y_b = y_σ + √(σ_b² − σ²) z′,   x0 ~ data,

in EDM coordinates y = x/α, σ = σ̃ (the KL divergence does not change under the deterministic rescaling
x = α y, so the same formula serves VP, VE and flow processes; the network receives x = α(σ) y at its own
time). ‖·‖² sums over all elements of a sample.

The integral is estimated by importance sampling in σ with density π(σ) ∝ σ⁻³ w(σ),
w(σ) = (1/(σ² + c²) − 1/(σ_b² + c²))^p (c = 0.5; for N(0, c²I) data E‖ΔD‖² ∝ w with p = 1, App. A.3):

    KLUB ≈ 2 Z · mean_i ‖ΔD_i‖² / w(σ_i),   Z = ∫_{σ_a}^{σ_b} σ⁻³ w(σ) dσ.

Two corrections to the paper's text: the sampling density and the divisor use the same
power p (the text squares the weight, Alg. 2 does not; both are unbiased when consistent), and the
normaliser Z — which depends on the interval, hence on the candidate being compared — is included (Alg. 2
returns the mean "up to a constant"). Z and the inverse CDF of π are computed by quadrature on a log grid.

Common random numbers: a fixed bank of (x0, z, z′, u) is drawn once from the seed, and interval i's σ
samples are the inverse-CDF images of the same uniforms u. Each interval's estimate is then a deterministic
function of its endpoints, so a coordinate search that keeps the current value among its candidates never
increases the estimated total.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser

__all__ = ["KLUBEstimator", "gaussian_klub"]


def _weight(sigma: np.ndarray, top: float, c: float, power: int) -> np.ndarray:
    return (1.0 / (sigma * sigma + c * c) - 1.0 / (top * top + c * c)) ** power


def gaussian_klub(lo: float, hi: float, data_std: float, dim: int) -> float:
    """The exact KLUB of one interval for N(0, s² I) data, where E‖ΔD‖² = s⁴ d (1/(σ²+s²) − 1/(σ_b²+s²))
    (App. A.3): 2 ∫ σ⁻³ E‖ΔD‖² dσ in closed form, with the antiderivative
    d (−s²(1 − s²B)/(2σ²) − log σ + ½ log(σ² + s²)), B = 1/(σ_b² + s²)."""
    s2 = data_std**2
    b = 1.0 / (hi * hi + s2)

    def antiderivative(x: float) -> float:
        return -s2 * (1.0 - s2 * b) / (2.0 * x * x) - math.log(x) + 0.5 * math.log(x * x + s2)

    return 2.0 * dim * (antiderivative(hi) - antiderivative(lo))


class KLUBEstimator:
    """KLUB(σ_a, σ_b) for many intervals at once, with a denoiser and a fixed bank of data and noise.

    Args:
        denoiser: the model, x̂0 = D(x, t).
        x0: clean data samples ``(N, *sample_shape)`` (the paper uses 8,192).
        cond: per-sample model inputs (e.g. ``{"class_labels": labels}``) aligned with ``x0``.
        seed: seeds the noise bank (z, z′, u).
        importance_c: c of the importance weight (0.5 in the paper).
        power: p of the importance weight, 1 or 2 (see the module docstring).
        batch_size: model evaluations per call.
        quadrature_points: grid size for Z and the inverse CDF.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        importance_c: float = 0.5,
        power: int = 1,
        batch_size: int = 4096,
        quadrature_points: int = 4097,
        device: str | torch.device | None = None,
        cache_size: int = 4096,
    ):
        if x0.ndim < 2 or x0.shape[0] < 2:
            raise ValueError(f"x0 must be a batch (N, *sample_shape) with N >= 2, got {tuple(x0.shape)}")
        if not torch.isfinite(x0).all():
            raise ValueError("the data samples contain NaN or Inf")
        if power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power}")
        if not importance_c > 0:
            raise ValueError(f"importance_c must be positive, got {importance_c}")
        self.denoiser = denoiser
        self.device = torch.device(device) if device is not None else x0.device
        self.x0 = x0.to(self.device, torch.float32)
        self.cond = cond
        n = x0.shape[0]
        g = torch.Generator().manual_seed(int(seed))
        self.z = torch.randn(self.x0.shape, generator=g).to(self.device)
        self.z_up = torch.randn(self.x0.shape, generator=g).to(self.device)
        # Stratified uniforms (one per sample, randomly permuted): a lower-variance common random number.
        perm = torch.randperm(n, generator=g).double()
        self.u = ((perm + torch.rand(n, generator=g, dtype=torch.float64)) / n).numpy()
        self.c, self.power = float(importance_c), int(power)
        self.batch_size, self.quadrature_points = int(batch_size), int(quadrature_points)
        self._cache: OrderedDict[tuple[float, float], float] = OrderedDict()
        self._cache_size = int(cache_size)
        self.evaluations = 0

    @property
    def num_samples(self) -> int:
        return int(self.x0.shape[0])

    # -- importance sampling ----------------------------------------------------------------------
    def _importance(self, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, float]:
        """(σ samples, w(σ) at them, Z) for the interval [lo, hi], from the bank's uniforms."""
        grid = np.linspace(math.log(lo), math.log(hi), self.quadrature_points)
        s = np.exp(grid)
        dens = s**-2 * _weight(s, hi, self.c, self.power)  # σ⁻³ w(σ) · dσ/dlogσ
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
        z = float(cdf[-1])
        if not z > 0:
            raise ValueError(f"degenerate interval [{lo}, {hi}]")
        sig = np.exp(np.interp(self.u * z, cdf, grid))
        sig = np.minimum(sig, hi * (1 - 1e-12))
        return sig, _weight(sig, hi, self.c, self.power), z

    # -- estimation -------------------------------------------------------------------------------
    def __call__(self, lo: float, hi: float) -> float:
        return float(self.estimate([(lo, hi)])[0])

    def estimate(self, intervals: Sequence[tuple[float, float]]) -> np.ndarray:
        """KLUB of each interval (σ_a, σ_b), σ_a < σ_b, batched over all of them."""
        out = np.empty(len(intervals))
        todo: list[int] = []
        for i, (lo, hi) in enumerate(intervals):
            lo, hi = float(lo), float(hi)
            if not (0 < lo < hi and math.isfinite(hi)):
                raise ValueError(f"an interval needs 0 < sigma_lo < sigma_hi < inf, got ({lo}, {hi})")
            hit = self._cache.get((lo, hi))
            if hit is not None:
                out[i] = hit
                self._cache.move_to_end((lo, hi))
            else:
                todo.append(i)
        if todo:
            values = self._estimate([(float(intervals[i][0]), float(intervals[i][1])) for i in todo])
            for i, v in zip(todo, values):
                out[i] = v
                self._cache[(float(intervals[i][0]), float(intervals[i][1]))] = float(v)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _estimate(self, intervals: list[tuple[float, float]]) -> np.ndarray:
        n, m = self.num_samples, len(intervals)
        sig = np.empty((m, n))
        inv_w = np.empty((m, n))
        norm = np.empty(m)
        for j, (lo, hi) in enumerate(intervals):
            sig[j], w, norm[j] = self._importance(lo, hi)
            inv_w[j] = 1.0 / w
        tops = np.array([hi for _, hi in intervals])
        process = self.denoiser.process
        sums = torch.zeros(m, dtype=torch.float64)
        total = m * n
        chunk = max(1, self.batch_size // 2)
        view = (-1,) + (1,) * (self.x0.ndim - 1)
        for start in range(0, total, chunk):
            idx = np.arange(start, min(start + chunk, total))
            iv, sid = idx // n, idx % n
            s = sig[iv, sid]
            top = tops[iv]
            sid_t = torch.as_tensor(sid, device=self.device)
            s_t = torch.as_tensor(s, dtype=torch.float32, device=self.device).view(view)
            up_t = torch.as_tensor(np.sqrt(top * top - s * s), dtype=torch.float32, device=self.device).view(view)
            y = self.x0[sid_t] + s_t * self.z[sid_t]
            y_up = y + up_t * self.z_up[sid_t]
            levels = np.concatenate([s, top])
            alpha = torch.as_tensor(process.alpha_sigma(levels)[0], dtype=torch.float32, device=self.device)
            x = torch.cat([y, y_up]) * alpha.view(view)
            t = process.t_from_sigma_tilde(levels)
            cond = None
            if self.cond is not None:
                cond = {k: torch.cat([v[sid_t], v[sid_t]]) for k, v in self.cond.items()}
            with torch.no_grad():
                d = self.denoiser(x, t, cond=cond)
            k = len(idx)
            sq = (d[:k] - d[k:]).double().flatten(1).pow(2).sum(1).cpu()
            sums.index_add_(0, torch.as_tensor(iv), sq * torch.as_tensor(inv_w[iv, sid]))
            self.evaluations += 2 * k
        return 2.0 * norm * sums.numpy() / n

    def total(self, levels: Sequence[float]) -> float:
        """Σ_i KLUB(σ_{i+1}, σ_i) over decreasing positive levels."""
        lv = np.asarray(levels, dtype=np.float64)
        return float(self.estimate(list(zip(lv[1:], lv[:-1]))).sum())

    def describe(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "importance_c": self.c, "power": self.power}
