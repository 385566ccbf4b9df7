"""A sampling schedule: the noise levels a solver visits, as data."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..noise import NoiseProcess

__all__ = ["Schedule", "DEFAULT_FINAL", "FINAL_ALIASES", "FINAL_CONVENTIONS", "check_final"]

#: How a schedule ends — one policy for every builder (the spacings of :mod:`~diffsamplers.schedules.spacing`,
#: diffusers' spacings, Align Your Steps, learned schedules). An n-step schedule is built on a grid from σ_max
#: to σ_min and then:
#:
#: * ``"zero"`` (**the default everywhere**, :data:`DEFAULT_FINAL`): the grid has n + 1 points and its last one is
#:   replaced by σ̃ = 0. All n model evaluations lie on the grid and the last step jumps from the n-th grid level
#:   to 0 — diffusers' DPM-Solver/UniPC ``final_sigmas_type="zero"`` on its linspace grid, the Align Your Steps
#:   lists of the authors' quickstart, ComfyUI and diffusers (n = 10 visits exactly the published levels);
#: * ``"sigma_min"``: the n + 1 grid points are kept and sampling stops at σ_min, the smallest grid level
#:   (official DPM-Solver; the Align Your Steps paper's endpoint);
#: * ``"append_zero"``: the grid has n points, σ_min among them, and σ̃ = 0 is appended, so the last step runs
#:   from σ_min to 0 (k-diffusion, diffusers' Karras/exponential/beta/Lu sigmas, AUTOMATIC1111's AYS). To
#:   reproduce those, pass ``final="append_zero"`` (spec suffix ``/append_zero``) explicitly.
FINAL_CONVENTIONS = ("zero", "sigma_min", "append_zero")
#: The final convention of every builder unless told otherwise.
DEFAULT_FINAL = "zero"
#: Deprecated names of Align Your Steps and learned schedules, still accepted there: their general names.
FINAL_ALIASES = {"replace": "zero", "append": "append_zero"}


def check_final(final: object, aliases: bool = False) -> str:
    """The general name of a final convention (:data:`FINAL_CONVENTIONS`); ``ValueError`` naming the options
    for anything else. ``aliases=True`` also accepts the deprecated names of :data:`FINAL_ALIASES` (with a
    ``DeprecationWarning``) and maps them to the general ones."""
    if aliases and isinstance(final, str) and final in FINAL_ALIASES:
        general = FINAL_ALIASES[final]
        warnings.warn(f"final convention {final!r} is deprecated: use {general!r}", DeprecationWarning, stacklevel=3)
        return general
    if final not in FINAL_CONVENTIONS:
        expected = f"expected one of {FINAL_CONVENTIONS}"
        if aliases:
            expected += " (deprecated: " + ", ".join(f"{k!r} for {v!r}" for k, v in FINAL_ALIASES.items()) + ")"
        raise ValueError(f"unknown final convention {final!r}: {expected}")
    return str(final)


#: Slack on the trained noise range: published lists are rounded (Align Your Steps gives 14.615 and 0.029
#: for SD's 14.6146 and 0.02917), while a real mismatch (EDM's σ = 80 on SD) is far outside.
_RANGE_RTOL = 1e-2


@dataclass(frozen=True)
class Schedule:
    """Noise levels σ̃_0 > σ̃_1 > … > σ̃_n ≥ 0 (σ̃ = σ/α, EDM units), float64 on the host.

    A solver evaluates the model at the first n levels and returns the sample at σ̃_n. ``timesteps``
    optionally overrides what the network receives at those n levels (diffusers rounds timesteps while
    its solver keeps the unrounded σ); by default the process maps σ̃ to its timestep.

    ``strictly_decreasing=False`` drops the order check: diffusers' grids can repeat a level (a zero-length step)
    or, with float32 rounding or a zero-terminal-SNR table, rise a little, and reproducing its numbers means
    keeping them (:mod:`diffsamplers.schedules.diffusers_compat`).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    strictly_decreasing: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        sigmas = np.array(self.sigmas, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "sigmas", sigmas)
        if sigmas.size < 2:
            raise ValueError(f"a schedule needs at least 2 noise levels (1 step), got {sigmas.size}: {sigmas.tolist()}")
        bad = np.flatnonzero(~np.isfinite(sigmas))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"schedule contains a non-finite noise level: sigmas[{i}] = {sigmas[i]}")
        if np.any(sigmas < 0):
            i = int(np.flatnonzero(sigmas < 0)[0])
            raise ValueError(f"noise levels must be non-negative: sigmas[{i}] = {sigmas[i]}")
        steps = np.diff(sigmas)
        if self.strictly_decreasing and np.any(steps >= 0):
            i = int(np.flatnonzero(steps >= 0)[0])
            raise ValueError(
                "a schedule must be strictly decreasing: "
                f"sigmas[{i + 1}] = {float(sigmas[i + 1])!r} does not fall below sigmas[{i}] = {float(sigmas[i])!r}"
            )
        if self.timesteps is not None:
            ts = np.array(self.timesteps, dtype=np.float64).reshape(-1)
            if ts.size != sigmas.size - 1:
                raise ValueError(
                    f"timesteps must give one value per model evaluation ({sigmas.size - 1}), got {ts.size}"
                )
            if not np.all(np.isfinite(ts)):
                raise ValueError(f"timesteps contain a non-finite value: {ts.tolist()}")
            object.__setattr__(self, "timesteps", ts)

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.size - 1)

    @property
    def final_sigma(self) -> float:
        return float(self.sigmas[-1])

    def check_range(self, process: NoiseProcess) -> Schedule:
        """Raise if a non-zero noise level lies outside the process's trained range; returns ``self``."""
        lo, hi = process.sigma_min, process.sigma_max
        for i, s in enumerate(self.sigmas):
            if s == 0.0:
                continue
            if s > hi * (1 + _RANGE_RTOL) or s < lo / (1 + _RANGE_RTOL):
                raise ValueError(
                    f"noise level sigmas[{i}] = {s:.6g} is outside the model's noise range "
                    f"[{lo:.6g}, {hi:.6g}] ({type(process).__name__})"
                )
        return self

    def model_timesteps(self, process: NoiseProcess) -> np.ndarray:
        """What the network receives at each of the n evaluation levels."""
        if self.timesteps is not None:
            return self.timesteps.copy()
        return process.timestep_from_sigma_tilde(self.sigmas[:-1])

    def __len__(self) -> int:
        return self.num_steps
