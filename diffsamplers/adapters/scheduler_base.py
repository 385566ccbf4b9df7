"""The diffusers scheduler contract over this package's solvers.

:class:`SolverScheduler` implements what diffusers pipelines call — ``set_timesteps``, ``step``,
``scale_model_input``, ``add_noise``, ``set_begin_index`` — once, for every solver: ``set_timesteps`` builds
the schedule with :mod:`diffsamplers.schedules.diffusers_compat` and the solver's plan; ``step`` converts the
model output with :func:`diffsamplers.prediction.to_x0` and calls :meth:`Solver.step`. No solver maths is
restated here. Subclasses only declare their config (``@register_to_config``) and build their solver.

Differences from diffusers' schedulers, all on purpose:

* The step index is found without reading the timestep back from the GPU when the pipeline passes an
  element of ``scheduler.timesteps`` (as every diffusers pipeline does): the element is a view of that
  tensor, and its storage offset is its index. Other timesteps are looked up by value.
* Model outputs are checked for NaN/Inf with a device-side flag, read once after the last step; the error
  names the first bad step (set ``check_finite = False`` on the instance to skip the read).
* The solver history is kept in float32 (diffusers keeps it in the model dtype).
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import compute_dtype
from ..noise import DiscreteVP, NoiseProcess, noise_process_from_config
from ..prediction import check_prediction_type, to_x0
from ..schedules.diffusers_compat import diffusers_sigmas, schedule_from_scheduler_config
from ..schedules.schedule import Schedule
from ..solvers.base import Solver, SolverPlan, SolverState
from ..step import FiniteCheck, SamplingRun, evaluation_point, step

__all__ = ["SolverScheduler", "check_json_config"]


def check_json_config(config: Any, owner: str) -> None:
    """Raise ``TypeError`` naming the first config value that JSON cannot represent."""
    for key, value in dict(config).items():
        try:
            json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{owner} config value {key}={type(value).__name__} is not JSON-serialisable ({err}); "
                "pass lists, numbers and strings only"
            ) from None


@dataclass
class _MarginalTable:
    """λ per training timestep on a device, for sync-free ``add_noise`` with arbitrary timesteps."""

    lambdas: torch.Tensor


class SolverScheduler(SchedulerMixin):
    """Base class of the diffusers drop-ins; a subclass adds ``ConfigMixin`` and ``@register_to_config``."""

    order = 1
    check_finite: bool = True

    # -- set up ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        check_json_config(cfg, type(self).__name__)
        self.prediction_type = check_prediction_type(cfg.prediction_type)
        self.process: NoiseProcess = noise_process_from_config(cfg)
        self.solver: Solver = self._make_solver()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.plan: SolverPlan | None = None
        self.state: SolverState = self.solver.init_state()
        n = int(cfg.num_train_timesteps)
        self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.zeros(0)
        self._timesteps_host = self.timesteps.numpy().astype(np.float64)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._finite: FiniteCheck | None = None
        self._tables: dict[torch.device, _MarginalTable] = {}

    @abstractmethod
    def _make_solver(self) -> Solver:
        """The solver this scheduler runs, built from ``self.config``."""

    # -- indices --------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index of the current timestep; increases by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by pipelines (img2img) with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers)."""
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if (
            isinstance(timestep, torch.Tensor)
            and timestep.ndim == 0
            and timestep.device == ts.device
            and ts.ndim == 1
            and ts.numel() > 0
            and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
        ):
            offset, stride = timestep.storage_offset() - ts.storage_offset(), ts.stride(0)
            if stride > 0 and offset % stride == 0 and 0 <= offset // stride < ts.numel():
                return int(offset // stride)
        value = float(timestep.item()) if isinstance(timestep, torch.Tensor) else float(timestep)
        host = (
            self._timesteps_host if schedule_timesteps is None else schedule_timesteps.detach().cpu().double().numpy()
        )
        matches = np.flatnonzero(host == value)
        if matches.size == 0:
            raise ValueError(f"timestep {value:g} is not in the schedule {host.tolist()[:12]}...")
        return int(matches[1] if matches.size > 1 else matches[0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    # -- schedule -------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule and precompute the solver's coefficients (on the host, in float64).

        Exactly one of ``num_inference_steps``, ``timesteps`` (training timesteps, decreasing) or ``sigmas``
        (noise levels including the final one; flow time t for flow models) must be given. ``mu`` sets the
        flow shift to e^μ (``use_dynamic_shifting``).
        """
        flow_shift = None
        if mu is not None:
            if not self.config.get("use_dynamic_shifting", False):
                raise ValueError("mu is only used with use_dynamic_shifting=True")
            flow_shift = math.exp(mu)
        schedule = schedule_from_scheduler_config(
            self.process, self.config, num_inference_steps, timesteps, sigmas, flow_shift
        )
        self._set_schedule(schedule, device)

    def _set_schedule(self, schedule: Schedule, device: str | torch.device | None) -> None:
        self.plan = self.solver.plan(self.process, schedule)
        ts = self.plan.timesteps
        integral = bool(np.all(ts == np.round(ts)))
        self.timesteps = torch.from_numpy(ts.astype(np.int64) if integral else ts.astype(np.float32)).to(device)
        self._timesteps_host = ts.copy()
        self.sigmas = torch.from_numpy(diffusers_sigmas(self.process, schedule).astype(np.float32))  # on the CPU
        self.num_inference_steps = self.plan.num_evals
        self.state = self.solver.init_state()
        self._step_index = None
        self._begin_index = None
        self._finite = None

    # -- stepping -------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """VP and flow models take the sample unscaled."""
        return sample

    def _run(self) -> SamplingRun:
        """The scheduler's solver, plan and state as a run of the one step function (the model is called outside)."""
        assert self.plan is not None
        return SamplingRun(self.solver, self.plan, self.state, finite=self._finite)

    def _model_output_to_x0(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        if (
            self.config.get("variance_type") in ("learned", "learned_range")
            and model_output.shape[1] == 2 * sample.shape[1]
        ):
            model_output = model_output[:, : sample.shape[1]]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
            )
        work = compute_dtype(sample.dtype)
        _, alpha, sigma = evaluation_point(self._run(), k, sample.device)  # per-sample off the grid (time shift)
        return to_x0(model_output.to(work), sample.to(work), alpha, sigma, self.prediction_type)

    def current_model_timesteps(self) -> torch.Tensor | None:
        """Per-sample timesteps the network must receive at the current step, if the solver moved samples off the
        grid (:class:`~diffsamplers.solvers.ExposureBiasTimeShift`); ``None`` when the pipeline's timestep is right.
        """
        if self.plan is None:
            return None
        k = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if k >= self.plan.num_evals:
            return None
        point = self.solver.evaluation_point(self.plan, self.state, k)
        return None if point is None else point[0]

    def _draws_noise(self) -> bool:
        return False

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One solver update from the current timestep to the next.

        Args:
            model_output: the network's prediction at ``sample``.
            timestep: the current timestep (an element of ``self.timesteps``).
            sample: the current sample.
            generator: random generator for stochastic (SDE) solvers.
            variance_noise: the SDE noise to inject instead of drawing it.
            return_dict: return a ``SchedulerOutput`` rather than a tuple.
        """
        if self.plan is None:
            raise ValueError("Number of inference steps is 'None': call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self.plan.num_evals:
            raise ValueError(f"all {self.plan.num_evals} steps have been taken; call set_timesteps again")
        x0 = self._model_output_to_x0(model_output, sample, k)
        if self.check_finite and self._finite is None:
            self._finite = FiniteCheck(self.plan.num_evals, x0.shape[0], x0.device, x0.dtype)
        noise = None
        if self._draws_noise():
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            else:
                noise = randn_tensor(
                    tuple(model_output.shape), generator=generator, device=model_output.device, dtype=torch.float32
                )
        run = self._run()
        prev = step(run, k, sample, x0=x0, z=noise)
        self._step_index = k + 1
        if self._step_index == self.plan.num_evals and self._finite is not None:
            finite, self._finite = self._finite, None
            finite.raise_if_bad(self.plan)  # one host read per run, after the last step
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # -- forward process ------------------------------------------------------------------------
    def _table(self, device: torch.device) -> _MarginalTable:
        table = self._tables.get(device)
        if table is None:
            assert isinstance(self.process, DiscreteVP)
            table = _MarginalTable(torch.as_tensor(self.process.lambdas, dtype=torch.float32).to(device))
            self._tables[device] = table
        return table

    def _alpha_sigma_at(self, timesteps: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) at arbitrary training timesteps, computed on ``device`` (interpolated, no host reads)."""
        t = timesteps.to(device=device, dtype=torch.float32)
        if isinstance(self.process, DiscreteVP):
            lam = self._table(device).lambdas
            lo = t.floor().clamp(0, lam.numel() - 2)
            i = lo.long()
            lam_t = torch.lerp(lam[i], lam[i + 1], t - lo)
            alpha = torch.sigmoid(2 * lam_t).sqrt()  # α² = 1/(1 + e^{−2λ})
            return alpha, torch.sigmoid(-2 * lam_t).sqrt()
        tt = t / float(self.process.timestep(1.0))
        return 1.0 - tt, tt

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α x0 + σ ε at ``timesteps`` (one per sample).

        Before the first step with ``begin_index`` set (img2img) and during sampling (inpainting) the
        schedule's own levels are used, as in diffusers; otherwise (training) any timesteps are accepted and
        mapped on the device.
        """
        index = self._step_index if self._step_index is not None else self._begin_index
        if index is not None and self.plan is not None:
            alpha = torch.full((original_samples.shape[0],), float(self.plan.alpha_t[index]))
            sigma = torch.full((original_samples.shape[0],), float(self.plan.sigma_t[index]))
        else:
            ts = torch.as_tensor(timesteps).reshape(-1)
            alpha, sigma = self._alpha_sigma_at(ts, original_samples.device)
            if alpha.numel() == 1 and original_samples.shape[0] != 1:
                alpha, sigma = alpha.expand(original_samples.shape[0]), sigma.expand(original_samples.shape[0])
        view = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).view(view)
        sigma = sigma.to(original_samples.device, original_samples.dtype).view(view)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)
