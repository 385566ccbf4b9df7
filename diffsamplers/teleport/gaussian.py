"""Gaussian (analytical) teleportation: skip the first sampling steps with the closed-form Gaussian flow.

Wang & Vastola 2024, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications" (TMLR; arXiv:2412.09726; code Animadversio/GaussianTeleportationDiffusion). At high
noise a trained model's score is close to that of the Gaussian N(μ, Σ) with the data's moments, whose
probability-flow ODE has a closed-form solution; the first 15–30 % of the steps can be replaced by it.

Closed form for any noise process x_t = α_t x0 + σ_t ε (the paper's Eq. for α = 1, generalised
here): along the exact PF-ODE of N(μ, U diag(λ) Uᵀ + ρ(I − UUᵀ)) the whitened coordinates
u_kᵀ(x_t − α_t μ)/√(α_t² λ_k + σ_t²) are constant, so from level s to level t

    x_t = α_t μ + U diag(√((α_t²λ + σ_t²)/(α_s²λ + σ_s²))) Uᵀ (x_s − α_s μ)
               + √((α_t²ρ + σ_t²)/(α_s²ρ + σ_s²)) (I − UUᵀ)(x_s − α_s μ)          (:func:`gaussian_flow`)

and the posterior mean is E[x0 | x_t] = μ + U diag(α_t λ/(α_t² λ + σ_t²)) Uᵀ (x_t − α_t μ) + (same with ρ)
(:class:`GaussianDenoiser`). All of it runs in float64.

Teleport level (:func:`teleport_level`, :func:`choose_skip`, :func:`teleport_schedule`). The paper motivates the
teleport by the Gaussian term explaining the learned score at high noise (the fraction of the score's variance
it does not explain) and picks the number of skipped steps by sweeping it against FID. Thresholding that fraction
(the paper's 99 %) teleports too far: the score (D − y)/σ̃² is dominated by the noise the state still carries, so
the fraction is tiny long after the Gaussian's error in the state has grown large. On
``GaussianMixture.isotropic(768, 10, 0.15, seed=0)`` under SD 1.5's process (64 probes teleported from σ̃_max =
14.6) it is 2.6e-5 at σ̃ = 14.6, 1.5e-3 at 6 and 1.4e-2 at 3, so 99 % lets the teleport go to σ̃ ≈ 3.4, where the
teleported state is off by about 0.2 per coordinate (0.18 at σ̃ = 3.8, 0.22 at 3.0). The x̂0 spread ratio this
module used before, Σ‖D_θ − D_G‖²/Σ‖D_θ − mean D_θ‖², errs the other way: x̂0 barely varies across probes at high
noise, so it is 0.24 at σ̃_max there and never fires. What matters is the error of the state the solver starts
from, relative to the noise still in it.

Derivation. In EDM units y = x/α and τ = log σ̃ the PF-ODE reads dy/dτ = y − D(y, σ̃) (Karras et al. 2022,
Eq. 4). The teleport solves it with the Gaussian's D_G, the model's trajectory with D_θ; from the same x_T at
σ̃_T their difference δy = y_θ − y_G obeys dδy/dτ = δy − (D_θ(y_G + δy) − D_G(y_G)) ≈ δy − Δ(τ), Δ = D_θ − D_G
along the Gaussian path, dropping ∂D_θ/∂y · δy (the posterior covariance over σ̃², small where the teleport
lands). With δy(σ̃_T) = 0,

    δy(σ̃) ≈ σ̃ ∫_{log σ̃}^{log σ̃_T} (D_θ − D_G)(x_G(τ), e^τ) e^{−τ} dτ,      e(σ̃) = RMS δy(σ̃) / σ̃

(RMS over probes and coordinates; σ̃ is the standard deviation of the noise left in y). :func:`teleport_level`
evaluates the integral top down by the trapezoid rule on a grid even in log σ̃ (``points_per_unit`` = 12 per unit),
with one batched model call per level on ``num_probes`` = 64 probe noises teleported there by :func:`gaussian_flow`,
and stops at the first level with e > ``tolerance`` (default 0.01: 1 % of the remaining noise); the teleport level
is the lowest grid level with e ≤ ``tolerance`` there and above. Only the difference of denoisers enters, divided
by σ̃, so there is no ratio of small spreads and no float-resolution guard: float32 rounding of x̂0 adds about
eps·|x̂0|/σ̃ to e.

Measured match (this estimate against the teleported state's actual error, :func:`gaussian_flow` against the
exact PF-ODE of the mixture, ``reference_solution``, in y, same 64 probes): on the d = 768 mixture above,

    σ̃                     11.7     9.4      7.5      6.0      4.8      3.8
    e(σ̃)                  1.5e-3   4.1e-3   8.4e-3   1.5e-2   2.6e-2   4.1e-2
    RMS δy, estimated     0.0177   0.0383   0.0631   0.0912   0.122    0.157
    RMS δy, measured      0.0181   0.0402   0.0685   0.102    0.141    0.183

(estimate 0.85–0.98 of the measured error everywhere from 11.7 down to σ̃ = 1; the same with 6 or 24 points per
unit to 1 %). Tolerance 0.01 stops at σ̃ = 7.5 (6.9–7.5 over probe seeds 0–3). It is where the teleport is
still harmless: followed by the exact ODE to σ̃ = 0 the teleport to 7.5 ends within 0.0024 per coordinate of
every one of 32 exact samples, while the teleport to 6.0 (e = 0.015) sends one of them to another component
(error 0.71).

Rectified flows start at α ≈ 0 (diffusers' t = 1 − 10⁻⁶, α = 10⁻⁶, σ̃ = 10⁶). y = x/α is ill-conditioned
there, and the integrand Δ/σ̃ ≤ (data scale)·α is negligible: the grid starts where α = :data:`ALPHA_MIN` = 10⁻³
(σ̃ = 999) and the levels above are covered by holding that level's Δ constant up to σ̃_T (a term Δ(1/σ̃ −
1/σ̃_T)). On the bundled mixture under ``default_flow_process()`` the estimate is 6.1e-7 against 4.4e-7 measured
at σ̃ = 999, 1.91e-3 against 1.91e-3 at 9.8, 1.13e-2 against 1.14e-2 at 3.9 and 3.64e-2 against 3.92e-2 at 2.0.

:func:`choose_skip` applies the criterion to a given schedule (its levels merged into the fine grid; the skip is
the last schedule level at or above the teleport level, at most ``max_fraction`` of the evaluations);
:func:`teleport_schedule` / :meth:`GaussianTeleport.schedule_for` build the schedule for a budget of model
evaluations: [σ̃_T, σ̃_tp, …] with all of them from the teleport level σ̃_tp down. With DPM-Solver++ 2M on
uniform-λ grids and 4–12 evaluations (32 noises) that schedule ends as close to the exact samples as the plain
grid with 0.5–1.4 more evaluations on the d = 768 mixture above (level 7.5 of 14.6) and 1.6–8 more on the bundled
d = 64 mixture (level 2.7 of 157); see docs/teleportation.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..noise import NoiseProcess
from ..rng import NoiseSource
from ..sampling import initial_noise, model_device, sample
from ..schedules import spacing as spacings
from ..schedules.schedule import Schedule
from ..solvers.base import Solver
from .statistics import GaussianStatistics

__all__ = [
    "ALPHA_MIN",
    "TELEPORT_SPACINGS",
    "GaussianDenoiser",
    "GaussianTeleport",
    "SkipChoice",
    "TeleportLevel",
    "choose_skip",
    "gaussian_flow",
    "gaussian_posterior_mean",
    "teleport_level",
    "teleport_schedule",
]


def _scalar(v: Any) -> float:
    return float(np.asarray(v, dtype=np.float64))


Stats = GaussianStatistics | Mapping[int, GaussianStatistics]


def _per_class(
    stats: Stats, x: torch.Tensor, labels: torch.Tensor | None, fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``fn(stats, x, index)`` for one Gaussian, or per class (``labels``) for class-conditional statistics
    (``index``: the rows of x given, ``None`` for all)."""
    if isinstance(stats, GaussianStatistics):
        return fn(stats, x, None)
    if labels is None:
        raise ValueError("class-conditional statistics need the class labels of the samples")
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {x.shape[0]} samples")
    out = None
    for c in labels.unique().tolist():
        if int(c) not in stats:
            raise ValueError(f"no statistics for class {int(c)} (have {sorted(stats)})")
        idx = torch.nonzero(labels == c).reshape(-1).to(x.device)
        part = fn(stats[int(c)], x.index_select(0, idx), idx)
        out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device) if out is None else out
        out.index_copy_(0, idx.to(part.device), part)
    return out


def gaussian_flow(
    stats: Stats,
    process: NoiseProcess,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact probability-flow ODE map of N(μ, Σ) data from noise level σ̃ = ``sigma_from`` to ``sigma_to``.

    ``x`` is in the process's own scaling at ``sigma_from``; the result, at ``sigma_to``, has x's dtype and
    device (the arithmetic is float64). With per-class statistics (a mapping) each sample uses its class's
    Gaussian (``labels``).
    """
    return _per_class(stats, x, labels, lambda st, xs, _: _flow(st, process, xs, sigma_from, sigma_to))


def _flow(
    stats: GaussianStatistics, process: NoiseProcess, x: torch.Tensor, sigma_from: float, sigma_to: float
) -> torch.Tensor:
    if not (np.isfinite(sigma_from) and np.isfinite(sigma_to)) or sigma_from < 0 or sigma_to < 0:
        raise ValueError(f"noise levels must be finite and non-negative, got {sigma_from} and {sigma_to}")
    if x.shape[1:].numel() != stats.dim:
        raise ValueError(f"sample shape {tuple(x.shape[1:])} does not match the statistics' {stats.sample_shape}")
    a0, s0 = (_scalar(v) for v in process.alpha_sigma(sigma_from))
    a1, s1 = (_scalar(v) for v in process.alpha_sigma(sigma_to))
    dev = x.device if x.device.type != "mps" else torch.device("cpu")
    mu, lam, u = (t.to(dev) for t in (stats.mean, stats.eigvals, stats.eigvecs))
    flat = x.detach().reshape(x.shape[0], -1).to(dev, torch.float64)
    centred = flat - a0 * mu
    coords = centred @ u
    scale = torch.sqrt((a1 * a1 * lam + s1 * s1) / (a0 * a0 * lam + s0 * s0))
    out = a1 * mu + (coords * scale) @ u.T
    if stats.rank < stats.dim:
        rho = stats.residual_variance
        res_scale = np.sqrt((a1 * a1 * rho + s1 * s1) / (a0 * a0 * rho + s0 * s0))
        out = out + res_scale * (centred - coords @ u.T)
    return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def gaussian_posterior_mean(
    stats: Stats,
    x: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[x0 | x_t = x] for N(μ, Σ) data, x_t = α x0 + σ ε (α, σ scalars, or per sample for one Gaussian)."""

    def rows(v: float | torch.Tensor, idx: torch.Tensor | None) -> float | torch.Tensor:
        per_sample = isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] and idx is not None
        return v.index_select(0, idx.to(v.device)) if per_sample else v

    return _per_class(stats, x, labels, lambda st, xs, idx: _posterior_mean(st, xs, rows(alpha, idx), rows(sigma, idx)))


def _posterior_mean(
    stats: GaussianStatistics, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor
) -> torch.Tensor:
    b = x.shape[0]
    flat = x.reshape(b, -1).to(torch.float64)
    mu, lam, u = (t.to(x.device) for t in (stats.mean, stats.eigvals, stats.eigvecs))
    a = alpha.reshape(b, 1).double() if isinstance(alpha, torch.Tensor) else float(alpha)
    s = sigma.reshape(b, 1).double() if isinstance(sigma, torch.Tensor) else float(sigma)
    centred = flat - a * mu
    coords = centred @ u
    out = mu + (coords * (a * lam / (a * a * lam + s * s))) @ u.T
    if stats.rank < stats.dim:
        rho = stats.residual_variance
        out = out + (a * rho / (a * a * rho + s * s)) * (centred - coords @ u.T)
    return out.reshape(x.shape)


class GaussianDenoiser(Denoiser):
    """The Gaussian score approximation as a denoiser: x̂0 = E[x0 | x_t] under N(μ, Σ) (no network)."""

    def __init__(self, stats: Stats, process: NoiseProcess, cond_key: str = "class_labels"):
        super().__init__(lambda x, t: x, process, prediction_type="sample")
        self.stats, self.cond_key = stats, cond_key

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):  # noqa: D102
        work = torch.promote_types(x.dtype, torch.float32)
        labels = None if cond is None else cond.get(self.cond_key)
        return gaussian_posterior_mean(self.stats, x, alpha, sigma, labels).to(work)


#: The criterion's integral starts no higher than where α = ALPHA_MIN (σ̃ ≈ 1/α for VP and flow processes): above it
#: the integrand (D_θ − D_G)/σ̃ is at most (data scale)·α, and a rectified-flow model's start at α = 10⁻⁶ would
#: otherwise cost 83 more model calls (σ̃ from 10⁶ to 10³ at 12 per unit of log σ̃) for nothing. The levels above
#: are covered by holding the first level's D_θ − D_G constant up to the start (:func:`teleport_level`).
ALPHA_MIN = 1e-3

#: Spacings :func:`teleport_schedule` can lay from the teleport level down (each takes the top level).
TELEPORT_SPACINGS = ("uniform_logsnr", "exponential", "karras", "beta", "uniform_time")


@dataclass(frozen=True)
class TeleportLevel:
    """The outcome of :func:`teleport_level`: how far down the Gaussian flow stands in for the model.

    Attributes:
        sigma: the teleport level: the lowest tested σ̃ with e ≤ ``tolerance`` there and at every level above
            (``sigma_start`` when even the first level fails: no teleport).
        sigmas: the levels tested, top down (the last one is the first failure, unless the floor was reached).
        errors: e(σ̃) = RMS δy(σ̃)/σ̃ at those levels (module docstring).
        tolerance: the bound on e.
        sigma_start: the level of the initial noise x_T the teleport starts from.
        sigma_floor: the lowest level that was to be tested.
    """

    sigma: float
    sigmas: tuple[float, ...]
    errors: tuple[float, ...]
    tolerance: float
    sigma_start: float
    sigma_floor: float

    @property
    def state_errors(self) -> tuple[float, ...]:
        """RMS δy(σ̃) = e·σ̃: the estimated RMS error (per coordinate, in y = x/α) of the teleported state."""
        return tuple(e * s for e, s in zip(self.errors, self.sigmas))

    @property
    def reached_floor(self) -> bool:
        """Whether every level down to ``sigma_floor`` passed."""
        return bool(self.sigmas) and self.sigmas[-1] <= self.sigma_floor and max(self.errors) <= self.tolerance

    def at(self, tolerance: float) -> TeleportLevel:
        """The level for a stricter ``tolerance`` (at most this one's), read off the same curve: the lowest tested σ̃
        with e ≤ ``tolerance`` there and at every level above (``sigma_start`` when the first level fails)."""
        tolerance = _check_tolerance(tolerance)
        if tolerance > self.tolerance:
            raise ValueError(
                f"the curve was computed for tolerance {self.tolerance} and stops at its first failure: a looser "
                f"tolerance {tolerance} needs teleport_level(..., tolerance={tolerance})"
            )
        ok = next((k for k, e in enumerate(self.errors) if e > tolerance), len(self.errors))
        sigma = self.sigmas[ok - 1] if ok else self.sigma_start
        return replace(self, sigma=float(sigma), tolerance=tolerance)


@dataclass(frozen=True)
class SkipChoice:
    """The outcome of :func:`choose_skip`: skipped evaluations, the landing level, e at the schedule's levels
    σ̃_0 … (up to the first failure or the limit) and the fine-grid curve behind them."""

    skip: int
    sigma: float
    errors: tuple[float, ...]
    tolerance: float
    level: TeleportLevel | None = field(default=None, repr=False)


def _check_tolerance(tolerance: float) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating, np.integer)):
        raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    if not 0 < float(tolerance) < 1:
        raise ValueError(
            f"tolerance must lie in (0, 1) (the teleported state's error as a fraction of the noise left in it), "
            f"got {tolerance}"
        )
    return float(tolerance)


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _sigma_at_alpha(process: NoiseProcess, alpha: float) -> float:
    """σ̃ where the process's α equals ``alpha`` (∞ for VE, whose α is 1)."""
    if process.scaling == "vp":
        return math.sqrt(1.0 / (alpha * alpha) - 1.0)
    if process.scaling == "flow":
        return 1.0 / alpha - 1.0
    return math.inf


def _model_cond(
    stats: Stats, num_probes: int, cond: Mapping[str, Any] | None, cond_key: str, device: torch.device
) -> tuple[Mapping[str, Any] | None, torch.Tensor | None]:
    """(the model's condition, the probes' labels): with per-class statistics and no ``cond`` the probes cycle
    through the classes."""
    if not isinstance(stats, GaussianStatistics) and cond is None:
        classes = torch.tensor(sorted(stats))
        cond = {cond_key: classes[torch.arange(num_probes) % classes.numel()]}
    labels = None if cond is None else cond.get(cond_key)
    model_cond = (
        None if cond is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    )
    return model_cond, labels


def _criterion(
    denoiser: Denoiser,
    stats: Stats,
    sigma_start: float,
    grid: np.ndarray,
    tolerance: float,
    num_probes: int,
    seed: int,
    cond: Mapping[str, Any] | None,
    cond_key: str,
) -> tuple[list[float], list[float]]:
    """e(σ̃) on ``grid`` (descending, at most ``sigma_start``) top down, up to and including the first level with
    e > ``tolerance``: (levels tested, e there). One batched model call per level."""
    process = denoiser.process
    device = model_device(denoiser)
    model_cond, labels = _model_cond(stats, num_probes, cond, cond_key, device)
    shape = (stats if isinstance(stats, GaussianStatistics) else next(iter(stats.values()))).sample_shape
    x_T = initial_noise(process, sigma_start, (num_probes, *shape), seed, dtype=torch.float64)
    timesteps = process.timestep_from_sigma_tilde(grid)
    acc: torch.Tensor | None = None  # ∫_τ^{τ_start} (D_θ − D_G) e^{−τ'} dτ' per probe = δy(σ̃)/σ̃
    prev: torch.Tensor | None = None  # (D_θ − D_G)/σ̃ at the previous level
    tested: list[float] = []
    errors: list[float] = []
    for j, s in enumerate(grid.tolist()):
        # the model's input in float32, and the Gaussian's posterior mean of that same (rounded) input
        x = gaussian_flow(stats, process, x_T, sigma_start, s, labels).float()
        alpha, sigma = (_scalar(v) for v in process.alpha_sigma(s))
        with torch.no_grad():
            model = denoiser.predict_x0(x.to(device), float(timesteps[j]), alpha, sigma, cond=model_cond)
        gauss = gaussian_posterior_mean(stats, x.double(), alpha, sigma, labels)
        weighted = (model.detach().double().cpu().flatten(1) - gauss.cpu().flatten(1)) / s
        if acc is None:  # above the first level: D_θ − D_G held at its value there (nothing if it is the start)
            acc = weighted * (1.0 - s / sigma_start)
        else:
            acc = acc + 0.5 * (prev + weighted) * (math.log(grid[j - 1]) - math.log(s))
        prev = weighted
        e = float(acc.pow(2).mean().sqrt())
        if not math.isfinite(e):
            raise ValueError(f"the model's x̂0 is not finite at σ̃ = {s:.4g} (e = {e})")
        tested.append(s)
        errors.append(e)
        if e > tolerance:
            break
    return tested, errors


def _log_grid(top: float, floor: float, points_per_unit: int) -> np.ndarray:
    """Levels from ``top`` down to ``floor`` evenly in log σ̃, ``points_per_unit`` per unit (both ends included)."""
    n = max(1, math.ceil((math.log(top) - math.log(floor)) * points_per_unit - 1e-9))
    grid = np.exp(np.linspace(math.log(top), math.log(floor), n + 1))
    grid[0], grid[-1] = top, floor
    return grid


def teleport_level(
    denoiser: Denoiser,
    stats: Stats,
    tolerance: float = 0.01,
    num_probes: int = 64,
    seed: int = 0,
    points_per_unit: int = 12,
    sigma_start: float | None = None,
    sigma_floor: float | None = None,
    cond: Mapping[str, Any] | None = None,
    cond_key: str = "class_labels",
    levels: Sequence[float] | np.ndarray | None = None,
) -> TeleportLevel:
    """How far down the Gaussian flow can carry the initial noise before its state is off by more than
    ``tolerance`` of the noise left in it (criterion and derivation in the module docstring; Wang & Vastola 2024,
    arXiv:2412.09726, teleport with the Gaussian score approximation).

    Probe noises x_T (``num_probes``, drawn by :func:`~diffsamplers.sampling.initial_noise` with ``seed`` at
    ``sigma_start``, default the process's σ̃_max) are teleported by :func:`gaussian_flow` to each level of a grid
    even in log σ̃ (``points_per_unit`` per unit) from ``sigma_start`` (from where α = :data:`ALPHA_MIN`, if that
    is lower) down to ``sigma_floor`` (default σ̃_min); at each level the model is called once on the batch, the
    estimate e(σ̃) = RMS δy(σ̃)/σ̃ is updated, and the search stops at the first level with e > ``tolerance``.
    ``levels`` are tested too (merged into the grid). ``cond`` (model inputs for ``num_probes`` samples) is passed
    to the model; with per-class statistics and no ``cond`` the probes cycle through the classes (``cond_key``
    names the label input).
    """
    tolerance = _check_tolerance(tolerance)
    num_probes = _check_count(num_probes, "num_probes")
    points_per_unit = _check_count(points_per_unit, "points_per_unit")
    process = denoiser.process
    start = process.sigma_max if sigma_start is None else float(sigma_start)
    floor = process.sigma_min if sigma_floor is None else float(sigma_floor)
    if not (math.isfinite(start) and 0 < floor < start):
        raise ValueError(f"need 0 < sigma_floor < sigma_start < inf, got sigma_floor={floor}, sigma_start={start}")
    top = min(start, max(_sigma_at_alpha(process, ALPHA_MIN), floor * math.exp(1.0 / points_per_unit)))
    grid = _log_grid(top, floor, points_per_unit)
    if levels is not None:
        extra = np.asarray(levels, dtype=np.float64).reshape(-1)
        extra = extra[(extra >= floor) & (extra <= start)]
        grid = np.unique(np.concatenate([grid, extra]))[::-1]
    tested, errors = _criterion(denoiser, stats, start, grid, tolerance, num_probes, seed, cond, cond_key)
    return TeleportLevel(start, tuple(tested), tuple(errors), tolerance, start, floor).at(tolerance)


def choose_skip(
    denoiser: Denoiser,
    stats: Stats,
    schedule: Schedule,
    tolerance: float = 0.01,
    num_probes: int = 64,
    seed: int = 0,
    max_fraction: float = 0.5,
    cond: Mapping[str, Any] | None = None,
    cond_key: str = "class_labels",
    points_per_unit: int = 12,
) -> SkipChoice:
    """The number of leading evaluations of ``schedule`` the Gaussian flow can replace: the largest k such that
    e ≤ ``tolerance`` at σ̃_k and at every level above it (:func:`teleport_level` from σ̃_0, on its fine grid with
    the schedule's levels merged in). At most ``max_fraction`` of the evaluations are skipped."""
    tolerance = _check_tolerance(tolerance)
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"max_fraction must lie in [0, 1], got {max_fraction}")
    sigmas = schedule.sigmas
    limit = min(int(max_fraction * schedule.num_steps), schedule.num_steps - 1)
    if limit == 0:
        return SkipChoice(0, float(sigmas[0]), (0.0,), tolerance)
    level = teleport_level(
        denoiser,
        stats,
        tolerance,
        num_probes,
        seed,
        points_per_unit,
        sigma_start=float(sigmas[0]),
        sigma_floor=float(sigmas[limit]),
        cond=cond,
        cond_key=cond_key,
        levels=sigmas[1 : limit + 1],
    )
    curve = dict(zip(level.sigmas, level.errors))
    errors = [0.0] + [curve[float(s)] for s in sigmas[1 : limit + 1] if float(s) in curve]
    skip = int(np.flatnonzero(sigmas[: limit + 1] >= level.sigma).max())
    return SkipChoice(skip, float(sigmas[skip]), tuple(errors), tolerance, level)


def _spaced(
    process: NoiseProcess, nfe: int, spacing: str, final: str | None, top: float, bottom: float, **kwargs: Any
) -> Schedule:
    if spacing not in TELEPORT_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r} for a teleport schedule: expected one of {TELEPORT_SPACINGS}")
    fin = {} if final is None else {"final": final}
    if spacing == "uniform_time":
        t0, t1 = (float(v) for v in process.t_from_sigma_tilde([top, bottom]))
        return spacings.uniform_time(process, nfe, t_start=t0, t_end=t1, **fin, **kwargs)
    return getattr(spacings, spacing)(process, nfe, sigma_max=top, sigma_min=bottom, **fin, **kwargs)


def teleport_schedule(
    process: NoiseProcess,
    level: float | TeleportLevel,
    nfe: int,
    spacing: str = "uniform_logsnr",
    final: str | None = None,
    sigma_start: float | None = None,
    sigma_min: float | None = None,
    **spacing_kwargs: Any,
) -> Schedule:
    """A schedule that teleports to ``level`` and then spends exactly ``nfe`` model evaluations.

    The levels are [σ̃_start, σ̃_tp, …, final]: the initial noise is drawn at σ̃_start (default: the level's
    ``sigma_start``, else the process's σ̃_max), the Gaussian flow carries it to σ̃_tp = ``level`` (a σ̃ or a
    :class:`TeleportLevel`), and ``nfe`` evaluations follow on a ``spacing`` grid (one of
    :data:`TELEPORT_SPACINGS`, with its ``final`` convention and ``spacing_kwargs``) from σ̃_tp down to
    ``sigma_min`` (default σ̃_min). ``metadata["teleport_skip"]`` is 1: ``GaussianTeleport(stats).sample`` (or
    with ``skip=1``) skips the first entry and calls the model ``nfe`` times. If σ̃_tp is not below σ̃_start
    there is nothing to teleport: the plain ``nfe``-step grid from σ̃_start, ``teleport_skip`` 0.
    (Wang & Vastola 2024, arXiv:2412.09726: the skipped steps are replaced by the Gaussian flow.)
    """
    nfe = _check_count(nfe, "nfe")
    if isinstance(level, TeleportLevel):
        tp = level.sigma
        start = level.sigma_start if sigma_start is None else float(sigma_start)
    else:
        tp = float(level)
        start = process.sigma_max if sigma_start is None else float(sigma_start)
    bottom = process.sigma_min if sigma_min is None else float(sigma_min)
    if not (math.isfinite(start) and start > 0 and math.isfinite(tp) and tp > 0):
        raise ValueError(f"the start and teleport levels must be positive and finite, got {start} and {tp}")
    if tp >= start:
        sched = _spaced(process, nfe, spacing, final, start, bottom, **spacing_kwargs)
        meta = {**sched.metadata, "teleport_skip": 0, "teleport_sigma": start, "nfe": nfe}
        return Schedule(sched.sigmas, metadata=meta)
    if not tp > bottom:
        raise ValueError(
            f"the teleport level σ̃ = {tp:.4g} is not above the schedule's lowest level {bottom:.4g}: no room for "
            "model evaluations after it (the Gaussian flow holds all the way down; teleport with gaussian_flow "
            "or give teleport_level a higher sigma_floor)"
        )
    sched = _spaced(process, nfe, spacing, final, tp, bottom, **spacing_kwargs)
    meta = {**sched.metadata, "teleport_skip": 1, "teleport_sigma": tp, "sigma_start": start, "nfe": nfe}
    return Schedule(np.concatenate([[start], sched.sigmas]), metadata=meta)


class GaussianTeleport:
    """Teleport from the initial noise to a grid level with the Gaussian flow, then hand over to any solver
    (Wang & Vastola 2024, arXiv:2412.09726).

    Args:
        stats: the data's Gaussian statistics, in the model's input space (for latent models: of the scaled
            latents; for [−1, 1] pixel models: of the [−1, 1] images); or per-class statistics
            (:func:`~diffsamplers.teleport.statistics.class_statistics`) for a class-conditional model, each sample
            then teleported with its class's Gaussian (labels from ``cond[cond_key]``).
        skip: number of leading evaluations to skip; or ``sigma_skip``: teleport to the first grid level at or
            below it; or neither: a schedule from :meth:`schedule_for` / :func:`teleport_schedule` skips what its
            ``metadata["teleport_skip"]`` says, any other :func:`choose_skip` with ``tolerance`` decides.
        tolerance, num_probes, points_per_unit, seed: the criterion's settings (:func:`teleport_level`).
    """

    def __init__(
        self,
        stats: Stats,
        skip: int | None = None,
        sigma_skip: float | None = None,
        tolerance: float = 0.01,
        num_probes: int = 64,
        cond_key: str = "class_labels",
        points_per_unit: int = 12,
        seed: int = 0,
    ):
        if skip is not None and sigma_skip is not None:
            raise ValueError("give skip or sigma_skip, not both")
        if skip is not None and (isinstance(skip, bool) or int(skip) != skip or skip < 0):
            raise ValueError(f"skip must be a non-negative integer, got {skip!r}")
        if sigma_skip is not None and not (np.isfinite(sigma_skip) and sigma_skip > 0):
            raise ValueError(f"sigma_skip must be positive and finite, got {sigma_skip}")
        self.stats = stats
        self.skip, self.sigma_skip = skip, sigma_skip
        self.tolerance = _check_tolerance(tolerance)
        self.num_probes = _check_count(num_probes, "num_probes")
        self.points_per_unit = _check_count(points_per_unit, "points_per_unit")
        self.seed = int(seed)
        self.cond_key = cond_key
        self.last_choice: SkipChoice | None = None
        self._levels: dict[tuple, tuple[Denoiser, TeleportLevel]] = {}
        self._choices: dict[tuple, tuple[Denoiser, SkipChoice]] = {}

    def level_for(
        self,
        denoiser: Denoiser,
        sigma_start: float | None = None,
        sigma_floor: float | None = None,
        cond: Mapping[str, Any] | None = None,
    ) -> TeleportLevel:
        """:func:`teleport_level` for this denoiser with this teleport's settings, computed once per denoiser,
        tolerance and start/floor levels (the ``cond`` of the first call is the one used)."""
        key = (id(denoiser), self.tolerance, self.num_probes, self.points_per_unit, self.seed, sigma_start, sigma_floor)
        hit = self._levels.get(key)
        if hit is None or hit[0] is not denoiser:
            level = teleport_level(
                denoiser,
                self.stats,
                self.tolerance,
                self.num_probes,
                self.seed,
                self.points_per_unit,
                sigma_start=sigma_start,
                sigma_floor=sigma_floor,
                cond=cond,
                cond_key=self.cond_key,
            )
            hit = self._levels[key] = (denoiser, level)
        return hit[1]

    def schedule_for(
        self,
        denoiser: Denoiser,
        nfe: int,
        spacing: str = "uniform_logsnr",
        final: str | None = None,
        sigma_start: float | None = None,
        sigma_min: float | None = None,
        cond: Mapping[str, Any] | None = None,
        **spacing_kwargs: Any,
    ) -> Schedule:
        """The schedule for a budget of ``nfe`` model evaluations: teleport to :meth:`level_for`'s level, then
        ``nfe`` evaluations on a ``spacing`` grid from there (:func:`teleport_schedule`). Pass it to
        :meth:`sample`."""
        nfe = _check_count(nfe, "nfe")
        level = self.level_for(denoiser, sigma_start=sigma_start, cond=cond)
        return teleport_schedule(denoiser.process, level, nfe, spacing, final, sigma_min=sigma_min, **spacing_kwargs)

    def resolve_skip(self, denoiser: Denoiser, schedule: Schedule, cond: Any = None) -> int:
        """How many leading evaluations of ``schedule`` are replaced by the teleport."""
        if self.skip is not None:
            k = int(self.skip)
        elif self.sigma_skip is not None:
            below = np.flatnonzero(schedule.sigmas[:-1] <= self.sigma_skip)
            k = int(below[0]) if below.size else schedule.num_steps
        elif "teleport_sigma" in schedule.metadata and "teleport_skip" in schedule.metadata:
            k = int(schedule.metadata["teleport_skip"])  # built by teleport_schedule / schedule_for
        else:
            key = (id(denoiser), schedule.sigmas.tobytes(), self.tolerance, self.num_probes, self.points_per_unit)
            hit = self._choices.get(key)
            if hit is None or hit[0] is not denoiser:
                choice = choose_skip(
                    denoiser,
                    self.stats,
                    schedule,
                    self.tolerance,
                    self.num_probes,
                    self.seed,
                    cond=cond,
                    cond_key=self.cond_key,
                    points_per_unit=self.points_per_unit,
                )
                hit = self._choices[key] = (denoiser, choice)
            self.last_choice = hit[1]
            k = self.last_choice.skip
        if k >= schedule.num_steps:
            raise ValueError(f"cannot skip {k} of the schedule's {schedule.num_steps} evaluations")
        return k

    @staticmethod
    def remaining(schedule: Schedule, skip: int) -> Schedule:
        """The schedule after the first ``skip`` evaluations."""
        ts = None if schedule.timesteps is None else schedule.timesteps[skip:]
        meta = {k: v for k, v in schedule.metadata.items() if k != "teleport_sigma"}
        return Schedule(schedule.sigmas[skip:], timesteps=ts, metadata={**meta, "teleport_skip": skip})

    def sample(
        self,
        denoiser: Denoiser,
        solver: Solver,
        schedule: Schedule,
        shape: Sequence[int] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        skip_cond: Any = None,
        callback: Callable | None = None,
        **sample_kwargs: Any,
    ) -> torch.Tensor:
        """Like :func:`diffsamplers.sample`, with the first evaluations replaced by the Gaussian flow.

        The solver then runs on the rest of the grid from the teleported state (a multistep solver restarts
        its history there). ``skip_cond`` is the condition passed to the model while choosing the skip.
        """
        process = denoiser.process
        k = self.resolve_skip(denoiser, schedule, cond=skip_cond)
        noise = sample_kwargs.pop("noise", None) or NoiseSource(generator=generator, seeds=seeds)
        if x_T is None:
            if shape is None:
                raise ValueError("give the batch shape (N, ...) or x_T")
            run_device = torch.device(device) if device is not None else model_device(denoiser)
            x_T = initial_noise(process, float(schedule.sigmas[0]), shape, noise, device=run_device, dtype=dtype)
        cond = sample_kwargs.get("cond")
        labels = None if cond is None else cond.get(self.cond_key)
        x_k = gaussian_flow(self.stats, process, x_T, float(schedule.sigmas[0]), float(schedule.sigmas[k]), labels)
        return sample(
            denoiser,
            solver,
            self.remaining(schedule, k),
            x_T=x_k.to(dtype),
            noise=noise,
            device=device,
            dtype=dtype,
            callback=callback,
            **sample_kwargs,
        )
