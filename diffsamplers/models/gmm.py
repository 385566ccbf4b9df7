"""An exact model: a Gaussian mixture whose denoiser, and so whose probability-flow ODE, is known.

For data x0 ~ Σ_k π_k N(μ_k, Σ_k), Σ_k = U_k diag(λ_k) U_kᵀ, and x_t = α x0 + σ ε, each component gives
x_t | k ~ N(α μ_k, α² Σ_k + σ² I), so the posterior mean (the ideal denoiser, Tweedie's formula) is

    E[x0 | x_t] = Σ_k w_k(x_t) · (μ_k + U_k diag(α λ_k / (α² λ_k + σ²)) U_kᵀ (x_t − α μ_k)),

with responsibilities w_k ∝ π_k N(x_t; α μ_k, α² Σ_k + σ² I) — closed form for every noise process
(the single-Gaussian case is Wang & Vastola 2024, "The Unreasonable Effectiveness of Gaussian Score
Approximation for Diffusion Models", Eq. 5). The module offers

* :class:`GaussianMixture` — sampling and the exact denoiser in torch (any dtype, image-shaped samples);
* :meth:`GaussianMixture.as_denoiser` — the exact x̂0 = D(x, t) for the sampling loop;
* :class:`GMMModel` — the same as a diffusers-style network (``model(sample, timestep).sample``) that
  predicts ε, x0, v or flow, so diffusers' own schedulers can run on it;
* :func:`reference_solution` — the probability-flow ODE from a given x_T solved with SciPy (DOP853) to a
  relative tolerance of 1e-10 in EDM coordinates, dy/d log σ̃ = y − D(y, σ̃) (Karras et al. 2022, Eq. 3),
  also from pure noise (σ̃ = ∞: t = 1 of a rectified flow);
* :func:`default_mixture` on :func:`default_process` (DDPM's VP schedule, ``gmm``) or on
  :func:`default_flow_process` (rectified flow, ``gmm-flow``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..denoiser import Denoiser, compute_dtype
from ..noise import DiscreteVP, NoiseProcess, RectifiedFlow
from ..prediction import check_prediction_type, from_x0

__all__ = [
    "GaussianMixture",
    "GMMModel",
    "GMMDenoiser",
    "reference_solution",
    "default_mixture",
    "default_process",
    "default_flow_process",
]


@dataclass
class GaussianMixture:
    """Σ_k π_k N(μ_k, U_k diag(λ_k) U_kᵀ) over samples of shape ``sample_shape`` (flattened to d values)."""

    means: torch.Tensor  # (K, d)
    eigvals: torch.Tensor  # (K, d), ≥ 0
    eigvecs: torch.Tensor  # (K, d, d), columns orthonormal
    weights: torch.Tensor  # (K,), sums to 1
    sample_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.eigvals.shape != (k, d) or self.eigvecs.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError(
                f"inconsistent mixture shapes: means {tuple(self.means.shape)}, eigvals {tuple(self.eigvals.shape)}, "
                f"eigvecs {tuple(self.eigvecs.shape)}, weights {tuple(self.weights.shape)}"
            )
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} values")
        if torch.any(self.eigvals < 0):
            raise ValueError("covariance eigenvalues must be non-negative")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=self.weights.dtype)):
            raise ValueError(f"mixture weights must sum to 1, got {float(self.weights.sum())}")
        eye = torch.eye(d, dtype=self.eigvecs.dtype)
        #: Diagonal covariances (every eigenbasis the identity): the denoiser skips the d × d rotations.
        self.axis_aligned = bool(torch.equal(self.eigvecs, eye.expand(k, d, d)))
        #: Isotropic components (λ_k I): the denoiser works on (B, K) inner products, never on (B, K, d) tensors.
        self.isotropic_components = self.axis_aligned and bool(torch.all(self.eigvals == self.eigvals[:, :1]))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_covariances(
        cls, means: Any, covariances: Any, weights: Any = None, sample_shape: Sequence[int] | None = None
    ) -> GaussianMixture:
        means_t = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        k, d = means_t.shape
        cov = torch.as_tensor(np.asarray(covariances), dtype=torch.float64)
        if cov.shape != (k, d, d):
            raise ValueError(f"covariances must have shape {(k, d, d)}, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(1, 2)):
            raise ValueError("covariances must be symmetric")
        eigvals, eigvecs = torch.linalg.eigh(cov)
        if torch.any(eigvals < -1e-10 * eigvals.abs().max()):
            raise ValueError(
                f"covariances must be positive semi-definite; smallest eigenvalue {float(eigvals.min()):.3g}"
            )
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        )
        return cls(means_t, eigvals.clamp_min(0), eigvecs, w / w.sum(), tuple(sample_shape or (d,)))

    @classmethod
    def random(
        cls,
        sample_shape: Sequence[int] = (1, 8, 8),
        num_components: int = 8,
        seed: int = 0,
        mean_scale: float = 0.5,
        eig_range: tuple[float, float] = (1e-3, 0.1),
    ) -> GaussianMixture:
        """A reproducible random mixture: smooth means in about [−1, 1], covariances with log-uniform spectra."""
        g = torch.Generator().manual_seed(seed)
        d = math.prod(sample_shape)
        means = mean_scale * torch.tanh(torch.randn(num_components, d, generator=g, dtype=torch.float64) * 1.5)
        lo, hi = math.log(eig_range[0]), math.log(eig_range[1])
        eigvals = torch.exp(lo + (hi - lo) * torch.rand(num_components, d, generator=g, dtype=torch.float64))
        q, r = torch.linalg.qr(torch.randn(num_components, d, d, generator=g, dtype=torch.float64))
        eigvecs = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        logits = 0.3 * torch.randn(num_components, generator=g, dtype=torch.float64)
        return cls(means, eigvals, eigvecs, torch.softmax(logits, 0), tuple(sample_shape))

    @classmethod
    def isotropic(
        cls,
        dim: int,
        num_components: int,
        std: float,
        std_spread: tuple[float, float] = (0.7, 1.0),
        mean_scale: float = 0.5,
        seed: int = 0,
        sample_shape: Sequence[int] | None = None,
    ) -> GaussianMixture:
        """A generated mixture of isotropic components, equally weighted: means ``mean_scale``·N(0, I) and
        component k's standard deviation ``std``·U(``std_spread``) — the kind of mixture a new user writes down
        (e.g. d = 768, 10 components, std 0.15·U(0.7, 1), means 0.5·N(0, I))."""
        if dim < 1 or num_components < 1 or not std > 0 or not 0 < std_spread[0] <= std_spread[1]:
            raise ValueError(
                f"need dim, num_components >= 1, std > 0 and 0 < spread low <= high; got {dim}, {num_components}, "
                f"{std}, {std_spread}"
            )
        g = torch.Generator().manual_seed(seed)
        means = mean_scale * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_spread
        stds = std * (lo + (hi - lo) * torch.rand(num_components, generator=g, dtype=torch.float64))
        eigvals = (stds**2)[:, None].expand(num_components, dim).clone()
        eigvecs = torch.eye(dim, dtype=torch.float64).expand(num_components, dim, dim).clone()
        weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        return cls(means, eigvals, eigvecs, weights, tuple(sample_shape or (dim,)))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    # -- sampling and the exact denoiser --------------------------------------------------------
    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = self.eigvals[comp].sqrt() * z
        x = self.means[comp] + (scaled if self.axis_aligned else torch.einsum("nde,ne->nd", self.eigvecs[comp], scaled))
        return x.reshape(n, *self.sample_shape).to(dtype)

    def denoise(
        self,
        x: torch.Tensor,
        alpha: float | torch.Tensor,
        sigma: float | torch.Tensor,
        log_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[x0 | x_t = x] for x_t = α x0 + σ ε (α, σ scalars or one value per sample).

        ``log_weights`` ((K,) or (B, K)) replaces the log mixture weights, e.g. per sample to condition on a
        subset of components (−inf excludes a component).
        """
        if math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"sample shape {tuple(x.shape[1:])} does not match the mixture's {self.sample_shape}")
        if self.isotropic_components:
            return self._denoise_isotropic(x, alpha, sigma, log_weights)
        work = compute_dtype(x.dtype)
        b = x.shape[0]
        flat = x.reshape(b, -1).to(work)
        means, eigvals = (t.to(device=x.device, dtype=work) for t in (self.means, self.eigvals))
        eigvecs = None if self.axis_aligned else self.eigvecs.to(device=x.device, dtype=work)
        log_w = (self.weights.log() if log_weights is None else log_weights).to(device=x.device, dtype=work)
        a = alpha.to(work).reshape(b, 1, 1) if isinstance(alpha, torch.Tensor) else alpha
        s = sigma.to(work).reshape(b, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
        z = self._eigen_coordinates(flat, a, means, eigvecs)
        var = a * a * eigvals[None] + s * s  # (B or 1, K, d)
        log_lik = -0.5 * (z * z / var + torch.log(var)).sum(-1) + log_w  # (B, K)
        resp = torch.softmax(log_lik, dim=1)
        shrunk = (a * eigvals[None] / var) * z
        if not self.axis_aligned:
            shrunk = torch.einsum("bke,kde->bkd", shrunk, eigvecs)
        x0 = torch.einsum("bk,bkd->bd", resp, means[None] + shrunk)
        return x0.reshape(x.shape)

    def _denoise_isotropic(
        self,
        x: torch.Tensor,
        alpha: float | torch.Tensor,
        sigma: float | torch.Tensor,
        log_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`denoise` for components N(μ_k, λ_k I), from inner products (float64 whatever x's dtype).

        With v_k = α²λ_k + σ², ‖x − αμ_k‖² = ‖x‖² − 2α x·μ_k + α²‖μ_k‖² gives the log-likelihoods, and
        E[x0 | x] = Σ_k r_k (μ_k + c_k (x − αμ_k)) = (Σ_k r_k c_k) x + Σ_k r_k (1 − α c_k) μ_k, c_k = αλ_k / v_k:
        O(B·K·d) in two matrix products instead of elementwise work on (B, K, d). float64 keeps the first
        expansion's cancellation (x ≈ αμ_k at small σ) below 1e-12 relative.
        """
        b, d = x.shape[0], self.dim
        flat = x.reshape(b, -1).to(torch.float64)
        means = self.means.to(device=x.device)
        lam = self.eigvals[:, 0].to(device=x.device)
        log_w = (self.weights.log() if log_weights is None else log_weights).to(device=x.device, dtype=torch.float64)
        a = alpha.to(torch.float64).reshape(b, 1) if isinstance(alpha, torch.Tensor) else float(alpha)
        s = sigma.to(torch.float64).reshape(b, 1) if isinstance(sigma, torch.Tensor) else float(sigma)
        var = a * a * lam[None] + s * s  # (B or 1, K)
        dist = self._squared_distances(flat, a, means)
        resp = torch.softmax(-0.5 * (dist / var + d * torch.log(var)) + log_w, dim=1)  # (B, K)
        gain = a * lam[None] / var  # c_k
        x0 = (resp * gain).sum(1, keepdim=True) * flat + (resp * (1 - a * gain)) @ means
        return x0.to(compute_dtype(x.dtype)).reshape(x.shape)

    def component(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """The most probable component of each clean sample x: argmax_k log π_k + log N(x; μ_k, Σ_k) (float64).

        Two samples in different components are on different sides of a boundary of the mixture: a few-step solver
        that ends in another component than the exact ODE from the same x_T has sent that noise astray.
        """
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"sample shape {tuple(x.shape[1:])} does not match the mixture's {self.sample_shape}")
        lam = self.eigvals.to(flat.device).clamp_min(1e-300)
        log_w = self.weights.log().to(flat.device) - 0.5 * lam.log().sum(1)
        means = self.means.to(flat.device)
        eigvecs = None if self.axis_aligned else self.eigvecs.to(flat.device)
        out = []
        for rows in flat.split(chunk):
            if self.isotropic_components:
                mahalanobis = self._squared_distances(rows, 1.0, means) / lam[:, 0][None]
            else:
                z = self._eigen_coordinates(rows, 1.0, means, eigvecs)
                mahalanobis = (z * z / lam[None]).sum(-1)
            out.append((log_w[None] - 0.5 * mahalanobis).argmax(1))
        return torch.cat(out)

    def _eigen_coordinates(
        self, flat: torch.Tensor, a: float | torch.Tensor, means: torch.Tensor, eigvecs: torch.Tensor | None
    ) -> torch.Tensor:
        """x − αμ_k in component k's eigenbasis, (B, K, d) (``eigvecs`` None for axis-aligned covariances)."""
        centred = flat[:, None, :] - a * means[None]
        return centred if eigvecs is None else torch.einsum("bkd,kde->bke", centred, eigvecs)

    @staticmethod
    def _squared_distances(flat: torch.Tensor, a: float | torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """‖x − αμ_k‖², (B, K), from inner products: ‖x‖² − 2α x·μ_k + α²‖μ_k‖² (clamped at 0; use float64)."""
        dist = (flat * flat).sum(1, keepdim=True) - 2 * a * (flat @ means.T) + a * a * (means * means).sum(1)[None]
        return dist.clamp_min(0)

    def as_denoiser(self, process: NoiseProcess, prediction_type: str = "sample") -> GMMDenoiser:
        """The exact x̂0 = D(x, t) on ``process`` for :func:`diffsamplers.sample`; its network (for diffusers'
        schedulers) predicts ``prediction_type``."""
        return GMMDenoiser(self, process, prediction_type)

    def as_model(self, process: NoiseProcess, prediction_type: str = "epsilon") -> GMMModel:
        """The exact network on ``process`` in diffusers' calling convention."""
        return GMMModel(self, process, prediction_type)


class GMMModel(torch.nn.Module):
    """A diffusers-style network for a :class:`GaussianMixture`: ``model(sample, timestep).sample``.

    The timestep (in the process's timestep units, scalar or per sample) is mapped to (α, σ) on the host,
    so this reference model reads the timestep back from the device once per call.
    """

    def __init__(self, gmm: GaussianMixture, process: NoiseProcess, prediction_type: str = "epsilon"):
        super().__init__()
        self.gmm = gmm
        self.process = process
        self.prediction_type = check_prediction_type(prediction_type)

    def forward(self, sample: torch.Tensor, timestep: float | torch.Tensor, return_dict: bool = True) -> Any:
        return self._predict(sample, timestep, return_dict)

    def _predict(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, return_dict: bool, **denoise_kwargs
    ) -> Any:
        ts = np.asarray(
            timestep.detach().cpu().double() if isinstance(timestep, torch.Tensor) else timestep, dtype=np.float64
        )
        alpha, sigma = self.process.alpha_sigma(self.process.sigma_tilde(self.process.t_from_timestep(ts)))
        work = compute_dtype(sample.dtype)
        if alpha.ndim == 0 or alpha.size == 1:
            a, s = float(alpha.reshape(-1)[0]), float(sigma.reshape(-1)[0])
        else:
            view = (-1,) + (1,) * (sample.ndim - 1)
            a = torch.as_tensor(alpha, dtype=work, device=sample.device).view(view)
            s = torch.as_tensor(sigma, dtype=work, device=sample.device).view(view)
        x = sample.to(work)
        x0 = self.gmm.denoise(
            x,
            a.flatten() if isinstance(a, torch.Tensor) else a,
            s.flatten() if isinstance(s, torch.Tensor) else s,
            **denoise_kwargs,
        )
        out = from_x0(x0, x, a, s, self.prediction_type).to(sample.dtype)
        if not return_dict:
            return (out,)
        return _Output(out)


@dataclass
class _Output:
    sample: torch.Tensor


class GMMDenoiser(Denoiser):
    """The exact denoiser: ignores the timestep and uses the loop's (α, σ) directly (no host reads).

    Its ``model`` — what diffusers' schedulers run — is the exact network predicting ``prediction_type``.
    """

    def __init__(self, gmm: GaussianMixture, process: NoiseProcess, prediction_type: str = "sample"):
        super().__init__(GMMModel(gmm, process, prediction_type), process, prediction_type=prediction_type)
        self.gmm = gmm

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):  # noqa: D102
        return self.gmm.denoise(x, alpha, sigma)


class ExactDenoiser(Protocol):
    """Anything with an exact ``denoise(x, α, σ)``: a :class:`GaussianMixture`, or a guided class-conditional one."""

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor: ...


def reference_solution(
    gmm: ExactDenoiser,
    process: NoiseProcess,
    x_T: torch.Tensor,
    sigma_start: float,
    sigma_end: float = 0.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """The exact probability-flow ODE solution from x_T at σ̃ = ``sigma_start`` to ``sigma_end`` (float64).

    Solves dy/dτ = y − D(y, σ̃ = e^τ) in y = x/α, τ = log σ̃ with SciPy's DOP853; this form is not stiff
    (the Jacobian of the right-hand side has eigenvalues in [0, 1]). ``sigma_end = 0`` integrates to
    σ̃ = 1e-9, where the remaining change of y is O(σ̃²/λ_min) — far below the tolerance for the
    covariances used here. Returns x in the process's own scaling, with x_T's shape.

    ``sigma_start = inf`` starts from pure noise, x_T = σ ε at α = 0 — where a rectified-flow sampler starts,
    t = 1 on x_t = (1 − t) x0 + t ε (Liu et al. 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow
    Matching for Generative Modeling", the optimal-transport path with σ_min = 0, time reversed) — which τ
    cannot reach. Down to σ̃ = 1 the ODE is then solved in z = x/σ against ρ = α/σ = 1/σ̃, from ρ = 0: with
    y = z/ρ the equation above becomes dz/dρ = D(z; α = ρ, σ = 1), since the denoiser is scale-invariant,
    D(s·x; s·α, s·σ) = D(x; α, σ) (:meth:`GaussianMixture.denoise` depends on x, α and σ only through
    (x − αμ)/σ and α/σ). Its Jacobian is ρ·Cov[x0 | x] (Tweedie), ρΣ(ρ²Σ + I)⁻¹ ≤ √λ_max/2 for one Gaussian:
    this leg is not stiff either.
    """
    if not sigma_start > sigma_end >= 0:
        raise ValueError(f"sigma_start ({sigma_start}) must exceed sigma_end ({sigma_end}), which must be ≥ 0")
    shape = x_T.shape
    x = x_T.detach().cpu().double().reshape(shape[0], -1).numpy()
    if math.isinf(sigma_start):
        with np.errstate(invalid="ignore"):
            sigma_noise = float(process.alpha_sigma(sigma_start)[1])
        if not 0 < sigma_noise < math.inf:
            raise ValueError(
                f"sigma_start = inf needs a process with a finite σ at pure noise (a RectifiedFlow); {process!r} "
                f"has σ = {sigma_noise} there"
            )
        sigma_switch = max(sigma_end, 1.0)
        z = _solve_ivp(
            lambda rho, z: gmm.denoise(z, float(rho), 1.0), 0.0, 1.0 / sigma_switch, x / sigma_noise, rtol, atol
        )
        y = z * sigma_switch  # y = x/α = z·σ̃
    else:
        sigma_switch = sigma_start
        y = x / float(process.alpha_sigma(sigma_start)[0])
    if sigma_end < sigma_switch:
        tau_span = (math.log(sigma_switch), math.log(max(sigma_end, 1e-9)))
        y = _solve_ivp(lambda tau, y: y - gmm.denoise(y, 1.0, math.exp(tau)), *tau_span, y, rtol, atol)
    return torch.from_numpy(y * float(process.alpha_sigma(sigma_end)[0])).reshape(shape)


def _solve_ivp(
    rhs: Callable[[float, torch.Tensor], torch.Tensor],
    start: float,
    end: float,
    y0: np.ndarray,
    rtol: float,
    atol: float,
) -> np.ndarray:
    """y(end) for dy/ds = rhs(s, y) from y(start) = y0 (rows of samples, float64), by SciPy's DOP853."""
    from scipy.integrate import solve_ivp

    rows = y0.shape[0]

    def flat_rhs(s: float, y: np.ndarray) -> np.ndarray:
        return rhs(s, torch.from_numpy(y).reshape(rows, -1)).reshape(-1).numpy()

    sol = solve_ivp(flat_rhs, (start, end), y0.reshape(-1), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return sol.y[:, -1].reshape(rows, -1)


def default_process() -> DiscreteVP:
    """The training schedule of the bundled mixture: DDPM's linear β from 1e-4 to 0.02 over 1000 steps."""
    return DiscreteVP.from_beta_schedule("linear", 1e-4, 0.02, 1000)


def default_flow_process() -> RectifiedFlow:
    """The rectified-flow path of the bundled flow mixture (``gmm-flow``): x_t = (1 − t) x0 + t ε, timestep
    1000·t, on the range diffusers' flow configs give (:func:`diffsamplers.noise.noise_process_from_config`)."""
    return RectifiedFlow(t_min=1e-6, t_max=1.0 - 1e-6, timestep_scale=1000.0)


def default_mixture() -> GaussianMixture:
    """The bundled exact model: 8 components over 1×8×8 "images" (d = 64), seed 0."""
    return GaussianMixture.random(sample_shape=(1, 8, 8), num_components=8, seed=0)
