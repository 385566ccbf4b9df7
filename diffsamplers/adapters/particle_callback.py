"""FK steering's particle resampling (Singhal, Horvitz, Teehan et al., "A General Framework for Inference-time Scaling
and Steering of Diffusion Models", ICML 2025, arXiv:2501.06848) inside a diffusers pipeline, as a
``callback_on_step_end``, without changing the pipeline's code::

    pipe.scheduler = diffsamplers.DPMSolverPlusPlusScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++"
    )
    cb = ParticleResampling(reward, num_particles=4, lam=10.0, generator=0)
    images = pipe(
        prompts,
        num_images_per_prompt=4,
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=cb.tensor_inputs,  # or cb.tensor_inputs_for(pipe)
    ).images

The target is p_θ(x0)·exp(λ r(x0)) (the paper's Eq. 1), sampled by sequential Monte Carlo with the pipeline's
stochastic sampler as the proposal (the paper's Algorithm 1); the potentials and the schedule are those of
:class:`~diffsamplers.guidance.fk_steering.FKSteering` (its module docstring), the weights, resampling and records
those of :class:`~diffsamplers.guidance.particles.ParticleGroups`.

**Groups.** ``num_images_per_prompt=K`` puts each prompt's K images in consecutive rows (diffusers 0.42.1's
``encode_prompt`` repeats the embeddings with ``repeat(1, K, 1).view(B·K, …)`` and the latents are drawn for
``batch_size · K`` rows): rows g·K … g·K + K − 1 are prompt g's particles, and resample among themselves only. A
batch that is not a multiple of K is refused (``ValueError``).

**Weights.** diffusers calls the callback after each ``scheduler.step``. At a weighting step (every ``interval``-th
step at normalised time ≤ ``start``, and the last) the reward is taken on the scheduler's latest x̂0 — the newest
entry of its solver history, ``pipe.scheduler.state.history[-1]`` (in the latents' dtype, through ``decode`` when
given, e.g. a VAE decode) — and at the last step on the returned latents themselves; the log-potential (difference,
max or sum of rewards, with the final correction that makes the product of all potentials exp(λ r(x0))) multiplies
each particle's weight, and the groups resample (always, or where ESS < ``ess_threshold``·K; every group at the
last step).

**What is gathered.** With the ancestors a (row i continues from row a[i]): ``latents``; the scheduler's per-sample
state (``pipe.scheduler.reindex(a)``: the multistep x̂0 history, the anchor, the time-shifted points); and every
other tensor the pipeline passed in ``callback_kwargs`` whose first dimension is a multiple m·B of the batch B, in m
blocks of B rows — under classifier-free guidance diffusers concatenates ``prompt_embeds = [negative; positive]``
(2B rows) before the denoising loop, and both halves take the same ancestors (rows a and B + a). Tensors of another
size are returned unchanged. The pipeline must pass what its loop uses per sample: ``cb.tensor_inputs`` names the
latents and the prompt embeddings (enough for Stable Diffusion), :meth:`ParticleResampling.tensor_inputs_for` every
tensor a pipeline exposes (``pipe._callback_tensor_inputs``, e.g. SDXL's ``add_text_embeds`` and ``add_time_ids``).
Exposed tensors that were not passed are named in a warning at the first step.

**Schedulers.** Only this package's schedulers (:class:`~diffsamplers.adapters.scheduler_base.SolverScheduler`:
:class:`~diffsamplers.DPMSolverPlusPlusScheduler`, :class:`~diffsamplers.DCSolverScheduler`) can gather their
state; diffusers' own keep per-sample lists (``model_outputs``) this callback cannot reach, so any other scheduler is
refused at the first step (``TypeError``). The sampler must be stochastic (``algorithm_type="sde-dpmsolver++"``):
duplicates of a deterministic one never diverge, and a plan without noise is refused (``ValueError``). Row i keeps
drawing its own SDE noise after resampling (the pipeline's generator is not gathered), so duplicates diverge again.

**Uniforms.** The resampling uniforms come from the callback's own stream, never from the pipeline's generator or
the global one: ``generator`` is a seed (int) or a ``torch.Generator`` whose ``initial_seed()`` (and device) is used;
group g's uniforms are the normal CDF of N(0, 1) draws of the stream
(:func:`~diffsamplers.guidance.particles.group_uniforms`), restarted from the seed at every pipeline call, so two
calls with the same pipeline generator give the same images. ``None`` takes a fresh nondeterministic seed per call
(:attr:`ParticleResampling.seed`). With λ = 0 and systematic resampling every ancestor is the identity and the images
are bit for bit the pipeline's without the callback.

**Cost and host reads.** The reward runs under ``torch.no_grad`` once per weighting step on the whole batch; the
log-weights are float64 on the device. The reward's NaN/Inf check and the resampler's own checks read the device
once per weighting step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..guidance.fk_steering import FKSteering, log_potential
from ..guidance.particles import ParticleGroups, ResamplingRecord, group_uniforms
from ..guidance.rewards import checked_score
from ..rng import NoiseSource
from ..step import SamplingRun, StepContext
from .scheduler_base import SolverScheduler

__all__ = ["ParticleResampling"]

logger = logging.getLogger(__name__)


class ParticleResampling:
    """FK steering (Singhal et al. 2025) as a diffusers ``callback_on_step_end`` (see the module docstring).

    Args:
        reward: per-sample reward of a batch ``(B, …) → (B,)``: of x̂0 latents, or of ``decode(x̂0)`` when ``decode``
            is given; any callable (evaluated under ``torch.no_grad``).
        num_particles: K, the images per prompt (``num_images_per_prompt``) that resample among themselves.
        lam: λ ≥ 0, the inverse temperature of the tilt (λ = 0: the pipeline's own distribution).
        potential: ``"difference"``, ``"max"`` or ``"sum"``
            (:class:`~diffsamplers.guidance.fk_steering.FKSteering`).
        interval: weight at every ``interval``-th scheduler step (and at the last).
        start: weight only at steps with normalised time ≤ ``start`` (1: from the first; the paper starts late).
        ess_threshold: ``None`` resamples at every weighting step; a value in (0, 1] only where ESS < value·K.
        scheme: the resampling scheme (:data:`~diffsamplers.guidance.resampling.SCHEMES`).
        decode: maps latents to what the reward takes (e.g. ``lambda z: pipe.vae.decode(z /
            pipe.vae.config.scaling_factor).sample``); ``None``: the reward takes latents.
        generator: the seed of the resampling uniforms — an int or a ``torch.Generator`` (its ``initial_seed()`` and
            device; the object itself is not advanced); ``None``: a fresh nondeterministic seed per pipeline call.

    After a pipeline call, :attr:`history` lists one :class:`~diffsamplers.guidance.particles.ResamplingRecord` per
    weighting step (ancestors as rows of the batch), :attr:`log_weights` the final log-weights ``(prompts, K)``
    (0 after the final resampling) and :attr:`rewards` the final reward of every returned image.
    """

    #: The key of the resampling uniforms' stream.
    stream = "particle-resampling"

    def __init__(
        self,
        reward: Callable[[torch.Tensor], torch.Tensor],
        num_particles: int,
        lam: float = 10.0,
        potential: str = "difference",
        *,
        interval: int = 1,
        start: float = 1.0,
        ess_threshold: float | None = None,
        scheme: str = "systematic",
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | int | None = None,
    ):
        if decode is not None and not callable(decode):
            raise TypeError(f"decode must be callable or None, got {type(decode).__name__}")
        # FK steering's own settings: it checks the reward, λ, the potential and the particle options, and owns the
        # weighting schedule
        self._schedule = FKSteering(
            reward,
            num_particles,
            lam,
            potential,
            interval=interval,
            start=start,
            ess_threshold=ess_threshold,
            scheme=scheme,
        )
        if isinstance(generator, torch.Generator):
            self._seed: int | None = int(generator.initial_seed())
            self._generator_device = generator.device
        elif generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
            self._seed = None if generator is None else int(generator)
            self._generator_device = torch.device("cpu")
        else:
            raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
        self.reward = reward
        self.decode = decode
        self.lam = self._schedule.lam
        self.potential = self._schedule.potential
        self.num_particles = self._schedule.num_particles
        self.interval = self._schedule.interval
        self.start = self._schedule.start
        self.ess_threshold = self._schedule.ess_threshold
        self.scheme = self._schedule.scheme
        #: The seed of the last pipeline call's uniforms (``None`` before the first).
        self.seed: int | None = None
        self._groups: ParticleGroups | None = None
        self._noise: NoiseSource | None = None

    # -- what the pipeline passes ---------------------------------------------------------------
    @property
    def tensor_inputs(self) -> list[str]:
        """``callback_on_step_end_tensor_inputs`` for a Stable Diffusion-style pipeline: the latents and the prompt
        embeddings (under classifier-free guidance the concatenated ``[negative; positive]`` batch)."""
        return ["latents", "prompt_embeds"]

    @staticmethod
    def tensor_inputs_for(pipe: Any) -> list[str]:
        """Every tensor ``pipe`` lets a callback change (``pipe._callback_tensor_inputs``, ``latents`` first): the
        safe ``callback_on_step_end_tensor_inputs`` for a pipeline whose loop uses more per-sample tensors than the
        prompt embeddings (SDXL's ``add_text_embeds``, ``add_time_ids``; inpainting masks …)."""
        names = list(getattr(pipe, "_callback_tensor_inputs", None) or [])
        if "latents" not in names:
            raise ValueError(
                f"{type(pipe).__name__} does not pass 'latents' to callback_on_step_end (its _callback_tensor_inputs "
                f"are {names}): particles cannot be resampled in it"
            )
        return ["latents"] + [n for n in names if n != "latents"]

    # -- results --------------------------------------------------------------------------------
    @property
    def history(self) -> list[ResamplingRecord]:
        """Every weighting step of the last pipeline call (ancestors as rows of the batch)."""
        return [] if self._groups is None else list(self._groups.records)

    @property
    def log_weights(self) -> torch.Tensor | None:
        """The particles' final log-weights ``(prompts, K)`` (float64); ``None`` before a pipeline call."""
        return None if self._groups is None else self._groups.log_weights

    @property
    def rewards(self) -> torch.Tensor | None:
        """The reward of each image at the last weighting step ``(B,)`` (float64; after the final resampling, of the
        returned images); ``None`` before."""
        return None if self._groups is None else self._groups.carried.get("rewards")

    # -- the callback ---------------------------------------------------------------------------
    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)``: at a weighting step,
        weight, resample and return the gathered ``callback_kwargs``; elsewhere return them unchanged."""
        latents = callback_kwargs.get("latents")
        if not isinstance(latents, torch.Tensor):
            raise ValueError(
                "ParticleResampling needs the latents: pass callback_on_step_end_tensor_inputs=cb.tensor_inputs "
                f"(got {sorted(callback_kwargs)})"
            )
        batch = latents.shape[0]
        if step_index == 0 or self._groups is None or len(self._groups.rows) != batch:
            self._begin(pipe, callback_kwargs, batch, latents.device)
        groups = self._groups
        assert groups is not None
        scheduler = pipe.scheduler
        plan = scheduler.plan
        k = scheduler.step_index - 1  # the scheduler's evaluation index of the step just taken
        run = SamplingRun(scheduler.solver, plan, scheduler.state, rows=groups.rows, noise=self._noise)
        ctx = StepContext(k, run, timestep, None, None)
        if not self._schedule.is_weighting_step(k, plan.num_evals, ctx.time):
            return callback_kwargs
        final = k == plan.num_evals - 1
        if final:
            x, where = latents, "the returned latents"
        else:
            history = scheduler.state.history
            if not history:
                raise ValueError(
                    "ParticleResampling needs the step's x̂0 in the scheduler's solver state, and there is none"
                )
            x, where = history[-1].to(latents.dtype), "x̂0"
        if self.decode is not None:
            with torch.no_grad():
                x = self.decode(x)
            where += " (decoded)"
        r = checked_score(self.reward, (x,), ctx, "the reward", where).to(latents.device)
        groups.reweight(log_potential(self.potential, self.lam, r, groups.carried, final))
        uniforms = group_uniforms(ctx, self.stream, self.num_particles, self.num_particles, latents.device)
        threshold = None if final else self.ess_threshold
        ancestors = groups.resample(k, uniforms, self.scheme, threshold, force=final)
        scheduler.reindex(ancestors)
        return {name: _gather(value, ancestors, batch) for name, value in callback_kwargs.items()}

    def _begin(self, pipe: Any, callback_kwargs: dict[str, Any], batch: int, device: torch.device) -> None:
        """A new pipeline call: check the scheduler and the batch, restart the uniforms and the weights."""
        scheduler = getattr(pipe, "scheduler", None)
        if not isinstance(scheduler, SolverScheduler):
            raise TypeError(
                f"ParticleResampling gathers the scheduler's per-sample state with the resampled ancestors, which "
                f"{type(scheduler).__name__} cannot do (diffusers' schedulers keep per-sample history in lists; it has "
                "no reindex method); use this package's scheduler, e.g. pipe.scheduler = "
                "diffsamplers.DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, "
                "algorithm_type='sde-dpmsolver++')"
            )
        if scheduler.plan is None or scheduler.step_index is None:
            raise ValueError("ParticleResampling runs after a scheduler step: the scheduler has taken none")
        if not scheduler.plan.stochastic:
            raise ValueError(
                f"ParticleResampling resamples particles, which needs a stochastic sampler (duplicates of a "
                f"deterministic one never diverge): {type(scheduler).__name__} runs {scheduler.solver.name}, which "
                "takes no random step; use e.g. DPMSolverPlusPlusScheduler with algorithm_type='sde-dpmsolver++'"
            )
        self._groups = ParticleGroups.start(range(batch), self.num_particles, device, "ParticleResampling")
        self.seed = self._seed if self._seed is not None else int(torch.Generator().seed())
        generator = torch.Generator(device=self._generator_device).manual_seed(self.seed)
        self._noise = NoiseSource(generator=generator, generator_device=self._generator_device)
        missing = [n for n in getattr(pipe, "_callback_tensor_inputs", None) or [] if n not in callback_kwargs]
        if missing and getattr(pipe, "do_classifier_free_guidance", True) is False:
            missing = [n for n in missing if not n.startswith("negative_")]
        # a negative tensor whose positive one carries 2B rows was concatenated into it before the loop (CFG)
        missing = [
            n
            for n in missing
            if not (
                n.startswith("negative_")
                and isinstance(callback_kwargs.get(n[len("negative_") :]), torch.Tensor)
                and callback_kwargs[n[len("negative_") :]].shape[0] == 2 * batch
            )
        ]
        if missing:
            logger.warning(
                "ParticleResampling: %s exposes %s to callbacks but they were not passed, so they are not gathered "
                "with the resampled particles; pass callback_on_step_end_tensor_inputs=cb.tensor_inputs_for(pipe) if "
                "its loop uses them per sample",
                type(pipe).__name__,
                missing,
            )


def _gather(value: Any, ancestors: torch.Tensor, batch: int) -> Any:
    """``value`` with its rows gathered by ``ancestors``: in blocks of ``batch`` rows if its first dimension is a
    multiple of the batch (the classifier-free guidance ``[negative; positive]`` concatenation), else unchanged."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] % batch != 0:
        return value
    index = ancestors.to(value.device)
    blocks = value.shape[0] // batch
    if blocks > 1:
        index = torch.cat([index + j * batch for j in range(blocks)])
    return value.index_select(0, index)
