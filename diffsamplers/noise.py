"""Noise processes: the forward marginals x_t = α(t)·x0 + σ(t)·ε, on the host in float64.

Every process exposes the same handful of maps, all vectorised over NumPy arrays:

* ``alpha(t)``, ``sigma(t)`` and the half log-SNR ``lambda_(t) = log(α/σ)``;
* the inverse ``t_from_lambda(λ)`` (interpolated for discrete schedules);
* the EDM-style noise level ``σ̃ = σ/α = exp(-λ)`` (``sigma_tilde``), the coordinate in which schedules are
  written (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 4),
  and ``alpha_sigma(σ̃)``, which gives back (α, σ) in the process's own scaling;
* ``timestep(t)``: the number the network was trained to receive.

Solvers only ever see (α, σ, λ) at the noise levels of a schedule, so one solver serves VP, VE and
rectified-flow models alike (Lu et al. 2022, "DPM-Solver++", Sec. 3, writes the solvers in exactly these
quantities).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = [
    "NoiseProcess",
    "DiscreteVP",
    "ContinuousVP",
    "VarianceExploding",
    "RectifiedFlow",
    "noise_process_from_config",
    "betas_from_schedule",
    "beta_schedule_tables",
    "ZERO_TERMINAL_ALPHA_BAR",
]

ArrayLike = float | np.ndarray


def _as_f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class NoiseProcess(ABC):
    """A forward noising process ``x_t = α(t) x0 + σ(t) ε`` with time ``t ∈ [t_min, t_max]``.

    Subclasses give ``lambda_`` and its inverse plus the scaling family; everything else follows.
    """

    #: "vp" (α² + σ² = 1), "ve" (α = 1) or "flow" (α + σ = 1): how (α, σ) follow from σ̃ = σ/α.
    scaling: Literal["vp", "ve", "flow"]
    t_min: float
    t_max: float

    # -- the two maps each subclass defines ---------------------------------------------------------
    @abstractmethod
    def lambda_(self, t: ArrayLike) -> np.ndarray:
        """Half log-SNR λ(t) = log(α(t)/σ(t)), strictly decreasing in t."""

    @abstractmethod
    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        """Inverse of :meth:`lambda_`."""

    @abstractmethod
    def timestep(self, t: ArrayLike) -> np.ndarray:
        """The time value the network receives at process time ``t``."""

    @abstractmethod
    def t_from_timestep(self, timestep: ArrayLike) -> np.ndarray:
        """Inverse of :meth:`timestep`."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable description; :func:`noise_process_from_config` rebuilds the process."""

    # -- derived maps ----------------------------------------------------------------------------
    def alpha_sigma(self, sigma_tilde: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(α, σ) at the noise level σ̃ = σ/α in this process's scaling (σ̃ = 0 gives α = 1, σ = 0)."""
        s = _as_f64(sigma_tilde)
        if self.scaling == "vp":
            alpha = 1.0 / np.sqrt(1.0 + s * s)
            return alpha, s * alpha
        if self.scaling == "ve":
            return np.ones_like(s), s.copy()
        alpha = 1.0 / (1.0 + s)
        return alpha, s * alpha

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return self.alpha_sigma(self.sigma_tilde(t))[0]

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return self.alpha_sigma(self.sigma_tilde(t))[1]

    def sigma_tilde(self, t: ArrayLike) -> np.ndarray:
        """σ̃(t) = σ(t)/α(t) = exp(-λ(t))."""
        return np.exp(-self.lambda_(t))

    def t_from_sigma_tilde(self, sigma_tilde: ArrayLike) -> np.ndarray:
        s = _as_f64(sigma_tilde)
        with np.errstate(divide="ignore"):
            return self.t_from_lambda(-np.log(s))

    def timestep_from_sigma_tilde(self, sigma_tilde: ArrayLike) -> np.ndarray:
        return self.timestep(self.t_from_sigma_tilde(sigma_tilde))

    @property
    def sigma_min(self) -> float:
        """Smallest σ̃ the model was trained on (at ``t_min``)."""
        return float(self.sigma_tilde(self.t_min))

    @property
    def sigma_max(self) -> float:
        """Largest σ̃ the model was trained on (at ``t_max``)."""
        return float(self.sigma_tilde(self.t_max))

    def init_noise_sigma(self, sigma_tilde: float) -> float:
        """Standard deviation of the initial noise x_T at the first noise level of a schedule.

        VP and flow models start from N(0, I) (diffusers' ``init_noise_sigma = 1``); VE models from
        N(0, σ_T² I) (Song et al. 2021; Karras et al. 2022, Alg. 1).
        """
        return float(sigma_tilde) if self.scaling == "ve" else 1.0

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "type" and k != "alphas_cumprod")
        return f"{type(self).__name__}({items})"


# ------------------------------------------------------------------------------------------------
# Discrete VP (DDPM) schedules, as diffusers builds them
# ------------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 ("Improved DDPM", Eq. 17) cosine schedule discretised to betas."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1), in float32."""
    import torch

    alphas_bar_sqrt = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float32), 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).numpy()


def betas_from_schedule(
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """Training betas exactly as diffusers' schedulers build them (float32 values).

    The network was trained against this float32 table, so it is reproduced bit for bit and only then
    promoted to float64.
    """
    import torch

    if num_train_timesteps is None or int(num_train_timesteps) < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    n = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(n), dtype=torch.float32)
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}: expected 'linear', 'scaled_linear', "
            "'squaredcos_cap_v2' or trained_betas"
        )
    betas_np = betas.numpy()
    if rescale_betas_zero_snr:
        betas_np = _rescale_zero_terminal_snr(betas_np)
    # A zero-terminal-SNR schedule ends with β = 1 (ᾱ = 0); beta_schedule_tables then sets ᾱ to 2⁻²⁴.
    upper = betas_np <= 1 if rescale_betas_zero_snr else betas_np < 1
    if not np.all(np.isfinite(betas_np)) or np.any(betas_np <= 0) or not np.all(upper):
        bad = betas_np[~((betas_np > 0) & upper)]
        raise ValueError(f"betas must lie in (0, 1); got values such as {bad[:3].tolist()}")
    return betas_np


#: ᾱ at the last training step of a zero-terminal-SNR schedule: diffusers' "close to 0 without being 0" (2⁻²⁴, the
#: smallest positive float16 subnormal), so that σ̃_max stays finite.
ZERO_TERMINAL_ALPHA_BAR = 2.0**-24


def beta_schedule_tables(
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> tuple[Any, Any, Any]:
    """(β, α = 1 − β, ᾱ = ∏ α) as float32 torch tensors, bit for bit as diffusers' schedulers build them.

    These are the ``betas``, ``alphas`` and ``alphas_cumprod`` attributes that diffusers code reads (e.g.
    ``diffusers.training_utils.compute_snr``). With ``rescale_betas_zero_snr`` the last ᾱ is set to
    :data:`ZERO_TERMINAL_ALPHA_BAR` after the product, as diffusers does (Lin et al. 2024, Sec. 3.1).
    """
    import torch

    betas = torch.from_numpy(
        betas_from_schedule(
            beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr
        ).copy()
    )
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = ZERO_TERMINAL_ALPHA_BAR
    return betas, alphas, alphas_cumprod


class DiscreteVP(NoiseProcess):
    """A DDPM-style discrete VP schedule given by its ᾱ table: α_n² = ᾱ_n, σ_n² = 1 − ᾱ_n, n = 0 … N−1.

    Between integer steps λ is interpolated linearly in t, which is the same as interpolating log σ̃
    linearly (diffusers' ``_sigma_to_t``, k-diffusion's ``DiscreteSchedule``), so ``lambda_`` and
    ``t_from_lambda`` are exact inverses of each other. ``t`` is the (fractional) training index and
    is also what the network receives.

    λ must fall with t, with one exception: a zero-terminal-SNR table ends at ᾱ = 2⁻²⁴
    (:data:`ZERO_TERMINAL_ALPHA_BAR`), which can lie above the ᾱ before it (DDPM's linear β rescaled has
    ᾱ_998 ≈ 4e-9); λ may then rise on the last step, and ``t_from_lambda`` inverts the falling part.
    """

    scaling = "vp"

    def __init__(self, alphas_cumprod: Any):
        ac = _as_f64(alphas_cumprod)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of at least 2 values, got shape {ac.shape}")
        if not np.all(np.isfinite(ac)) or np.any(ac <= 0) or np.any(ac > 1):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = ac
        with np.errstate(divide="ignore"):
            lam = 0.5 * (np.log(ac) - np.log1p(-ac))
        falls = np.diff(lam) < 0
        if not np.all(falls[:-1]) or not (falls[-1] or ac[-1] == ZERO_TERMINAL_ALPHA_BAR):
            raise ValueError("alphas_cumprod must be strictly decreasing (λ must fall with t)")
        self._falling = ac.size if falls[-1] else ac.size - 1  # λ falls on [0, _falling)
        if not np.isfinite(lam[0]):
            raise ValueError("alphas_cumprod[0] = 1 gives an infinite log-SNR at t = 0; use a positive beta_start")
        self._lambdas = lam
        self._steps = np.arange(ac.size, dtype=np.float64)
        self.t_min = 0.0
        self.t_max = float(ac.size - 1)
        self.config: dict[str, Any] = {"type": "discrete_vp", "alphas_cumprod": ac.tolist()}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.size)

    @property
    def sigma_max(self) -> float:
        """Largest σ̃ of the table: at ``t_max``, or before it where a zero-terminal-SNR table rises at the end."""
        return float(np.exp(-self._lambdas.min()))

    @property
    def lambdas(self) -> np.ndarray:
        """λ at the training timesteps 0 … N − 1 (decreasing; a copy)."""
        return self._lambdas.copy()

    @classmethod
    def from_betas(cls, betas: Any) -> DiscreteVP:
        import torch

        b = torch.as_tensor(np.asarray(betas, dtype=np.float64), dtype=torch.float32)
        return cls(torch.cumprod(1.0 - b, dim=0).numpy())

    @classmethod
    def from_beta_schedule(
        cls,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        trained_betas: Any = None,
        rescale_betas_zero_snr: bool = False,
    ) -> DiscreteVP:
        """The training schedule of a diffusers scheduler config (``beta_schedule``, ``trained_betas``, …)."""
        _, _, ac = beta_schedule_tables(
            beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr
        )
        process = cls(ac.numpy())
        process.config = {
            "type": "discrete_vp",
            "beta_schedule": beta_schedule,
            "beta_start": float(beta_start),
            "beta_end": float(beta_end),
            "num_train_timesteps": int(num_train_timesteps),
            "trained_betas": None if trained_betas is None else [float(b) for b in np.asarray(trained_betas)],
            "rescale_betas_zero_snr": bool(rescale_betas_zero_snr),
        }
        return process

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        return np.interp(_as_f64(t), self._steps, self._lambdas)

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        # λ decreases with t: interpolate on the reversed (increasing) table.
        m = self._falling
        return np.interp(_as_f64(lam), self._lambdas[:m][::-1], self._steps[:m][::-1])

    def timestep(self, t: ArrayLike) -> np.ndarray:
        return _as_f64(t).copy()

    def t_from_timestep(self, timestep: ArrayLike) -> np.ndarray:
        return _as_f64(timestep).copy()

    def to_config(self) -> dict[str, Any]:
        return dict(self.config)


# ------------------------------------------------------------------------------------------------
# Continuous VP (score SDE), VE / EDM and rectified flow
# ------------------------------------------------------------------------------------------------


class ContinuousVP(NoiseProcess):
    """Continuous-time VP SDE (Song et al. 2021, Eq. 11/33) with a linear β(t) or the cosine schedule.

    linear: log α(t) = −(β₁−β₀) t²/4 − β₀ t/2 (t ∈ [t_min, 1]);
    cosine: α(t) = cos(π/2 · (t+s)/(1+s)) / cos(π/2 · s/(1+s)), s = 0.008 (Nichol & Dhariwal 2021).
    The network receives ``timestep_scale · t``.
    """

    scaling = "vp"

    def __init__(
        self,
        schedule: Literal["linear", "cosine"] = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        t_max: float | None = None,
        timestep_scale: float = 1.0,
        cosine_s: float = 0.008,
    ):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown continuous VP schedule {schedule!r}: expected 'linear' or 'cosine'")
        if beta_max <= beta_min:
            raise ValueError(f"beta_max must exceed beta_min, got {beta_min} and {beta_max}")
        self.schedule = schedule
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.cosine_s = float(cosine_s)
        self.timestep_scale = float(timestep_scale)
        if t_max is None:
            # The cosine schedule reaches α = 0 at t = 1; stop where λ ≈ −5.1 as the official DPM-Solver code does.
            t_max = 1.0 if schedule == "linear" else 0.9946
        if not 0 < t_min < t_max <= 1:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        if schedule == "cosine":
            self._log_alpha_0 = math.log(math.cos(self.cosine_s / (1 + self.cosine_s) * math.pi / 2))

    def _log_alpha(self, t: np.ndarray) -> np.ndarray:
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return np.log(np.cos((t + s) / (1 + s) * math.pi / 2)) - self._log_alpha_0

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        log_alpha = self._log_alpha(_as_f64(t))
        log_sigma = 0.5 * np.log(-np.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        lam = _as_f64(lam)
        # −2 log α = log(1 + e^{−2λ})
        tmp = np.logaddexp(0.0, -2.0 * lam)
        if self.schedule == "linear":
            b0, b1 = self.beta_min, self.beta_max
            return 2.0 * tmp / (np.sqrt(b0**2 + 2.0 * (b1 - b0) * tmp) + b0)
        s = self.cosine_s
        log_alpha = -0.5 * tmp + self._log_alpha_0
        return np.arccos(np.exp(log_alpha)) * 2.0 * (1.0 + s) / math.pi - s

    def timestep(self, t: ArrayLike) -> np.ndarray:
        return self.timestep_scale * _as_f64(t)

    def t_from_timestep(self, timestep: ArrayLike) -> np.ndarray:
        return _as_f64(timestep) / self.timestep_scale

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "continuous_vp",
            "schedule": self.schedule,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "timestep_scale": self.timestep_scale,
            "cosine_s": self.cosine_s,
        }


class VarianceExploding(NoiseProcess):
    """VE / EDM process: α = 1, σ(t) = t (Karras et al. 2022, Table 1), t ∈ [σ_min, σ_max].

    ``timestep="sigma"`` feeds σ to the network (score-SDE VE models); ``"edm"`` feeds c_noise = ¼ ln σ
    (Karras et al. 2022, Table 1, preconditioning).
    """

    scaling = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, timestep: Literal["sigma", "edm"] = "sigma"):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if timestep not in ("sigma", "edm"):
            raise ValueError(f"unknown VE timestep convention {timestep!r}: expected 'sigma' or 'edm'")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.timestep_convention = timestep

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return -np.log(_as_f64(t))

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        return np.exp(-_as_f64(lam))

    def sigma_tilde(self, t: ArrayLike) -> np.ndarray:
        return _as_f64(t).copy()

    def t_from_sigma_tilde(self, sigma_tilde: ArrayLike) -> np.ndarray:
        return _as_f64(sigma_tilde).copy()

    def timestep(self, t: ArrayLike) -> np.ndarray:
        t = _as_f64(t)
        return t.copy() if self.timestep_convention == "sigma" else 0.25 * np.log(t)

    def t_from_timestep(self, timestep: ArrayLike) -> np.ndarray:
        ts = _as_f64(timestep)
        return ts.copy() if self.timestep_convention == "sigma" else np.exp(4.0 * ts)

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "ve",
            "sigma_min": self.t_min,
            "sigma_max": self.t_max,
            "timestep": self.timestep_convention,
        }


class RectifiedFlow(NoiseProcess):
    """Rectified flow / flow matching: α = 1 − t, σ = t (Liu et al. 2023; Lipman et al. 2023).

    λ(t) = log((1 − t)/t). The network receives ``timestep_scale · t`` (diffusers: 1000·σ). ``t_max`` must
    stay below 1, where λ = −∞; diffusers' DPM-Solver flow grid starts at 1 − 1/1000. The maps themselves
    hold at t = 1 (pure noise, σ̃ = ∞), where diffusers' ``FlowMatchEulerDiscreteScheduler`` makes its first
    model call: ``alpha_sigma(inf)`` is (0, 1).
    """

    scaling = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3, timestep_scale: float = 1000.0):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1 for rectified flow, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.timestep_scale = float(timestep_scale)

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        t = _as_f64(t)
        with np.errstate(divide="ignore"):
            return np.log1p(-t) - np.log(t)

    def alpha_sigma(self, sigma_tilde: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(α, σ) = (1/(1 + σ̃), σ̃/(1 + σ̃)), with the limit (0, 1) at σ̃ = ∞ (t = 1, x_t = ε)."""
        s = _as_f64(sigma_tilde)
        alpha = 1.0 / (1.0 + s)
        with np.errstate(invalid="ignore"):
            sigma = np.where(np.isposinf(s), 1.0, s * alpha)[()]
        return alpha, sigma

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(_as_f64(lam)))

    def timestep(self, t: ArrayLike) -> np.ndarray:
        return self.timestep_scale * _as_f64(t)

    def t_from_timestep(self, timestep: ArrayLike) -> np.ndarray:
        return _as_f64(timestep) / self.timestep_scale

    def to_config(self) -> dict[str, Any]:
        return {"type": "flow", "t_min": self.t_min, "t_max": self.t_max, "timestep_scale": self.timestep_scale}


def noise_process_from_config(config: Mapping[str, Any]) -> NoiseProcess:
    """Build a process from :meth:`NoiseProcess.to_config` output or from a diffusers scheduler config.

    A diffusers config (it has ``num_train_timesteps``) gives the discrete VP training schedule, or a
    rectified flow when it says ``use_flow_sigmas`` (DPM-Solver/UniPC on flow models) or is a FlowMatch
    scheduler config.
    """
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind == "discrete_vp":
        if "alphas_cumprod" in cfg:
            return DiscreteVP(cfg["alphas_cumprod"])
        return DiscreteVP.from_beta_schedule(**cfg)
    if kind == "continuous_vp":
        return ContinuousVP(**cfg)
    if kind == "ve":
        return VarianceExploding(**cfg)
    if kind == "flow":
        return RectifiedFlow(**cfg)
    if kind is not None:
        raise ValueError(f"unknown noise process type {kind!r}")
    if "num_train_timesteps" not in cfg:
        raise ValueError("not a noise-process config: it has neither 'type' nor 'num_train_timesteps'")
    n = int(cfg["num_train_timesteps"])
    class_name = str(cfg.get("_class_name", ""))
    if cfg.get("use_flow_sigmas") or class_name.startswith("FlowMatch"):
        # Flow models are trained on all of (0, 1); shifted grids come close to both ends.
        return RectifiedFlow(t_min=1e-6, t_max=1.0 - 1e-6, timestep_scale=float(n))
    return DiscreteVP.from_beta_schedule(
        beta_schedule=cfg.get("beta_schedule", "linear"),
        beta_start=cfg.get("beta_start", 0.0001),
        beta_end=cfg.get("beta_end", 0.02),
        num_train_timesteps=n,
        trained_betas=cfg.get("trained_betas"),
        rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )
