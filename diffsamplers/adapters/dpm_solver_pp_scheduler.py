"""``DPMSolverPlusPlusScheduler``: DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) as a diffusers scheduler.

A drop-in for ``DPMSolverMultistepScheduler``: the same config keys and defaults, so
``pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)`` works for any diffusers
pipeline, and by default the same numbers (float32 full-loop parity is tested; ``docs/parity.md``). The maths is
:class:`diffsamplers.solvers.DPMSolverPlusPlus`; this class only maps the config onto it. Extra keys, all
defaulting to diffusers' behaviour:

* ``sigmas=`` in ``set_timesteps`` (diffusers' DPM-Solver takes only ``timesteps=``), e.g. Align Your Steps
  noise levels;
* ``lower_order_final_threshold`` (diffusers hard-codes 15, the official code uses 10);
* ``third_order``: ``"reference"`` (default, diffusers' 3M numbers) or ``"taylor"`` (true third order, see
  :mod:`diffsamplers.solvers.dpm_solver_pp`);
* ``strictly_decreasing_sigmas``, ``float64_x0_conversion``, ``add_noise_training_levels`` and the exposure-bias
  time shift ``exposure_bias_shift_*`` (:mod:`diffsamplers.adapters.scheduler_base`).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ..solvers.dpm_solver_pp import DPMSolverPlusPlus
from ..solvers.thresholding import DynamicThresholding
from .scheduler_base import SolverScheduler

__all__ = ["DPMSolverPlusPlusScheduler"]

logger = logging.getLogger(__name__)

# Config values of compatible diffusers schedulers that name a solver variant this class does not have.
_ALGORITHM_ALIASES = {"deis": "dpmsolver++", "dpmsolver": "dpmsolver++", "sde-dpmsolver": "sde-dpmsolver++"}
_SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


class DPMSolverPlusPlusScheduler(SolverScheduler, ConfigMixin):
    """DPM-Solver++ multistep (orders 1–3) and SDE-DPM-Solver++ behind diffusers' scheduler interface.

    Config keys and defaults are those of diffusers' ``DPMSolverMultistepScheduler`` (see its docs), plus the
    keys of the module docstring. The noise-prediction algorithm types ``dpmsolver`` and ``sde-dpmsolver``
    (deprecated in diffusers) and DEIS configs map to their data-prediction counterparts, as diffusers maps DEIS;
    UniPC/DEIS ``solver_type`` values map to ``midpoint``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -math.inf,
        variance_type: Literal["learned", "learned_range"] | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        shift_terminal: float | None = None,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        lower_order_final_threshold: int = 15,
        third_order: Literal["reference", "taylor"] = "reference",
        strictly_decreasing_sigmas: bool = False,
        float64_x0_conversion: bool = False,
        add_noise_training_levels: bool = False,
        exposure_bias_shift_half_width: int = 0,
        exposure_bias_shift_cutoff: float = 300.0,
        exposure_bias_shift_variance_source: Literal["x", "epsilon"] = "x",
        exposure_bias_shift_signal_variance: float = 0.0,
        exposure_bias_shift_start_step: int = 1,
    ):
        if algorithm_type in _ALGORITHM_ALIASES:
            if algorithm_type != "deis":
                logger.warning(
                    "algorithm_type %r is run as %r (data prediction)",
                    algorithm_type,
                    _ALGORITHM_ALIASES[algorithm_type],
                )
            self.register_to_config(algorithm_type=_ALGORITHM_ALIASES[algorithm_type])
        elif algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"unknown algorithm_type {algorithm_type!r}: expected 'dpmsolver++' or 'sde-dpmsolver++'")
        if solver_type in _SOLVER_TYPE_ALIASES:
            self.register_to_config(solver_type=_SOLVER_TYPE_ALIASES[solver_type])
        elif solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}: expected 'midpoint' or 'heun'")
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r}: expected 'linspace', 'leading' or 'trailing'"
            )
        if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
            # as diffusers; use_lu_lambdas may be combined (Karras sigmas then win, as in diffusers)
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self._setup()

    def _make_solver(self) -> DPMSolverPlusPlus:
        cfg = self.config
        thresholding = (
            DynamicThresholding(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        )
        return DPMSolverPlusPlus(
            order=cfg.solver_order,
            solver_type=cfg.solver_type,
            sde=cfg.algorithm_type == "sde-dpmsolver++",
            lower_order_final=cfg.lower_order_final,
            lower_order_final_threshold=cfg.lower_order_final_threshold,
            euler_at_final=cfg.euler_at_final,
            thresholding=thresholding,
            third_order=cfg.third_order,
        )

    def _draws_noise(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"
