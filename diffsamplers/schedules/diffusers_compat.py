"""diffusers' ``set_timesteps``, reproduced: the grids of ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` (diffusers 0.42.1).

Given a scheduler config and one of ``num_inference_steps`` / ``timesteps`` / ``sigmas``, :func:`diffusers_grid`
returns the grid diffusers would build — the same integer timesteps and the same float32 levels (σ̃ = σ/α for
VP models, flow time t for flow models) — as a :class:`Schedule` the solvers plan on (the float64 values of those
float32 levels) and the float32 array diffusers keeps as ``scheduler.sigmas``. The training table is diffusers'
float32 σ̃ = ((1 − ᾱ)/ᾱ)^½ (:func:`diffsamplers.noise.beta_schedule_tables`); ramps start from its float32
values and timesteps are recovered by diffusers' rule (interpolation of log σ̃ between the two bracketing training
steps, then rounding or truncation), so every integer comes out the same.

The two schedulers differ, hence two flavours (:func:`grid_flavour` reads the config's class name):

* ``"dpmsolver"``: ``lambda_min_clipped`` cuts the start of ``linspace``/``leading``/``trailing`` grids; Karras
  and uniform-logSNR (``use_lu_lambdas``) timesteps are rounded except for the cosine schedule, exponential and
  beta ones truncated; the flow grid is 1 − linspace(1, 1/N, n + 1) shifted, and ``mu`` sets the shift to e^μ;
  ``final_sigmas_type="sigma_min"`` appends σ̃ at training step 0;
* ``"unipc"``: no ``lambda_min_clipped`` or ``use_lu_lambdas``; ``sigma_min``/``sigma_max`` bound the Karras /
  exponential / beta ramps; Karras timesteps are always rounded; the flow grid is linspace(1, 1/N, n + 1)[:-1]
  with ``flow_shift`` or the exponential/linear dynamic shift (``mu``), ``shift_terminal``, and 1 − 10⁻⁶ for a
  first level of 1; custom ``sigmas`` (flow models: n levels without the final one) are shifted the same way;
  ``"sigma_min"`` repeats the last level of Karras / exponential / beta / flow grids.

**Zero-length and rising steps.** diffusers' grids can repeat a level: every ramp with
``final_sigmas_type="sigma_min"`` (the ramp already ends at σ_min and σ_min is appended again), UniPC's flow grid
with ``"sigma_min"``, and ``linspace`` with as many steps as training timesteps (rounding puts two steps on one
timestep). A few rise: the float32 σ_min appended to a cosine uniform-logSNR ramp lies 2e-7 above its end, and a
zero-terminal-SNR table's σ̃ at step 999 (ᾱ = 2⁻²⁴) is below those at steps 996–998. All are kept
(``Schedule(strictly_decreasing=False)``), so the numbers are diffusers': a zero-length first-order (or 2M
midpoint) step leaves the sample unchanged. ``strictly_decreasing_sigmas=True`` — a config key of this package,
default off — builds grids without repeats instead: repeated rounded timesteps move down one training step
(:func:`~diffsamplers.schedules.spacing.diffusers_spacing`), ramps and UniPC's flow grid get n + 1 levels that end
at σ_min, and grids that still do not fall strictly are refused.

**Flow models** (``use_flow_sigmas``): ``sigmas=`` and ``timesteps=`` follow ``FlowMatchEulerDiscreteScheduler``
— n flow times without the final level (t = 1 allowed; it is planned at 1 − 10⁻⁶), shifted like the scheduler's own
grid, n steps — for both flavours (diffusers' DPM-Solver takes neither; UniPC takes ``sigmas=`` so). DPM-Solver's
grids also take ``shift_terminal`` and the linear time shift (μ as the shift). :func:`check_flow_config` refuses
contradictory flow keys.

Other extensions where diffusers raises (documented in ``docs/parity.md``): ``sigmas=`` for VP models — the levels
including the final one, used exactly, as ``EulerDiscreteScheduler`` takes them — and ``timesteps=`` for UniPC
(DPM-Solver's rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..noise import DiscreteVP, NoiseProcess, RectifiedFlow, beta_schedule_tables
from .schedule import Schedule
from .spacing import beta, check_num_steps, diffusers_spacing, diffusers_timesteps, exponential, karras

__all__ = [
    "DiffusersGrid",
    "check_flow_config",
    "Flavour",
    "SIGMA_OPTIONS",
    "TrainingTables",
    "diffusers_grid",
    "grid_flavour",
    "schedule_from_scheduler_config",
    "training_tables",
]

Flavour = Literal["dpmsolver", "unipc"]

#: The sigma-spacing options, in the order diffusers' DPM-Solver tries them (UniPC has no ``use_lu_lambdas``).
SIGMA_OPTIONS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")
_EXCLUSIVE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")  # diffusers refuses two of these
_OPTIONS: dict[str, tuple[str, ...]] = {"dpmsolver": SIGMA_OPTIONS, "unipc": _EXCLUSIVE}
_UNIPC_CLASSES = ("UniPCMultistepScheduler", "DCSolverScheduler")
_BETA_KEYS = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "num_train_timesteps",
    "trained_betas",
    "rescale_betas_zero_snr",
)
_BETA_DEFAULTS = ("linear", 0.0001, 0.02, 1000, None, False)


@dataclass(frozen=True)
class DiffusersGrid:
    """A diffusers scheduler's grid: the schedule the solvers plan on, and ``scheduler.sigmas`` as diffusers keeps
    it (float32, n + 1 levels: σ̃ for VP models, flow time t for flow models)."""

    schedule: Schedule
    sigmas: np.ndarray

    @property
    def timesteps(self) -> np.ndarray:
        assert self.schedule.timesteps is not None
        return self.schedule.timesteps


@dataclass(frozen=True)
class TrainingTables:
    """The float32 training tables diffusers' DPM-Solver / UniPC schedulers expose, indexed by training timestep:
    ``betas``, ``alphas``, ``alphas_cumprod``, ``alpha_t`` = √ᾱ, ``sigma_t`` = √(1 − ᾱ), ``lambda_t`` =
    log α_t − log σ_t and ``sigmas`` = ((1 − ᾱ)/ᾱ)^½ (torch, on the CPU)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    lambda_t: torch.Tensor
    sigmas: torch.Tensor


def training_tables(config: Mapping[str, Any]) -> TrainingTables:
    """:class:`TrainingTables` from a scheduler config's β keys, bit for bit as diffusers computes them (also for
    flow configs, where diffusers builds them from the β keys all the same)."""
    betas, alphas, ac = beta_schedule_tables(
        *(config.get(key, default) for key, default in zip(_BETA_KEYS, _BETA_DEFAULTS))
    )
    alpha_t, sigma_t = torch.sqrt(ac), torch.sqrt(1 - ac)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    return TrainingTables(betas, alphas, ac, alpha_t, sigma_t, lambda_t, ((1 - ac) / ac) ** 0.5)


def grid_flavour(config: Mapping[str, Any]) -> Flavour:
    """``"unipc"`` for a UniPC / DC-Solver config, else ``"dpmsolver"``."""
    return "unipc" if config.get("_class_name") in _UNIPC_CLASSES else "dpmsolver"


@dataclass(frozen=True)
class _Request:
    """The config's settings that shape a grid, read once per ``set_timesteps`` call."""

    flavour: Flavour
    config: Mapping[str, Any]
    process: NoiseProcess
    table: np.ndarray  # float32 σ̃ per training timestep
    final: str
    option: str | None
    strict: bool

    @property
    def num_train(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    @property
    def flow(self) -> bool:
        return isinstance(self.process, RectifiedFlow)

    def final_level(self, levels: np.ndarray) -> float:
        """The level appended after the n model evaluations."""
        if self.final == "zero":
            return 0.0
        if self.flavour == "unipc" and (self.option is not None or self.flow):
            return float(levels[-1])  # UniPC repeats its last level
        return float(self.table[0])  # σ̃ at training step 0 (DPM-Solver: also for flow grids, as a flow time)


def diffusers_grid(
    process: NoiseProcess,
    config: Mapping[str, Any],
    num_inference_steps: int | None = None,
    timesteps: Any = None,
    sigmas: Any = None,
    mu: float | None = None,
    flavour: Flavour | None = None,
) -> DiffusersGrid:
    """The grid diffusers' DPM-Solver (``flavour="dpmsolver"``) or UniPC scheduler builds for ``config``; see the
    module docstring. ``mu`` is the dynamic flow shift (the scheduler checks ``use_dynamic_shifting``).

    On flow models ``sigmas`` and ``timesteps`` follow ``FlowMatchEulerDiscreteScheduler``: n levels without the
    final one (t = 1 allowed), shifted like the scheduler's own grid; either or both may be given, and
    ``num_inference_steps`` with them if it equals their length.
    """
    request = _request(process, config, flavour or grid_flavour(config))
    if request.flow and (sigmas is not None or timesteps is not None):
        return _flow_custom_grid(request, num_inference_steps, sigmas, timesteps, mu)
    given = [
        name
        for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas (got {given or 'none'})")
    if sigmas is not None:
        if request.option is not None:
            raise ValueError(f"custom sigmas cannot be combined with {request.option}=True")
        return _custom_sigmas(request, sigmas)
    if timesteps is not None:
        return _custom_timesteps(request, timesteps)
    if request.option is not None:
        return _ramp_grid(request, check_num_steps(num_inference_steps))
    if request.flow:
        return _flow_grid(request, check_num_steps(num_inference_steps), mu)
    return _spacing_grid(request, check_num_steps(num_inference_steps))


def schedule_from_scheduler_config(
    process: NoiseProcess,
    config: Mapping[str, Any],
    num_inference_steps: int | None = None,
    timesteps: Any = None,
    sigmas: Any = None,
    mu: float | None = None,
    flavour: Flavour | None = None,
) -> Schedule:
    """The :class:`Schedule` of :func:`diffusers_grid` (what the adapters' solvers plan on)."""
    return diffusers_grid(process, config, num_inference_steps, timesteps, sigmas, mu, flavour).schedule


# -- the request ---------------------------------------------------------------------------------------------------
def _request(process: NoiseProcess, config: Mapping[str, Any], flavour: Flavour) -> _Request:
    if flavour not in _OPTIONS:
        raise ValueError(f"unknown grid flavour {flavour!r}: expected 'dpmsolver' or 'unipc'")
    final = config.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
    options = [o for o in _OPTIONS[flavour] if config.get(o)]
    if len([o for o in options if o in _EXCLUSIVE]) > 1:
        raise ValueError(f"only one of {_EXCLUSIVE} may be set, got {options}")
    if bool(config.get("use_flow_sigmas")) != isinstance(process, RectifiedFlow):
        raise ValueError("use_flow_sigmas needs a rectified-flow noise process, and a flow process needs it")
    if not isinstance(process, (DiscreteVP, RectifiedFlow)):
        raise TypeError(f"diffusers' grids need a discrete VP or a rectified-flow process, got {process!r}")
    check_flow_config(config, flavour)
    option = options[0] if options else None
    table = training_tables(config).sigmas.numpy()
    return _Request(flavour, config, process, table, final, option, bool(config.get("strictly_decreasing_sigmas")))


def check_flow_config(config: Mapping[str, Any], flavour: Flavour) -> None:
    """Refuse a config whose flow-matching keys contradict each other, naming the keys (raised at construction).

    ``prediction_type="flow_prediction"`` needs ``use_flow_sigmas=True`` (a velocity on VP levels means nothing);
    with flow sigmas, the Karras / Lu / exponential / beta options are refused except UniPC's Karras sigmas (diffusers
    uses the VP noise levels as flow times there, t > 1); ``time_shift_type`` is ``"exponential"`` or ``"linear"``;
    ``shift_terminal`` lies in (0, 1).
    """
    flow = bool(config.get("use_flow_sigmas"))
    if config.get("prediction_type") == "flow_prediction" and not flow:
        raise ValueError(
            "prediction_type='flow_prediction' with use_flow_sigmas=False: a flow-matching model needs flow sigmas; "
            "pass use_flow_sigmas=True (and flow_shift / use_dynamic_shifting as the model's FlowMatch scheduler "
            "had them), or the prediction type of a VP model"
        )
    time_shift_type = config.get("time_shift_type", "exponential")
    if time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    if not flow:
        return
    terminal = config.get("shift_terminal")
    if terminal is not None and not 0.0 < float(terminal) < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1) (a flow time), got {terminal!r}")
    for option in _OPTIONS[flavour]:
        if config.get(option) and (flavour, option) != ("unipc", "use_karras_sigmas"):
            raise ValueError(
                f"{option}=True with use_flow_sigmas=True: diffusers' {flavour} scheduler uses the VP noise levels "
                "as flow times there (t > 1), which no flow model was trained on; only UniPC's Karras sigmas convert "
                f"them. Pass {option}=False (a flow grid is shifted with flow_shift / mu instead)"
            )


# -- the grids -----------------------------------------------------------------------------------------------------
def _finish(
    request: _Request,
    levels: np.ndarray,
    ts: np.ndarray,
    spacing: str,
    exact: bool = False,
    stored: np.ndarray | None = None,
) -> DiffusersGrid:
    """The grid of n + 1 ``levels`` (diffusers' units) and n timesteps; the schedule uses the float32 levels unless
    ``exact`` (an extension's explicit list, used as given). ``scheduler.sigmas`` keeps ``stored`` if given (the
    levels as asked, where the plan moved t = 1 below 1)."""
    levels = np.asarray(levels, dtype=np.float64)
    used = levels if exact else levels.astype(np.float32).astype(np.float64)
    stored = np.asarray(levels if stored is None else stored, dtype=np.float64).astype(np.float32)
    if request.flow:
        with np.errstate(divide="ignore"):
            used = used / (1.0 - used)  # σ̃ = t/(1 − t)
    metadata = {"spacing": spacing, "final": request.final, "flavour": request.flavour}
    schedule = Schedule(used, timesteps=ts, metadata=metadata, strictly_decreasing=request.strict or exact)
    return DiffusersGrid(schedule.check_range(request.process), stored)


def _spacing_grid(request: _Request, n: int) -> DiffusersGrid:
    """``linspace`` / ``leading`` / ``trailing`` integer timesteps, levels read off the training table."""
    spacing = request.config.get("timestep_spacing", "linspace")
    offset = int(request.config.get("steps_offset", 0))
    if request.strict:
        assert isinstance(request.process, DiscreteVP)
        clip = request.config.get("lambda_min_clipped", -math.inf) if request.flavour == "dpmsolver" else -math.inf
        ts = diffusers_spacing(request.process, n, spacing, request.final, offset, float(clip)).timesteps
        ts = np.asarray(ts, dtype=np.int64)
    else:
        ts = diffusers_timesteps(request.num_train, n, spacing, offset, _last_timestep(request))
    return _on_training_table(request, ts, spacing)


def _last_timestep(request: _Request) -> int:
    """diffusers' DPM-Solver cuts the grid where λ < ``lambda_min_clipped`` (float32 λ table); UniPC never does."""
    clip = request.config.get("lambda_min_clipped", -math.inf)
    if request.flavour == "unipc" or clip is None or clip == -math.inf:
        return request.num_train
    lam = training_tables(request.config).lambda_t
    return request.num_train - int(torch.searchsorted(torch.flip(lam, [0]), float(clip)))


def _on_training_table(request: _Request, ts: np.ndarray, spacing: str) -> DiffusersGrid:
    """Integer timesteps with their training levels (clamped outside the table, as ``np.interp``) and the final."""
    levels = np.interp(ts, np.arange(request.table.size), request.table)
    return _finish(request, np.append(levels, request.final_level(levels)), ts.astype(np.float64), spacing)


def _custom_timesteps(request: _Request, timesteps: Any) -> DiffusersGrid:
    if request.option is not None:
        raise ValueError(f"custom timesteps cannot be combined with {request.option}=True")
    ts = np.asarray(timesteps, dtype=np.float64).reshape(-1).astype(np.int64)
    if ts.size == 0:
        raise ValueError("timesteps must not be empty")
    # diffusers clamps the levels of timesteps outside 0 … N − 1 to the table's ends (np.interp) and feeds the
    # timesteps as given.
    return _on_training_table(request, ts, "custom")


def _custom_sigmas(request: _Request, sigmas: Any) -> DiffusersGrid:
    """The extension: levels including the final one, used exactly; timesteps follow from the process."""
    levels = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if levels.size < 2:
        raise ValueError(f"custom sigmas must include the final level: at least 2 values, got {levels.tolist()}")
    if not np.all(np.isfinite(levels)):
        raise ValueError(f"custom sigmas contain a non-finite value: {levels.tolist()}")
    if np.any(np.diff(levels) >= 0):
        raise ValueError(f"custom sigmas must be strictly decreasing, got {levels.tolist()}")
    Schedule(levels).check_range(request.process)
    ts = request.process.timestep_from_sigma_tilde(levels[:-1])
    return _finish(request, levels, ts, "custom_sigmas", exact=True)


def _ramp_grid(request: _Request, n: int) -> DiffusersGrid:
    """Karras / exponential / uniform-logSNR / beta levels between the training extremes (or the config's
    ``sigma_min``/``sigma_max``); with ``strictly_decreasing_sigmas`` and a σ_min end, n + 1 of them."""
    keep_end = request.strict and request.final == "sigma_min"
    ramp = _ramp(request, n + int(keep_end))
    if request.flow:  # UniPC's Karras sigmas on a flow model: σ̃ → t
        ramp = ramp / (ramp + 1.0)
        ts = np.trunc(ramp[:n] * request.num_train)
    else:
        ts = _timesteps_of_levels(ramp[:n], request.table)
        cosine = request.config.get("beta_schedule") == "squaredcos_cap_v2" and request.flavour == "dpmsolver"
        rounds = request.option in ("use_karras_sigmas", "use_lu_lambdas") and not cosine
        ts = np.round(ts) if rounds else np.trunc(ts)
    levels = ramp if keep_end else np.append(ramp, request.final_level(ramp))
    return _finish(request, levels, ts, request.option.removeprefix("use_"))  # type: ignore[union-attr]


def _ramp(request: _Request, size: int) -> np.ndarray:
    """``size`` ramp levels (σ̃), built from the float32 training table as diffusers builds them."""
    cfg, table, process = request.config, request.table, request.process
    if request.option == "use_lu_lambdas":  # uniform in log σ̃ between the float32 log-table's ends
        log_table = np.log(table)
        hi, lo = math.exp(float(log_table[-1])), math.exp(float(log_table[0]))
    else:
        hi = float(table[-1]) if cfg.get("sigma_max") is None else float(cfg["sigma_max"])
        lo = float(table[0]) if cfg.get("sigma_min") is None else float(cfg["sigma_min"])
    build = {"use_karras_sigmas": karras, "use_beta_sigmas": beta}.get(request.option or "", exponential)
    return build(process, size, final="append_zero", sigma_max=hi, sigma_min=lo).sigmas[:-1]


def _timesteps_of_levels(levels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: log σ̃ interpolated between the last training step at or below it (the first
    step if none; at most the second-to-last) and the next one, in diffusers' float32/float64 mix."""
    log_table = np.log(table)  # float32, as diffusers
    log_level = np.log(np.maximum(levels, 1e-10))
    below = log_table[None, :] <= log_level[:, None]
    last = log_table.size - 1 - np.argmax(below[:, ::-1], axis=1)
    low = np.minimum(np.where(below.any(axis=1), last, 0), log_table.size - 2)
    w = np.clip((log_table[low] - log_level) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _flow_grid(request: _Request, n: int, mu: float | None) -> DiffusersGrid:
    """The flow-matching grid of DPM-Solver (1 − linspace, shifted) or UniPC (linspace, shifted, stretched)."""
    big_n = request.num_train
    if request.flavour == "dpmsolver":
        shift = _static_shift(request.config, mu)
        base = 1.0 - np.linspace(1.0, 1.0 / big_n, n + 1)
        t = _stretch_to_terminal(request.config, np.flip(shift * base / (1.0 + (shift - 1.0) * base))[:-1])
        return _finish(request, np.append(t, request.final_level(t)), np.trunc(t * big_n), "flow")
    keep_end = request.strict and request.final == "sigma_min"
    t = _shift_flow_times(request.config, np.linspace(1.0, 1.0 / big_n, n + 1)[: n + int(keep_end)], mu)
    t = _below_one(t)
    count = t.size - int(keep_end)
    levels = t if keep_end else np.append(t, request.final_level(t))
    return _finish(request, levels, np.trunc(t[:count] * big_n), "flow")


def _flow_custom_grid(request: _Request, n: int | None, sigmas: Any, timesteps: Any, mu: float | None) -> DiffusersGrid:
    """``FlowMatchEulerDiscreteScheduler``'s ``set_timesteps(sigmas=…, timesteps=…)`` on a flow model.

    n flow times without the final level (``sigmas``, or ``timesteps``/N), in (0, 1] and strictly decreasing, are
    shifted as the scheduler's own grid (``flow_shift``, or ``mu`` with ``use_dynamic_shifting``; then
    ``shift_terminal``) and the final level is appended: n levels give n steps. The network receives the given
    ``timesteps``, else N·t — FlowMatchEuler's float timesteps for DPM-Solver, diffusers' truncated ones for UniPC.
    A first level of t = 1 (pure noise, λ = −∞) is planned at 1 − 10⁻⁶, as diffusers' UniPC plans it.
    """
    big_n = request.num_train
    if request.option is not None:
        raise ValueError(f"custom sigmas or timesteps cannot be combined with {request.option}=True")
    given_ts = None if timesteps is None else np.asarray(timesteps, dtype=np.float64).reshape(-1)
    if sigmas is not None:
        t = _check_flow_times("sigmas", np.asarray(sigmas, dtype=np.float64).reshape(-1))
        if given_ts is not None and given_ts.size != t.size:
            raise ValueError(f"sigmas ({t.size}) and timesteps ({given_ts.size}) must have the same length")
    else:
        assert given_ts is not None
        t = _check_flow_times(f"timesteps / num_train_timesteps ({big_n})", given_ts / big_n)
    if n is not None and int(n) != t.size:
        raise ValueError(
            f"num_inference_steps={n} does not match the {t.size} custom levels; pass one or the other, or equal counts"
        )
    t = _shift_flow_times(request.config, t, mu)
    if request.flavour == "dpmsolver":
        stored = np.append(t, request.final_level(t))
        ts = given_ts if given_ts is not None else stored[:-1].astype(np.float32) * np.float32(big_n)
        planned = stored.copy()
        planned[0] = min(planned[0], _BELOW_ONE)
        return _finish(request, planned, np.asarray(ts, dtype=np.float64), "flow_custom", stored=stored)
    t = _below_one(t)
    ts = given_ts if given_ts is not None else np.trunc(t * big_n)
    return _finish(request, np.append(t, request.final_level(t)), ts, "flow_custom")


#: The highest flow time a grid plans on: diffusers' UniPC moves t = 1 (λ = −∞) there.
_BELOW_ONE = 1.0 - 1e-6


def _below_one(t: np.ndarray) -> np.ndarray:
    """diffusers' UniPC: a first level of t = 1 (to 10⁻⁶) is lowered by 10⁻⁶ (λ would be −∞ there)."""
    t = np.array(t, dtype=np.float64)
    if abs(t[0] - 1.0) < 1e-6:
        t[0] -= 1e-6
    return t


def _check_flow_times(name: str, t: np.ndarray) -> np.ndarray:
    """Custom flow times: non-empty, finite, in (0, 1], strictly decreasing (the final 0 is appended)."""
    if t.size == 0:
        raise ValueError(f"custom {name} must not be empty")
    if not np.all(np.isfinite(t)) or np.any(t <= 0.0) or np.any(t > 1.0):
        bad = t[~(np.isfinite(t) & (t > 0.0) & (t <= 1.0))]
        raise ValueError(
            f"custom {name} must be flow times in (0, 1] (the final 0 is appended), got {bad[:3].tolist()} "
            f"in {t.tolist()}"
        )
    if np.any(np.diff(t) >= 0):
        raise ValueError(f"custom {name} must be strictly decreasing, got {t.tolist()}")
    return t


def _static_shift(config: Mapping[str, Any], mu: float | None) -> float:
    """DPM-Solver's shift: ``flow_shift``, or with ``use_dynamic_shifting`` e^μ (``time_shift_type="linear"``: μ)."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("flow_shift", 1.0))
    mu = _required_mu(mu)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)


def _required_mu(mu: float | None) -> float:
    if mu is None:
        raise ValueError(
            "mu must be passed to set_timesteps when use_dynamic_shifting=True (flow pipelines compute it from the "
            "image size with base_shift / max_shift)"
        )
    if not math.isfinite(float(mu)):
        raise ValueError(f"mu must be finite, got {mu!r}")
    return float(mu)


def _apply_shift(t: np.ndarray, shift: float) -> np.ndarray:
    """The flow shift t ↦ s·t / (1 + (s − 1)·t) (SD3, Esser et al. 2024, eq. 23)."""
    if not shift > 0:
        raise ValueError(f"the flow shift must be positive, got {shift!r}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def _shift_flow_times(config: Mapping[str, Any], t: np.ndarray, mu: float | None) -> np.ndarray:
    """UniPC's (and FlowMatchEuler's) shift of flow times: ``flow_shift``, or the exponential / linear dynamic shift
    e^μ resp. μ, then the stretch to ``shift_terminal``."""
    t = np.asarray(t, dtype=np.float64).copy()
    if config.get("use_dynamic_shifting"):
        mu = _required_mu(mu)
        scale = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
        t = scale / (scale + (1.0 / t - 1.0))
    else:
        t = _apply_shift(t, float(config.get("flow_shift", 1.0)))
    return _stretch_to_terminal(config, t)


def _stretch_to_terminal(config: Mapping[str, Any], t: np.ndarray) -> np.ndarray:
    """Stretch decreasing flow times so that the last one is ``shift_terminal`` (LTX-Video's rule, as diffusers')."""
    terminal = config.get("shift_terminal")
    if not terminal:
        return t
    one_minus = 1.0 - t
    if one_minus[-1] == 0.0:
        raise ValueError(
            f"shift_terminal={terminal} cannot stretch a grid whose last level is t = 1 (one step at pure noise: "
            "diffusers' levels are NaN there); use more steps"
        )
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - float(terminal)))
