"""Step schedules: which noise levels to visit.

Each builder returns a :class:`Schedule` of ``num_steps + 1`` noise levels σ̃ (EDM units) for a noise
process, ending by one of the conventions in :data:`~diffsamplers.schedules.schedule.FINAL_CONVENTIONS`.

**Final-step policy** (the same for every builder here, for Align Your Steps and for learned schedules):
``final="zero"`` by default — the (n + 1)-point grid from σ_max to σ_min with its last level replaced by 0, so
every one of the n model evaluations lies on the grid and the last step jumps from the n-th grid level to 0
(diffusers' DPM-Solver/UniPC ``final_sigmas_type="zero"``, the published AYS lists). ``"sigma_min"`` keeps the
n + 1 grid points and stops at σ_min; ``"append_zero"`` builds an n-point grid and appends 0 (k-diffusion and
diffusers' Karras/exponential/beta sigmas: pass it explicitly to reproduce those).

* :func:`uniform_time` — uniform in the process time t (DPM-Solver's ``time_uniform``);
* :func:`uniform_logsnr` — uniform in λ = log(α/σ) (DPM-Solver's ``logSNR``; diffusers' ``use_lu_lambdas``);
* :func:`karras` — Karras et al. 2022, Eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ;
* :func:`exponential` — geometric in σ̃ between given bounds (diffusers' ``use_exponential_sigmas``);
* :func:`beta` — Lee et al. 2024, "Beta Sampling is All You Need" (diffusers' ``use_beta_sigmas``);
* :func:`diffusers_spacing` — diffusers' integer ``linspace`` / ``leading`` / ``trailing`` timesteps
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2);
* :func:`from_sigmas` / :func:`from_timesteps` — explicit lists.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from ..noise import DiscreteVP, NoiseProcess
from .schedule import Schedule, check_final

__all__ = [
    "Final",
    "uniform_time",
    "uniform_logsnr",
    "karras",
    "exponential",
    "beta",
    "diffusers_spacing",
    "diffusers_timesteps",
    "from_sigmas",
    "from_timesteps",
    "default_schedule",
    "build_schedule",
    "SPACINGS",
]

Final = Literal["zero", "sigma_min", "append_zero"]


def check_num_steps(num_steps: object, process: NoiseProcess | None = None, extra_levels: int = 0) -> int:
    """Validate a step count: a positive integer, and for a discrete model no more distinct noise levels
    than it was trained on."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an integer, got {num_steps!r}")
    n = int(num_steps)
    if n <= 0:
        raise ValueError(f"num_steps must be >= 1, got {n}")
    if isinstance(process, DiscreteVP) and n + extra_levels > process.num_train_timesteps:
        raise ValueError(
            f"num_steps={n} is beyond the training schedule: the model has {process.num_train_timesteps} "
            "training timesteps"
        )
    return n


def _grid_size(num_steps: int, final: str) -> int:
    return num_steps if check_final(final) == "append_zero" else num_steps + 1


def _finish(grid: np.ndarray, final: str, **metadata: object) -> Schedule:
    grid = np.asarray(grid, dtype=np.float64)
    if final == "zero":
        sigmas = np.concatenate([grid[:-1], [0.0]])
    elif final == "append_zero":
        sigmas = np.concatenate([grid, [0.0]])
    else:
        sigmas = grid
    return Schedule(sigmas, metadata={"final": final, **metadata})


def uniform_time(
    process: NoiseProcess,
    num_steps: int,
    final: Final = "zero",
    t_start: float | None = None,
    t_end: float | None = None,
) -> Schedule:
    """Grid uniform in process time from ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``);
    ``final``: the module's final-step policy (default ``"zero"``)."""
    final = check_final(final)
    n = check_num_steps(num_steps, process, extra_levels=int(final == "sigma_min"))
    t0 = process.t_max if t_start is None else float(t_start)
    t1 = process.t_min if t_end is None else float(t_end)
    ts = np.linspace(t0, t1, _grid_size(n, final))
    return _finish(process.sigma_tilde(ts), final, spacing="uniform_time")


def _bounds(
    process: NoiseProcess, num_steps: int, final: str, sigma_max: float | None, sigma_min: float | None
) -> tuple[int, int, float, float]:
    """(steps, grid points, σ̃_max, σ̃_min) for a builder, validating the final convention and the step count."""
    final = check_final(final)
    n = check_num_steps(num_steps, process, extra_levels=int(final == "sigma_min"))
    hi = process.sigma_max if sigma_max is None else float(sigma_max)
    lo = process.sigma_min if sigma_min is None else float(sigma_min)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
    return n, _grid_size(n, final), hi, lo


def exponential(
    process: NoiseProcess,
    num_steps: int,
    final: Final = "zero",
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> Schedule:
    """Geometric σ̃ between the bounds, uniform in λ = −log σ̃; ``final`` by the module's policy (default
    ``"zero"``; diffusers' ``use_exponential_sigmas`` is ``final="append_zero"``)."""
    _, size, hi, lo = _bounds(process, num_steps, final, sigma_max, sigma_min)
    grid = np.exp(np.linspace(math.log(hi), math.log(lo), size))
    return _finish(grid, final, spacing="exponential")


def uniform_logsnr(
    process: NoiseProcess,
    num_steps: int,
    final: Final = "zero",
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> Schedule:
    """Grid uniform in λ = −log σ̃ (Lu et al. 2022, DPM-Solver, Sec. 3.3 "logSNR" step sizes).

    The same levels as :func:`exponential` (only the metadata's ``spacing`` differs); ``final`` by the module's
    policy (default ``"zero"``; diffusers' ``use_lu_lambdas`` is ``final="append_zero"``).
    """
    sched = exponential(process, num_steps, final, sigma_max, sigma_min)
    return Schedule(sched.sigmas, metadata={**sched.metadata, "spacing": "uniform_logsnr"})


def karras(
    process: NoiseProcess,
    num_steps: int,
    final: Final = "zero",
    rho: float = 7.0,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> Schedule:
    """Karras et al. 2022, Eq. 5 ("EDM" ρ-schedule), ρ = 7 by default; ``final`` by the module's policy (default
    ``"zero"``; k-diffusion's ``get_sigmas_karras`` and diffusers' ``use_karras_sigmas`` are
    ``final="append_zero"``)."""
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    _, size, hi, lo = _bounds(process, num_steps, final, sigma_max, sigma_min)
    ramp = np.linspace(0.0, 1.0, size)
    grid = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _finish(grid, final, spacing="karras", rho=rho)


def beta(
    process: NoiseProcess,
    num_steps: int,
    final: Final = "zero",
    a: float = 0.6,
    b: float = 0.6,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> Schedule:
    """Lee et al. 2024, "Beta Sampling is All You Need": σ̃ placed at Beta(a, b) quantiles between the bounds;
    ``final`` by the module's policy (default ``"zero"``; diffusers' ``use_beta_sigmas`` is
    ``final="append_zero"``)."""
    import scipy.stats

    _, size, hi, lo = _bounds(process, num_steps, final, sigma_max, sigma_min)
    q = 1.0 - np.linspace(0.0, 1.0, size)
    grid = lo + scipy.stats.beta.ppf(q, a, b) * (hi - lo)
    return _finish(grid, final, spacing="beta", a=a, b=b)


def _strictly_decreasing_integers(ts: np.ndarray) -> np.ndarray:
    """Push rounded timesteps down so that none repeats (t_i ≤ t_{i−1} − 1), keeping the first."""
    out = ts.astype(np.int64).copy()
    for i in range(1, out.size):
        out[i] = min(out[i], out[i - 1] - 1)
    return out


def diffusers_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: Literal["linspace", "leading", "trailing"] = "linspace",
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """diffusers' integer timesteps for ``spacing`` (Lin et al. 2024, Table 2), exactly as its ``set_timesteps``
    computes them — unchecked, so rounding may repeat a timestep (``linspace`` with as many steps as training
    timesteps). ``last_timestep`` (default: ``num_train_timesteps``) is where ``lambda_min_clipped`` cut the
    training schedule; ``trailing`` keeps the stride N/n of the whole schedule."""
    big_n, n = int(num_train_timesteps), int(num_steps)
    last_t = big_n if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last_t // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last_t, 0, -big_n / n).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: expected 'linspace', 'leading' or 'trailing'")
    return ts.astype(np.int64)


def diffusers_spacing(
    process: DiscreteVP,
    num_steps: int,
    spacing: Literal["linspace", "leading", "trailing"] = "linspace",
    final: Literal["zero", "sigma_min"] = "zero",
    steps_offset: int = 0,
    lambda_min_clipped: float = -math.inf,
) -> Schedule:
    """Integer training timesteps as diffusers' DPM-Solver/UniPC ``set_timesteps`` computes them.

    ``final`` is the level appended after the n timesteps: 0 (``"zero"``, the default, as everywhere) or σ̃ at
    training step 0 (``"sigma_min"``); diffusers has no ``"append_zero"`` for these spacings. Where rounding puts
    two steps on the same training timestep (e.g. 1000 ``linspace`` steps of a 1000-step model, which makes
    diffusers' DPM-Solver return NaN), the later ones are moved down by one so the grid stays strictly
    decreasing.
    """
    if not isinstance(process, DiscreteVP):
        raise TypeError(f"diffusers' {spacing!r} spacing needs a discrete training schedule, got {process!r}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(
            f"unknown final convention {final!r} for diffusers' {spacing!r} spacing: expected 'zero' or 'sigma_min'"
        )
    n = check_num_steps(num_steps, process, extra_levels=int(final == "sigma_min"))
    big_n = process.num_train_timesteps
    # diffusers: clip the start of the schedule where λ < lambda_min_clipped (critical for cosine schedules).
    clipped_idx = int(np.searchsorted(process.lambdas[::-1], lambda_min_clipped))
    last_t = big_n - clipped_idx
    ts = _strictly_decreasing_integers(diffusers_timesteps(big_n, n, spacing, steps_offset, last_t))
    if ts.size != n or ts[-1] < 0 or ts[0] > big_n - 1:
        raise ValueError(
            f"{spacing!r} spacing cannot place {n} distinct steps on the {last_t} usable training timesteps"
        )
    last = 0.0 if final == "zero" else float(process.sigma_tilde(0.0))
    sigmas = np.concatenate([process.sigma_tilde(ts.astype(np.float64)), [last]])
    if final == "sigma_min" and sigmas[-2] <= last:
        raise ValueError(
            f"final='sigma_min' with {n} steps puts the last step on training timestep 0, so the final step "
            "would have zero length; use fewer steps or final='zero'"
        )
    return Schedule(sigmas, timesteps=ts.astype(np.float64), metadata={"final": final, "spacing": spacing})


def from_sigmas(process: NoiseProcess, sigmas: object, timesteps: object = None) -> Schedule:
    """An explicit list of noise levels σ̃ (including the final one), checked against the process range."""
    return Schedule(np.asarray(sigmas, dtype=np.float64), timesteps=timesteps).check_range(process)


def from_timesteps(process: NoiseProcess, timesteps: object, final: Literal["zero", "sigma_min"] = "zero") -> Schedule:
    """Explicit model timesteps (in the process's timestep units, decreasing), plus a final level: 0
    (``"zero"``, the default) or the process's σ̃_min (``"sigma_min"``)."""
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final convention {final!r} for explicit timesteps: expected 'zero' or 'sigma_min'")
    ts = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    if ts.size == 0:
        raise ValueError("timesteps must not be empty")
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"timesteps contain a non-finite value: {ts.tolist()}")
    t = process.t_from_timestep(ts)
    if t.max() > process.t_max * (1 + 1e-9) or t.min() < process.t_min * (1 - 1e-9):
        raise ValueError(
            f"timesteps {ts.min()}..{ts.max()} fall outside the model's range "
            f"{process.timestep(process.t_min)}..{process.timestep(process.t_max)}"
        )
    last = 0.0 if final == "zero" else process.sigma_min
    sigmas = np.concatenate([process.sigma_tilde(t), [last]])
    return Schedule(sigmas, timesteps=ts, metadata={"final": final, "spacing": "custom"}).check_range(process)


SPACINGS = {
    "uniform_time": uniform_time,
    "uniform_logsnr": uniform_logsnr,
    "karras": karras,
    "exponential": exponential,
    "beta": beta,
}


def build_schedule(
    process: NoiseProcess, num_steps: int, spacing: str = "uniform_time", final: Final | None = None
) -> Schedule:
    """Build a schedule by name: any of :data:`SPACINGS`, or diffusers' ``linspace``/``leading``/``trailing``;
    ``final=None`` is the builders' default, ``"zero"``."""
    if spacing in ("linspace", "leading", "trailing"):
        return diffusers_spacing(process, num_steps, spacing, final=final or "zero")  # type: ignore[arg-type]
    if spacing not in SPACINGS:
        raise ValueError(
            f"unknown spacing {spacing!r}: expected one of {sorted(SPACINGS) + ['linspace', 'leading', 'trailing']}"
        )
    kwargs = {} if final is None else {"final": final}
    return SPACINGS[spacing](process, num_steps, **kwargs)


def default_schedule(process: NoiseProcess, num_steps: int) -> Schedule:
    """Uniform in time, ending at σ̃ = 0: DPM-Solver's default grid and diffusers' ``linspace`` in spirit."""
    return uniform_time(process, num_steps, final="zero")
