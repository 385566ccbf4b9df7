"""The diffusers scheduler contract over this package's solvers.

:class:`SolverScheduler` implements what diffusers pipelines and training code use — ``set_timesteps``,
``step``, ``scale_model_input``, ``add_noise``, ``set_begin_index``, ``index_for_timestep`` and the training
tables ``betas``, ``alphas``, ``alphas_cumprod``, ``alpha_t``, ``sigma_t``, ``lambda_t`` (float32, bit for bit
diffusers', so ``diffusers.training_utils.compute_snr`` works) — once, for every solver: ``set_timesteps`` builds
diffusers' grid (:mod:`diffsamplers.schedules.diffusers_compat`) and the solver's plan; ``step`` converts the
model output with :func:`diffsamplers.prediction.to_x0` and takes the step through :func:`diffsamplers.step.step`.
No solver maths is restated here. Subclasses only declare their config (``@register_to_config``) and build their
solver; ``_flavour`` says whose grids they reproduce.

By default every number is diffusers' (``docs/parity.md``). Config keys of this package, all off by default:

* ``strictly_decreasing_sigmas``: grids without the zero-length steps diffusers' grids can have;
* ``float64_x0_conversion``: x̂0 = (x − σ ε̂)/α in float64 where α < 1/16 (:mod:`diffsamplers.prediction`;
  diffusers converts in float32, which loses ≈ |x|/α · 2⁻²⁴ at t = 999);
* ``add_noise_training_levels``: ``add_noise`` at the training levels of the given timesteps (interpolated between
  integer steps) instead of diffusers' look-up in the inference schedule, which before ``set_timesteps`` reads the
  reversed table (t ↦ σ̃ of training step N − 1 − t);
* ``exposure_bias_shift_half_width`` > 0 (with ``…_cutoff``, ``…_variance_source``, ``…_signal_variance``,
  ``…_start_step``): the exposure-bias time shift (Li et al. 2024, ICLR,
  :class:`~diffsamplers.solvers.ExposureBiasTimeShift`) around the solver; the network must then receive
  :meth:`SolverScheduler.current_model_timesteps` (:func:`~diffsamplers.adapters.attach_exposure_bias_time_shift`).

Differences that change no finite diffusers result:

* The step index is found without reading the timestep back from the GPU when the pipeline passes an element of
  ``scheduler.timesteps`` (as every diffusers pipeline does): the element is a view of that tensor, and its
  storage offset is its index. Other timesteps are looked up by value, as diffusers does (the second match if a
  timestep occurs twice; the last step, with a warning, if it does not occur). ``add_noise`` looks up on the
  device.
* Model outputs are checked for NaN/Inf with a device-side flag, read once after the last step; the error names
  the first bad step (set ``check_finite = False`` on the instance to skip the read). A step whose update is not
  defined on diffusers' grid (after a zero-length step; diffusers returns NaN there) raises.

Not the same numbers, and not an option: float16/bfloat16 samples are converted and the solver history is kept in
float32, where diffusers converts the model output in the model's dtype (the parity claim is for float32).
"""

from __future__ import annotations

import json
import logging
import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import compute_dtype
from ..noise import DiscreteVP, NoiseProcess, RectifiedFlow, noise_process_from_config
from ..prediction import check_prediction_type, to_x0
from ..schedules.diffusers_compat import DiffusersGrid, Flavour, check_flow_config, diffusers_grid, training_tables
from ..solvers.base import LinearStep, Solver, SolverPlan, SolverState
from ..solvers.exposure_bias_time_shift import ExposureBiasTimeShift
from ..step import FiniteCheck, SamplingRun, step
from .source_config import read_source_config

__all__ = ["SolverScheduler", "check_json_config"]

logger = logging.getLogger(__name__)


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


def _alpha_sigma(sigmas: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) from diffusers' stored levels, in their dtype, as diffusers computes them (``_sigma_to_alpha_sigma_t``):
    flow time t ↦ (1 − t, t); σ̃ ↦ (1/√(σ̃² + 1), σ̃ α)."""
    if flow:
        return 1 - sigmas, sigmas
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    return alpha, sigmas * alpha


def _finite_step(c: LinearStep) -> bool:
    """Whether every coefficient of a planned update (its corrector included) is finite."""
    values = [c.x, c.anchor, c.noise, *c.history, *c.compensation]
    if c.corrector is not None:
        values += [c.corrector.x, c.corrector.anchor, *c.corrector.history]
    return all(math.isfinite(v) for v in values)


class SolverScheduler(SchedulerMixin):
    """Base class of the diffusers drop-ins; a subclass adds ``ConfigMixin`` and ``@register_to_config``."""

    order = 1
    check_finite: bool = True
    _flavour: ClassVar[Flavour] = "dpmsolver"

    # -- set up ---------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' ``from_config`` (also behind ``from_pretrained``), reading a ``FlowMatchEulerDiscreteScheduler``
        config as the flow scheduler it means (:mod:`diffsamplers.adapters.source_config`); keyword arguments
        override the translated keys."""
        if isinstance(config, Mapping):
            config, kwargs = read_source_config(config, kwargs, cls.__name__)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _setup(self) -> None:
        cfg = self.config
        check_json_config(cfg, type(self).__name__)
        check_flow_config(cfg, self._flavour)
        self.prediction_type = check_prediction_type(cfg.prediction_type)
        self.process: NoiseProcess = noise_process_from_config(cfg)
        tables = training_tables(cfg)
        self.betas, self.alphas, self.alphas_cumprod = tables.betas, tables.alphas, tables.alphas_cumprod
        self.alpha_t, self.sigma_t, self.lambda_t = tables.alpha_t, tables.sigma_t, tables.lambda_t
        self.solver: Solver = self._with_time_shift(self._make_solver())
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.plan: SolverPlan | None = None
        self.state: SolverState = self.solver.init_state()
        n = int(cfg.num_train_timesteps)
        self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64)
        self.sigmas = tables.sigmas  # diffusers: the training levels until set_timesteps (on the CPU)
        self._timesteps_host = self.timesteps.numpy().astype(np.float64)
        self._x0_points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._undefined: dict[int, str] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._finite: FiniteCheck | None = None
        self._tables: dict[torch.device, _MarginalTable] = {}

    @abstractmethod
    def _make_solver(self) -> Solver:
        """The solver this scheduler runs, built from ``self.config`` (without the time shift)."""

    def _with_time_shift(self, solver: Solver) -> Solver:
        """``solver`` inside :class:`ExposureBiasTimeShift` when ``exposure_bias_shift_half_width`` > 0."""
        cfg = self.config
        if not cfg.get("exposure_bias_shift_half_width", 0):
            return solver
        return ExposureBiasTimeShift(
            solver,
            half_width=cfg.exposure_bias_shift_half_width,
            cutoff=cfg.exposure_bias_shift_cutoff,
            variance_source=cfg.exposure_bias_shift_variance_source,
            signal_variance=cfg.exposure_bias_shift_signal_variance,
            start_step=cfg.exposure_bias_shift_start_step,
        )

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
        """Position of ``timestep`` in the schedule, as diffusers finds it: the second match if it occurs twice, the
        last step if it does not occur (with a warning). An element of ``scheduler.timesteps`` is found from its
        storage offset, without reading it back from the device."""
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
            last = len(self.timesteps) - 1
            logger.warning("timestep %g is not in the schedule; stepping from its last timestep, as diffusers", value)
            return last
        return int(matches[1] if matches.size > 1 else matches[0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def _schedule_indices(self, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
        """:meth:`index_for_timestep` of each timestep, on ``device`` (no host read)."""
        schedule = self.timesteps.to(device)
        hits = timesteps.reshape(-1, 1).to(device) == schedule.reshape(1, -1)
        seen = hits.cumsum(dim=1)
        first, second = hits.int().argmax(dim=1), (seen == 2).int().argmax(dim=1)
        index = torch.where(seen[:, -1] > 1, second, first)
        return torch.where(seen[:, -1] == 0, torch.full_like(index, len(self.timesteps) - 1), index)

    # -- schedule -------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build diffusers' grid and precompute the solver's coefficients (on the host, in float64).

        VP models: exactly one of ``num_inference_steps``, ``timesteps`` (training timesteps, decreasing) or
        ``sigmas`` (the noise levels σ̃ including the final one). Flow models (``use_flow_sigmas``):
        ``FlowMatchEulerDiscreteScheduler``'s semantics — ``sigmas`` (n flow times without the final 0, t = 1
        allowed) and/or ``timesteps`` (n model timesteps; levels timesteps/N), shifted as the scheduler's own grid,
        n steps; ``num_inference_steps`` may accompany them if it equals their length. ``mu`` is the dynamic flow
        shift, required with ``use_dynamic_shifting`` and ignored without it on flow models (as FlowMatchEuler and
        UniPC do; flow pipelines pass it whenever ``set_timesteps`` takes it); DPM-Solver stores e^μ as its
        ``flow_shift``, as diffusers does.
        """
        if mu is not None:
            mu = self._dynamic_shift(mu)
        grid = diffusers_grid(self.process, self.config, num_inference_steps, timesteps, sigmas, mu, self._flavour)
        self._set_schedule(grid, device)

    def _dynamic_shift(self, mu: float) -> float | None:
        """``mu`` as the grid uses it: refused for VP models, dropped without dynamic shifting."""
        if not isinstance(self.process, RectifiedFlow):
            raise ValueError(
                f"mu={mu!r} is the dynamic flow shift: it needs a flow config (use_flow_sigmas=True with "
                "use_dynamic_shifting=True); this scheduler has a VP model"
            )
        if not self.config.get("use_dynamic_shifting", False):
            logger.debug("mu=%s ignored: use_dynamic_shifting=False", mu)
            return None
        if self._flavour == "dpmsolver":  # diffusers' DPM-Solver keeps the shift in its config
            exponential = self.config.get("time_shift_type", "exponential") == "exponential"
            self.register_to_config(flow_shift=math.exp(mu) if exponential else float(mu))
        return float(mu)

    def _set_schedule(self, grid: DiffusersGrid, device: str | torch.device | None) -> None:
        self.plan = self.solver.plan(self.process, grid.schedule)
        ts = self.plan.timesteps
        integral = bool(np.all(ts == np.round(ts)))
        self.timesteps = torch.from_numpy(ts.astype(np.int64) if integral else ts.astype(np.float32)).to(device)
        self._timesteps_host = ts.copy()
        self.sigmas = torch.from_numpy(grid.sigmas)  # on the CPU, as diffusers
        alpha, sigma = _alpha_sigma(self.sigmas, isinstance(self.process, RectifiedFlow))
        self._x0_points = list(zip(alpha.unbind(), sigma.unbind()))
        self._undefined = self._undefined_steps(self.plan)
        self.num_inference_steps = self.plan.num_evals
        self.state = self.solver.init_state()
        self._step_index = None
        self._begin_index = None
        self._finite = None

    def _undefined_steps(self, plan: SolverPlan) -> dict[int, str]:
        """Steps whose update is not finite on this grid (after or at a zero-length step), with the reason; warned
        about here, raised at the step."""
        undefined: dict[int, str] = {}
        s = plan.sigmas
        for k, c in enumerate(plan.steps):
            if _finite_step(c):
                continue
            repeats = [j for j in range(k, max(k - c.order, -1), -1) if s[j + 1] == s[j]]
            cause = (
                f"step {repeats[0] + 1} has zero length (the level {s[repeats[0]]:.6g} repeats)"
                if repeats
                else "its coefficients are not finite"
            )
            undefined[k] = (
                f"step {k + 1} of {plan.num_evals} ({self.solver.name}, order {c.order}) is not defined on this grid: "
                f"{cause}, and diffusers' scheduler returns NaN there; set strictly_decreasing_sigmas=True for a grid "
                "without repeated levels"
            )
        if undefined:
            logger.warning(next(iter(undefined.values())))
        return undefined

    # -- stepping -------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """VP and flow models take the sample unscaled."""
        return sample

    def reindex(self, index: torch.Tensor) -> None:
        """Keep the samples ``index`` of the batch (e.g. resampled particles' ancestors; sample i continues from
        sample ``index[i]``), as many as before: the solver state of the run under way is gathered along the batch —
        the multistep history of x̂0, the anchor of UniC's correction, the per-sample shifted points of the
        exposure-bias time shift (:meth:`SolverState.index_select`) — and so is the NaN/Inf check's per-sample
        record. The caller gathers the sample (and the pipeline's conditions). Before the first step there is nothing
        to gather. An index outside the batch fails in ``torch.index_select`` (nothing is read back here).

        Used by :class:`~diffsamplers.adapters.particle_callback.ParticleResampling`; diffusers' own schedulers
        keep per-sample lists and have no such method.
        """
        if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype not in (torch.int32, torch.int64):
            got = f"shape {tuple(index.shape)}, dtype {index.dtype}" if isinstance(index, torch.Tensor) else index
            raise ValueError(f"reindex needs a 1-D integer tensor of sample indices, got {got}")
        state = self.state
        rows = [t for t in (*state.history, state.anchor) if t is not None]
        if rows and rows[0].shape[0] != index.numel():
            raise ValueError(
                f"reindex keeps the batch size {rows[0].shape[0]}: got an index of {index.numel()} samples"
            )
        self.state = state.index_select(index.to(rows[0].device) if rows else index)
        if self._finite is not None:
            self._finite.sums = self._finite.sums.index_select(1, index.to(self._finite.sums.device))

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
        point = self.solver.evaluation_point(self.plan, self.state, k)  # per-sample (α, σ) off the grid (time shift)
        if point is not None:
            _, alpha, sigma = point
        elif work == torch.float32 and not self.config.get("float64_x0_conversion"):
            alpha, sigma = self._x0_points[k]  # diffusers' float32 (α, σ) from its float32 level
        else:
            alpha, sigma = float(self.plan.alpha_t[k]), float(self.plan.sigma_t[k])
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
        if k in self._undefined:
            raise ValueError(self._undefined[k])
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
        prev = step(self._run(), k, sample, x0=x0, z=noise)
        self._step_index = k + 1
        if self._step_index == self.plan.num_evals and self._finite is not None:
            finite, self._finite = self._finite, None
            finite.raise_if_bad(self.plan)  # one host read per run, after the last step
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # -- forward process ------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α x0 + σ ε at ``timesteps`` (one per sample, or one for all), without a host read.

        As diffusers: without ``begin_index`` each timestep is looked up in ``self.timesteps`` (the second match if
        it occurs twice, the last step if it does not occur — before ``set_timesteps`` that table is 999 … 0 against
        the training levels 0 … 999); with it, the level at ``step_index`` once sampling has started (inpainting),
        else at ``begin_index`` (img2img). With ``add_noise_training_levels=True`` any timestep is instead noised at
        its own training level (interpolated between integer steps) unless sampling has an index.
        """
        if self.config.get("add_noise_training_levels"):
            alpha, sigma = self._training_alpha_sigma(original_samples, timesteps)
        else:
            alpha, sigma = self._schedule_alpha_sigma(original_samples, timesteps)
        view = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).view(view)
        sigma = sigma.to(original_samples.device, original_samples.dtype).view(view)
        return alpha * original_samples + sigma * noise

    def _schedule_alpha_sigma(
        self, original_samples: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' (α, σ) for ``add_noise``: the stored level of the looked-up (or begin / current) step."""
        device = original_samples.device
        levels = self.sigmas.to(device=device, dtype=original_samples.dtype)
        ts = torch.as_tensor(timesteps, device=device)
        if self._begin_index is None:
            index = self._schedule_indices(ts, device)
        else:
            at = self._step_index if self._step_index is not None else self._begin_index
            index = torch.full((max(ts.numel(), 1),), at, dtype=torch.int64, device=device)
        return _alpha_sigma(levels[index], isinstance(self.process, RectifiedFlow))

    def _training_alpha_sigma(
        self, original_samples: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``add_noise_training_levels``: the plan's level during sampling, else each timestep's training level."""
        index = self._step_index if self._step_index is not None else self._begin_index
        if index is not None and self.plan is not None:
            batch = original_samples.shape[0]
            alpha, sigma = float(self.plan.alpha_t[index]), float(self.plan.sigma_t[index])
            return torch.full((batch,), alpha), torch.full((batch,), sigma)
        ts = torch.as_tensor(timesteps).reshape(-1)
        return self._alpha_sigma_at(ts, original_samples.device)

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

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)
