"""Samplers for the jobs: a model, a solver spec and a schedule spec turned into a function from sample indices to
images, deterministic per index.

A solver spec is parsed by :mod:`diffsamplers.apps.recipes`: one of ours on the schedule the spec names, or one
of diffusers' schedulers (``diffusers:SchedulerClass``) run by :func:`run_diffusers_scheduler`, the loop diffusers'
pipelines run. Every sample index has its own seed (:func:`diffsamplers.metrics.shards.sample_seed`), so the images
of an index never depend on the batch, the process or the sampler family: both families draw x_T from the same
per-index generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..data.digits import to_uint8
from ..metrics.shards import sample_seed
from ..rng import NoiseSource
from ..sampling import initial_noise, sample
from ..step import Guidance
from .best import best_recipe
from .recipes import SolverRecipe, parse_schedule, parse_solver
from .registry import ModelBundle

__all__ = ["Sampler", "make_sampler", "diffusers_scheduler", "particle_group_size", "run_diffusers_scheduler"]

#: indices → (uint8 images, labels or None)
Sampler = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor | None]]
Cond = Mapping[str, Any] | None


def particle_group_size(guidance: Sequence[Guidance]) -> int:
    """The rows that must stay together in a batch for ``guidance``: the least common multiple of the particles per
    group of its particle methods (FK steering, FK correctors:
    :class:`~diffsamplers.guidance.particles.ParticleGuidance`); 1 without one."""
    from ..guidance.particles import ParticleGuidance

    return math.lcm(1, *(g.num_particles for g in guidance if isinstance(g, ParticleGuidance)))


def diffusers_scheduler(recipe: SolverRecipe, bundle: ModelBundle, schedule: str | None = None) -> Any:
    """The diffusers scheduler a ``diffusers:Class[:options]`` spec names, built from the model's scheduler
    config (the spec's options override it; a diffusers spacing named by ``schedule`` sets
    ``timestep_spacing``)."""
    import diffusers

    cls = getattr(diffusers, str(recipe.scheduler_class), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {recipe.scheduler_class!r} in solver {recipe.spec!r}")
    if bundle.scheduler_config is None:
        raise ValueError(f"{recipe.spec!r} needs a model with a diffusers scheduler config; {bundle.name!r} has none")
    overrides = dict(recipe.options)
    spacing = parse_schedule(schedule).diffusers_spacing if schedule else None
    if spacing and "timestep_spacing" not in overrides:
        overrides["timestep_spacing"] = spacing
    return cls.from_config(bundle.scheduler_config, **overrides)


def run_diffusers_scheduler(
    scheduler: Any,
    network: Callable[..., Any],
    steps: int,
    x_T: torch.Tensor,
    cond: Cond = None,
    uncond: Cond = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """A diffusers scheduler's loop as its pipelines run it: x_T (unit variance) times ``init_noise_sigma``,
    ``scale_model_input``, the network (with classifier-free guidance in one batched call), ``step``. Flow-matching
    schedulers (``FlowMatchEulerDiscreteScheduler``) have neither of the first two: their pipelines (SD3, Flux)
    start from x_T itself and feed x unscaled."""
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, _t: sample)
    guided = uncond is not None and guidance_scale != 1.0
    for t in scheduler.timesteps:
        x_in = scale_input(x, t)
        if guided:
            kwargs = {k: torch.cat([uncond[k].expand_as(cond[k]), cond[k]]) for k in cond}  # type: ignore[index]
            out_u, out_c = network(torch.cat([x_in, x_in]), t, **kwargs).sample.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = network(x_in, t, **(cond or {})).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def make_sampler(
    bundle: ModelBundle,
    solver: str,
    steps: int,
    schedule: str | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    batch_size: int = 256,
    guidance: Sequence[Guidance] = (),
) -> Sampler:
    """A function from sample indices to (uint8 images, labels), deterministic per index; the labels cycle
    through ``classes`` (all classes by default) for a class-conditional model. ``schedule`` defaults to the
    model's (:attr:`ModelBundle.default_schedule`); diffusers' schedulers use their config's grid without one.
    ``guidance``: hooks of the one step (:class:`~diffsamplers.step.Guidance`), our solvers only; with a particle
    method among them the chunks are ``batch_size`` rounded down to a multiple of its particles per group (at least
    one group), so that no group is split; the caller gives whole groups of one class (:func:`particle_group_size`) —
    without ``classes``, group g (samples g·K … g·K + K − 1) takes class g mod the number of classes."""
    recipe = parse_solver(solver)
    group = particle_group_size(guidance)
    batch_size = max(group, batch_size // group * group)
    device, process, shape = bundle.device, bundle.process, bundle.sample_shape
    if recipe.is_diffusers:
        if guidance:
            raise ValueError(
                f"guidance {list(guidance)} runs in our sampling loop: {solver!r} (a diffusers scheduler) takes only "
                "the classifier-free scale"
            )
        scheduler = diffusers_scheduler(recipe, bundle, schedule)

        def run(noise: NoiseSource, n: int, cond: Cond, uncond: Cond) -> torch.Tensor:
            # diffusers' pipelines draw unit noise and scale it by the scheduler's init_noise_sigma themselves
            x = noise.draw(0, n, shape, device, torch.float32)
            return run_diffusers_scheduler(scheduler, bundle.denoiser.model, steps, x, cond, uncond, guidance_scale)

    else:
        if recipe.is_best:  # the shipped recipe carries its own schedule (and teleport, and ratios)
            best = best_recipe(bundle.name, steps)
            sched, built = best.schedule(bundle.denoiser), best.build_solver()
            stats = bundle.gaussian_statistics() if best.teleport and bundle.gaussian_statistics else None
            start_sigma = best.initial_sigma(bundle.denoiser)
        else:
            sched = parse_schedule(schedule or bundle.default_schedule).build(process, steps)
            built = recipe.build(nfe=steps, guidance_scale=guidance_scale, folder=bundle.folder)
            best, stats, start_sigma = None, None, float(sched.sigmas[0])

        def run(noise: NoiseSource, n: int, cond: Cond, uncond: Cond) -> torch.Tensor:
            x_T = initial_noise(process, start_sigma, (n, *shape), noise, device=device)
            if best is not None:
                x_T = best.start(bundle.denoiser, x_T, stats)
            return sample(
                bundle.denoiser,
                built,
                sched,
                x_T=x_T,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
                guidance=guidance,
                noise=noise,  # the step's and the guidances' draws continue each sample's own stream
                progress=False,
            )

    def sampler(indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = list(indices)
        # class-balanced by default: with particle groups, a group's K consecutive samples share one class
        labels = bundle.labels_for(indices if classes is not None else [i // group for i in indices], classes)
        chunks = []
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            part_labels = None if labels is None else labels[start : start + len(part)]
            cond, uncond = bundle.conditions(part_labels, guidance_scale)
            noise = NoiseSource(seeds=[sample_seed(seed, i) for i in part])
            chunks.append(run(noise, len(part), cond, uncond).detach().cpu())
        return to_uint8(torch.cat(chunks)), labels

    return sampler
