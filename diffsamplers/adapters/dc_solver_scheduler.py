"""``DCSolverScheduler``: DC-Solver (Zhao et al. 2024, arXiv:2409.03755) as a diffusers scheduler.

A drop-in for ``UniPCMultistepScheduler``: the same config keys and defaults, so
``pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios="ratios.safetensors")``
works in any diffusers pipeline; without ratios (or with all ratios 1) it *is* UniPC, with the same numbers
(float32 parity is tested) and no host–device synchronisation. The maths is
:class:`diffsamplers.solvers.UniPC` and :class:`diffsamplers.solvers.DCSolver`; this class only maps the
config onto them. Extra keys, all JSON values:

* ``dc_ratios``: ``None`` (plain UniPC), a list of NFE ratios, or the path of a ``.safetensors`` file —
  searched ratios (:class:`diffsamplers.solvers.dc_ratios.DCRatios`, checked against the NFE, schedule, solver and,
  when given, ``dc_model_id`` / ``dc_guidance_scale``) or a cascade polynomial regression
  (:class:`diffsamplers.solvers.dc_cpr.CascadePolynomialRegression`, which predicts the ratios of any NFE at
  ``dc_guidance_scale``);
* ``dc_order``: K of the K + 1-point Lagrange compensation (2);
* ``base_solver``: ``"unipc"`` (default) or ``"dpmsolver++"`` — DC as a plug-in for the predictor-only
  DPM-Solver++ (multistep, order ``solver_order``, midpoint form), as in the paper's Table 6;
* ``sigmas=`` in ``set_timesteps`` for every spacing (diffusers' UniPC takes it only for flow models, where it
  follows diffusers' convention) and ``timesteps=`` (DPM-Solver's rule);
* ``strictly_decreasing_sigmas``, ``float64_x0_conversion``, ``add_noise_training_levels`` and the exposure-bias
  time shift ``exposure_bias_shift_*`` (:mod:`diffsamplers.adapters.scheduler_base`).

diffusers' ``solver_p`` (a scheduler object, which cannot be saved in a config) is not supported; use
``base_solver``. ``predict_x0=False`` (noise-prediction UniPC) is run as data prediction, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ..schedules.diffusers_compat import DiffusersGrid
from ..schedules.schedule import Schedule
from ..solvers.base import Solver
from ..solvers.dc_cpr import CascadePolynomialRegression, load_ratio_source
from ..solvers.dc_ratios import DCRatios, schedule_description, solver_settings
from ..solvers.dc_solver import DCSolver, check_ratios
from ..solvers.dpm_solver_pp import DPMSolverPlusPlus
from ..solvers.exposure_bias_time_shift import ExposureBiasTimeShift
from ..solvers.thresholding import DynamicThresholding
from ..solvers.unipc import UniPC
from .scheduler_base import SolverScheduler

__all__ = ["DCSolverScheduler"]

logger = logging.getLogger(__name__)

_SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}  # as diffusers' UniPC maps them


class DCSolverScheduler(SolverScheduler, ConfigMixin):
    """DC-Solver (UniPC + dynamic compensation) behind diffusers' scheduler interface.

    Config keys and defaults are those of diffusers' ``UniPCMultistepScheduler`` (see its docs), plus the keys of
    the module docstring.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _flavour = "unipc"

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
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] | None = None,
        solver_p: None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        dc_ratios: list[float] | str | None = None,
        dc_order: int = 2,
        dc_guidance_scale: float | None = None,
        dc_model_id: str | None = None,
        base_solver: Literal["unipc", "dpmsolver++"] = "unipc",
        strictly_decreasing_sigmas: bool = False,
        float64_x0_conversion: bool = False,
        add_noise_training_levels: bool = False,
        exposure_bias_shift_half_width: int = 0,
        exposure_bias_shift_cutoff: float = 300.0,
        exposure_bias_shift_variance_source: Literal["x", "epsilon"] = "x",
        exposure_bias_shift_signal_variance: float = 0.0,
        exposure_bias_shift_start_step: int = 1,
    ):
        if solver_p is not None:
            raise ValueError(
                "solver_p (a scheduler object) cannot be stored in a JSON config and is not supported; "
                "use base_solver='dpmsolver++' for DC on a predictor-only solver"
            )
        if not predict_x0:
            logger.warning("predict_x0=False (noise-prediction UniPC) is run in data prediction, predict_x0=True")
            self.register_to_config(predict_x0=True)
        if solver_type in _SOLVER_TYPE_ALIASES:
            self.register_to_config(solver_type=_SOLVER_TYPE_ALIASES[solver_type])
        elif solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unknown solver_type {solver_type!r}: expected 'bh1' or 'bh2'")
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r}: expected 'linspace', 'leading' or 'trailing'"
            )
        if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported with use_flow_sigmas=True (as in diffusers)")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {time_shift_type!r}: expected 'exponential' or 'linear'")
        if base_solver not in ("unipc", "dpmsolver++"):
            raise ValueError(f"unknown base_solver {base_solver!r}: expected 'unipc' or 'dpmsolver++'")
        if dc_ratios is not None and not isinstance(dc_ratios, (str, list, tuple)):
            raise TypeError(
                f"dc_ratios must be a list of numbers or a file path, got {type(dc_ratios).__name__} "
                "(tensors and objects cannot be saved in a scheduler config)"
            )
        if isinstance(dc_ratios, tuple):
            self.register_to_config(dc_ratios=[float(r) for r in dc_ratios])
        self._solvers: dict[int, Solver] = {}
        self._source: DCRatios | CascadePolynomialRegression | None = None
        self._setup()

    # -- the solver -----------------------------------------------------------------------------
    def _make_solver(self) -> DCSolver:
        """The solver without compensation (the ratios depend on the NFE, known at ``set_timesteps``)."""
        cfg = self.config
        thresholding = (
            DynamicThresholding(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        )
        if cfg.base_solver == "dpmsolver++":
            base = DPMSolverPlusPlus(
                order=cfg.solver_order, lower_order_final=cfg.lower_order_final, thresholding=thresholding
            )
        else:
            base = UniPC(
                order=cfg.solver_order,
                variant=cfg.solver_type,
                lower_order_final=cfg.lower_order_final,
                disable_corrector=cfg.disable_corrector or (),
                thresholding=thresholding,
            )
        return DCSolver(None, base, dc_order=int(cfg.dc_order))

    def _ratio_source(self) -> DCRatios | CascadePolynomialRegression | None:
        """The ratio file named by ``dc_ratios``, loaded once."""
        value = self.config.dc_ratios
        if not isinstance(value, str):
            return None
        if self._source is None:
            self._source = load_ratio_source(value)
        return self._source

    def ratios_for(self, schedule: Schedule) -> list[float] | None:
        """The ratios for ``schedule`` from the config (checked), or ``None`` for none."""
        cfg = self.config
        n = schedule.num_steps
        base = self._dc(self.solver)
        value = cfg.dc_ratios
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return list(check_ratios(value, n, int(cfg.dc_order), what="dc_ratios"))
        source = self._ratio_source()
        if isinstance(source, CascadePolynomialRegression):
            if cfg.dc_guidance_scale is None:
                raise ValueError(f"dc_ratios {value} is a CPR fit: set dc_guidance_scale to predict ratios")
            if cfg.dc_model_id is not None and cfg.dc_model_id != source.model:
                raise ValueError(f"the CPR fit {value} is for model {source.model!r}, not {cfg.dc_model_id!r}")
            if source.solver != solver_settings(base):
                raise ValueError(f"the CPR fit {value} is for solver {source.solver}, not {solver_settings(base)}")
            return source.predict(n, float(cfg.dc_guidance_scale))
        assert isinstance(source, DCRatios)
        source.check(
            nfe=n,
            model=cfg.dc_model_id,
            guidance_scale=cfg.dc_guidance_scale,
            schedule=schedule_description(schedule, self.process),
            solver=solver_settings(base),
            source=f"dc_ratios file {value}",
        )
        return list(source.ratios)

    def _set_schedule(self, grid: DiffusersGrid, device: Any) -> None:
        ratios = self.ratios_for(grid.schedule)
        key = grid.schedule.num_steps if ratios is not None else 0
        solver = self._solvers.get(key)
        if solver is None or self._dc(solver).ratios != (None if ratios is None else tuple(ratios)):
            solver = self._with_time_shift(self._make_solver().with_ratios(ratios))
            self._solvers[key] = solver
        self.solver = solver
        super()._set_schedule(grid, device)

    @staticmethod
    def _dc(solver: Solver) -> DCSolver:
        """The DC-Solver inside the (possibly time-shifted) solver."""
        inner = solver.base if isinstance(solver, ExposureBiasTimeShift) else solver
        assert isinstance(inner, DCSolver)
        return inner

    @property
    def active_ratios(self) -> Sequence[float] | None:
        """The ratios in use after ``set_timesteps`` (``None``: none)."""
        return self._dc(self.solver).ratios
