"""diffusers' ``set_timesteps`` semantics, expressed with this package's schedule builders.

Given a multistep scheduler config (the keys of ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``)
and one of ``num_inference_steps`` / ``timesteps`` / ``sigmas``, :func:`schedule_from_scheduler_config`
returns the same noise levels and the same (integer) model timesteps diffusers would use, with two
deliberate differences, both where diffusers produces a zero-length step:

* rounding that puts two steps on one training timestep (1000 ``linspace`` steps of a 1000-step model) is
  resolved by moving the later ones down (diffusers' DPM-Solver returns NaN there);
* ``final_sigmas_type="sigma_min"`` with Karras / exponential / logSNR / beta sigmas ends the ramp at σ_min
  instead of appending σ_min a second time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..noise import DiscreteVP, NoiseProcess, RectifiedFlow
from .schedule import Schedule
from .spacing import beta, check_num_steps, diffusers_spacing, exponential, from_timesteps, karras

__all__ = ["schedule_from_scheduler_config", "diffusers_sigmas", "SIGMA_OPTIONS"]

SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _sigma_min_value(process: NoiseProcess, config: Mapping[str, Any]) -> float:
    """diffusers' ``final_sigmas_type="sigma_min"`` level: σ̃ at training step 0 of the β table."""
    if isinstance(process, DiscreteVP):
        return float(process.sigma_tilde(0.0))
    ref = DiscreteVP.from_beta_schedule(
        config.get("beta_schedule", "linear"),
        config.get("beta_start", 1e-4),
        config.get("beta_end", 0.02),
        int(config.get("num_train_timesteps", 1000)),
        config.get("trained_betas"),
    )
    return float(ref.sigma_tilde(0.0))


def _flow_to_sigma_tilde(t: np.ndarray) -> np.ndarray:
    return t / (1.0 - t)


def schedule_from_scheduler_config(
    process: NoiseProcess,
    config: Mapping[str, Any],
    num_inference_steps: int | None = None,
    timesteps: Any = None,
    sigmas: Any = None,
    flow_shift: float | None = None,
) -> Schedule:
    """The schedule a diffusers multistep scheduler with ``config`` would build (see module docstring).

    The returned schedule's ``timesteps`` are what the network receives (diffusers' integer timesteps);
    its ``sigmas`` are the σ̃ the solver uses.
    """
    given = [
        name
        for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas (got {given or 'none'})")
    final = config.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
    options = [o for o in SIGMA_OPTIONS if config.get(o)]
    if len(options) > 1:
        raise ValueError(f"only one of {SIGMA_OPTIONS} may be set, got {options}")
    flow = isinstance(process, RectifiedFlow)
    cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
    last = 0.0 if final == "zero" else _sigma_min_value(process, config)

    if sigmas is not None:
        values = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if values.size < 2:
            raise ValueError(f"custom sigmas must include the final level: at least 2 values, got {values.tolist()}")
        levels = _flow_to_sigma_tilde(values) if flow else values
        sched = Schedule(levels, metadata={"spacing": "custom_sigmas", "final": "custom"}).check_range(process)
        ts = process.timestep_from_sigma_tilde(sched.sigmas[:-1])
        return Schedule(sched.sigmas, timesteps=ts, metadata=sched.metadata)

    if timesteps is not None:
        if options:
            raise ValueError(f"custom timesteps cannot be combined with {options[0]}=True")
        ts = np.asarray(timesteps, dtype=np.float64).astype(np.int64).astype(np.float64)
        sched = from_timesteps(process, ts, final="zero")
        return Schedule(
            np.concatenate([sched.sigmas[:-1], [last]]), timesteps=ts, metadata={"spacing": "custom", "final": final}
        )

    n = check_num_steps(num_inference_steps, process)

    def rounded(levels: np.ndarray, round_: bool) -> np.ndarray:
        ts = process.timestep_from_sigma_tilde(levels)
        return np.round(ts) if round_ else np.trunc(ts)  # diffusers casts the others to int64 (truncation)

    if flow or config.get("use_flow_sigmas"):
        if not flow:
            raise ValueError("use_flow_sigmas needs a rectified-flow noise process")
        big_n = int(config.get("num_train_timesteps", 1000))
        shift = float(config.get("flow_shift", 1.0) if flow_shift is None else flow_shift)
        grid = 1.0 - np.linspace(1.0, 1.0 / big_n, n + 1)
        grid = np.flip(shift * grid / (1.0 + (shift - 1.0) * grid))[:-1]
        levels = np.concatenate([_flow_to_sigma_tilde(grid), [_flow_to_sigma_tilde(np.array(last))]])
        return Schedule(levels, timesteps=np.trunc(grid * big_n), metadata={"spacing": "flow", "final": final})

    if options:
        option = options[0]
        fin = "append_zero" if final == "zero" else "sigma_min"
        if option == "use_karras_sigmas":
            sched = karras(process, n, final=fin)
        elif option == "use_beta_sigmas":
            sched = beta(process, n, final=fin)
        else:  # exponential sigmas and uniform-logSNR ("lu") lambdas are the same geometric grid
            sched = exponential(process, n, final=fin)
        round_ = option in ("use_karras_sigmas", "use_lu_lambdas") and not cosine
        return Schedule(sched.sigmas, timesteps=rounded(sched.sigmas[:-1], round_), metadata=sched.metadata)

    if not isinstance(process, DiscreteVP):
        raise TypeError(f"timestep_spacing needs a discrete training schedule, got {process!r}")
    return diffusers_spacing(
        process,
        n,
        spacing=config.get("timestep_spacing", "linspace"),
        final=final,
        steps_offset=int(config.get("steps_offset", 0)),
        lambda_min_clipped=float(config.get("lambda_min_clipped", -math.inf)),
    )


def diffusers_sigmas(process: NoiseProcess, schedule: Schedule) -> np.ndarray:
    """The schedule as diffusers stores ``scheduler.sigmas``: σ̃ for VP models, flow time t for flows."""
    s = schedule.sigmas
    return s / (1.0 + s) if isinstance(process, RectifiedFlow) else s.copy()
