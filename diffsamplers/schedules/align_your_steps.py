"""Align Your Steps: the published optimised schedules and their log-linear interpolation.

Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"
(ICML 2024, arXiv:2404.14507). The paper optimises 10-step schedules per model (Table 3 gives them to three
decimals, as EDM noise levels σ̃ = σ/α); for other step counts the authors' quickstart
(research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html) interpolates log σ̃ linearly over the step
index. Two published sources disagree slightly, so both are kept:

* ``"quickstart"``: the full-precision levels of the authors' quickstart (also in ComfyUI's
  ``AlignYourStepsScheduler``). For SD 1.5 and SDXL they are σ̃ at the integer timesteps of diffusers'
  ``AysSchedules`` (computed from SD's β table in float64) to all 10 printed decimals — checked in the
  tests. SVD's list has three decimals there too.
* ``"paper"``: Table 3 of the paper, three decimals; diffusers' ``AysSchedules`` sigma lists are these values
  with the last one replaced by 0. For SD 1.5 and SDXL they differ from the quickstart values by up to
  3.5e-3 (0.2 %), e.g. 3.861 against σ̃(736) = 3.8637, and SD 1.5's 0.399 lies at timestep 124.56, not 124.
  DeepFloyd IF is only in the paper.

The last noise level (σ_min of the model) follows the package's final-step policy
(:data:`~diffsamplers.schedules.schedule.FINAL_CONVENTIONS`), with the same names as every other schedule:

* ``"zero"`` (default): interpolate to n + 1 levels and replace the last by 0 — the quickstart's, ComfyUI's
  and diffusers' convention. At n = 10 it visits exactly the paper's optimised levels, and every model
  evaluation lies on the optimised curve.
* ``"append_zero"``: interpolate to n levels, keep σ_min and append 0 (AUTOMATIC1111's AYS scheduler): the last
  step runs from σ_min to 0, so the optimised 10-step grid is *not* reproduced at n = 10.
* ``"sigma_min"``: interpolate to n + 1 levels and stop at σ_min (the paper's own endpoint).

The former names ``"replace"`` (= ``"zero"``) and ``"append"`` (= ``"append_zero"``) are still accepted, with a
``DeprecationWarning``; the schedule's ``metadata["final"]`` is always the general name.

The same interpolation serves learned schedules (:mod:`diffsamplers.tuning.ays_optimizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..noise import DiscreteVP, NoiseProcess, VarianceExploding
from .schedule import FINAL_CONVENTIONS, Schedule, check_final
from .spacing import check_num_steps

__all__ = [
    "AYS_FINALS",
    "AYS_MODELS",
    "PublishedAYS",
    "align_your_steps",
    "ays_noise_levels",
    "ays_sigmas_for_diffusers",
    "ays_timesteps_for_diffusers",
    "check_levels",
    "loglinear_interpolation",
    "published_ays",
    "schedule_from_levels",
]

#: A final convention: the general names, or the deprecated ``"replace"`` / ``"append"`` (``"zero"`` /
#: ``"append_zero"``).
AysFinal = Literal["zero", "append_zero", "sigma_min", "replace", "append"]
#: The final conventions of Align Your Steps and learned schedules: the package's general ones.
AYS_FINALS = FINAL_CONVENTIONS


@dataclass(frozen=True)
class PublishedAYS:
    """One model's published 10-step schedule (11 noise levels σ̃, decreasing, ending at the model's σ_min)."""

    name: str
    paper: tuple[float, ...]
    quickstart: tuple[float, ...] | None
    timesteps: tuple[int, ...] | None  # the diffusers / quickstart integer timesteps of the 11 levels, if discrete
    process_config: dict

    def process(self) -> NoiseProcess:
        """The training noise process the schedule was optimised for."""
        cfg = dict(self.process_config)
        if cfg.pop("type") == "ve":
            return VarianceExploding(**cfg)
        return DiscreteVP.from_beta_schedule(**cfg)


_SD_PROCESS = {"type": "discrete_vp", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

_PUBLISHED = {
    "sd15": PublishedAYS(
        "sd15",
        paper=(14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
        quickstart=(
            14.6146412293,
            6.4745760956,
            3.8636745985,
            2.6946151520,
            1.8841921177,
            1.3943805092,
            0.9642583904,
            0.6523686016,
            0.3977456272,
            0.1515232662,
            0.0291671582,
        ),
        timesteps=(999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
        process_config=_SD_PROCESS,
    ),
    "sdxl": PublishedAYS(
        "sdxl",
        paper=(14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
        quickstart=(
            14.6146412293,
            6.3184485287,
            3.7681790315,
            2.1811480769,
            1.3405244945,
            0.8620721141,
            0.5550693289,
            0.3798540708,
            0.2332364134,
            0.1114188177,
            0.0291671582,
        ),
        timesteps=(999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
        process_config=_SD_PROCESS,
    ),
    "svd": PublishedAYS(
        "svd",
        paper=(700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
        quickstart=(700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
        timesteps=None,
        process_config={"type": "ve", "sigma_min": 0.002, "sigma_max": 700.0, "timestep": "edm"},
    ),
    "deepfloyd_if": PublishedAYS(
        "deepfloyd_if",
        paper=(160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006),
        quickstart=None,
        timesteps=(995, 920, 811, 686, 555, 418, 315, 174, 109, 12, 0),
        process_config={"type": "discrete_vp", "beta_schedule": "squaredcos_cap_v2"},
    ),
}

_ALIASES = {
    "sd15": "sd15",
    "sd1": "sd15",
    "sd1.5": "sd15",
    "sd": "sd15",
    "stablediffusion": "sd15",
    "sdxl": "sdxl",
    "stablediffusionxl": "sdxl",
    "svd": "svd",
    "stablediffusionvideo": "svd",
    "deepfloyd_if": "deepfloyd_if",
    "if": "deepfloyd_if",
    "deepfloyd-if": "deepfloyd_if",
}

#: Models with a published schedule.
AYS_MODELS = tuple(_PUBLISHED)


def published_ays(model: str) -> PublishedAYS:
    """The published schedule of ``model`` ("sd15", "sdxl", "svd", "deepfloyd_if"; ComfyUI's "SD1"/"SDXL"/"SVD" too)."""
    key = _ALIASES.get(str(model).lower().replace(" ", ""))
    if key is None:
        raise ValueError(f"no published Align Your Steps schedule for {model!r}: expected one of {AYS_MODELS}")
    return _PUBLISHED[key]


def ays_noise_levels(model: str, source: Literal["quickstart", "paper"] | None = None) -> np.ndarray:
    """The 11 published noise levels (float64). ``source=None`` takes the full-precision quickstart list
    where it exists, otherwise the paper's."""
    pub = published_ays(model)
    if source not in (None, "quickstart", "paper"):
        raise ValueError(f"unknown source {source!r}: expected 'quickstart' or 'paper'")
    if source == "quickstart" and pub.quickstart is None:
        raise ValueError(f"the authors' quickstart has no {pub.name} schedule; use source='paper'")
    levels = pub.paper if source == "paper" or pub.quickstart is None else pub.quickstart
    return np.array(levels, dtype=np.float64)


def check_levels(levels: object, what: str = "noise levels") -> np.ndarray:
    """Validate noise levels for log-space work: 1-D, finite, positive, strictly decreasing; returns float64."""
    arr = np.asarray(levels, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{what} must be a 1-D list of at least 2 values, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what} contain a non-finite value: [{int(bad[0])}] = {float(arr[bad[0]])}")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise ValueError(
            f"{what} must be positive for log-linear interpolation: [{int(bad[0])}] = {float(arr[bad[0]])}"
        )
    bad = np.flatnonzero(np.diff(arr) >= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what} must be strictly decreasing: [{i + 1}] = {float(arr[i + 1])!r} is not below [{i}] = {float(arr[i])!r}"
        )
    return arr


def loglinear_interpolation(levels: object, num_points: int) -> np.ndarray:
    """Resample decreasing noise levels to ``num_points`` values, linear in log σ̃ over a uniform index.

    The given levels sit at abscissae 0, 1/(m−1), …, 1; the result at 0, 1/(num_points−1), …, 1 (the
    quickstart's ``loglinear_interp``). When ``num_points`` equals the number of levels they are returned
    unchanged (bit for bit).
    """
    arr = check_levels(levels)
    n = int(num_points)
    if n < 2:
        raise ValueError(f"need at least 2 interpolation points, got {num_points}")
    if n == arr.size:
        return arr.copy()
    xs = np.linspace(0.0, 1.0, arr.size)
    out = np.exp(np.interp(np.linspace(0.0, 1.0, n), xs, np.log(arr)))
    out[0], out[-1] = arr[0], arr[-1]  # the endpoints exactly
    return out


def schedule_from_levels(
    levels: object,
    num_steps: int,
    final: AysFinal = "zero",
    process: NoiseProcess | None = None,
    **metadata: object,
) -> Schedule:
    """A ``num_steps`` schedule by log-linear interpolation of ``levels`` with the ``final`` convention
    (module docstring; default ``"zero"``)."""
    fin = check_final(final, aliases=True)
    arr = check_levels(levels)
    n = check_num_steps(num_steps, process, extra_levels=int(fin == "sigma_min"))
    if fin == "append_zero":
        sigmas = np.concatenate([loglinear_interpolation(arr, n) if n >= 2 else arr[:1], [0.0]])
    else:
        grid = loglinear_interpolation(arr, n + 1)
        sigmas = np.concatenate([grid[:-1], [0.0]]) if fin == "zero" else grid
    sched = Schedule(sigmas, metadata={"spacing": "align_your_steps", "final": fin, **metadata})
    return sched.check_range(process) if process is not None else sched


def align_your_steps(
    model: str,
    num_steps: int = 10,
    final: AysFinal = "zero",
    source: Literal["quickstart", "paper"] | None = None,
    process: NoiseProcess | None = None,
) -> Schedule:
    """The published Align Your Steps schedule of ``model`` for ``num_steps`` steps.

    ``process`` (optional) checks that the levels lie in the model's noise range. The result works with
    every solver here (``sample(den, solver, align_your_steps("sd15", 20))``) and, through
    :func:`ays_sigmas_for_diffusers` / :func:`ays_timesteps_for_diffusers`, with diffusers' schedulers.
    """
    levels = ays_noise_levels(model, source)
    pub = published_ays(model)
    src = source or ("quickstart" if pub.quickstart is not None else "paper")
    return schedule_from_levels(levels, num_steps, final, process, model=pub.name, source=src)


def ays_sigmas_for_diffusers(schedule: Schedule) -> list[float]:
    """The σ list to pass as ``pipe(..., sigmas=...)`` / ``scheduler.set_timesteps(sigmas=...)`` (VP/VE models)."""
    return [float(s) for s in schedule.sigmas]


def ays_timesteps_for_diffusers(schedule: Schedule, process: NoiseProcess) -> list[int]:
    """Integer training timesteps of the schedule's evaluation levels, for ``pipe(..., timesteps=...)``.

    Each level σ̃ is mapped to the (fractional) training timestep with the same log σ̃ and rounded, as the
    published timestep lists were; a repeated timestep (very many steps) raises an error.
    """
    if not isinstance(process, DiscreteVP):
        raise TypeError(f"integer timesteps need a discrete training schedule, got {process!r}")
    schedule.check_range(process)
    ts = np.round(process.timestep_from_sigma_tilde(schedule.sigmas[:-1])).astype(np.int64)
    if np.any(np.diff(ts) >= 0):
        i = int(np.flatnonzero(np.diff(ts) >= 0)[0])
        raise ValueError(
            f"levels {schedule.sigmas[i]:.6g} and {schedule.sigmas[i + 1]:.6g} round to the same training timestep "
            f"{ts[i]}; use fewer steps or pass sigmas= instead"
        )
    return ts.tolist()
