"""Every guidance × every solver: each guidance registered in ``recipes.GUIDANCES`` (read when this module is
imported, so a guidance registered later is picked up without a change here) and classifier-free guidance, on each
of our solvers, the exposure-bias time shift and a Gaussian-teleported start.

A pair must give float32 samples of the right shape, without NaN/Inf, equal in two runs with the same seeds (the
same guidance objects reused: a guidance keeps no state from one run to the next), and the same whether the batch
runs whole or two samples at a time (per-sample seeds, per-sample guidance streams), to 1e-5. A particle method (K
particles per group of consecutive rows: fk-steering, fkc) runs 2K samples, whole and in chunks of K, so that no group
is split; its groups share a class label. A guidance that needs a stochastic sampler (:data:`NEEDS_NOISE`: resampled
particles, random candidates) must refuse each deterministic solver with a ``ValueError`` that says so, and pass the
checks on the stochastic ones (SDE-DPM-Solver++, DDIM with η = 1, Euler–Maruyama). Where float32 misses
that, the check is repeated with the solver in float64: the matmuls of different batch sizes round differently, and
a strong guidance at a few steps can amplify that rounding past 1e-5 (self-minority at w = 0.3 on every one of 5
steps, with SDE-DPM-Solver++: 1e-3 in float32, 4e-13 in float64) — float64 tells that apart from a real batch
dependence, which shows in both.

Each guidance needs a case in :data:`CASES`: the model it is tested on and its spec. A registered guidance
without one fails here, by name, until one is added.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from diffsamplers import DDIM, DCSolver, DPMSolverPlusPlus, EulerMaruyama, ExposureBiasTimeShift, UniPC, sample
from diffsamplers.apps.recipes import GUIDANCES, parse_guidance, parse_schedule
from diffsamplers.apps.registry import ModelBundle, load_model
from diffsamplers.apps.samplers import particle_group_size
from diffsamplers.guidance import ClassifierFree, Guidance
from diffsamplers.solvers.dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from diffsamplers.teleport import GaussianTeleport
from diffsamplers.teleport.statistics import GaussianStatistics

pytestmark = pytest.mark.usefixtures("single_thread")

#: Registered guidance → (model, guidance spec) it is tested with: a small model (``gmm-cond`` for class-conditional
#: guidances; ``digits`` only where a guidance needs that network) and options that make it act at these few steps.
#: Add an entry here when you register a guidance.
CASES: dict[str, tuple[str, str]] = {
    # k=3 guides evaluation 1 of 5 (4, a step to σ̃ = 0, changes nothing): at the first (σ̃ = 157) the exact mixture's
    # ∇ₓ x̂0 is float32 rounding, which the ℓ∞ normalisation and the coarse SDE step amplify to ~1e-3 between batches
    "self-minority": ("gmm-cond", "3+self-minority:w=0.3,k=3"),
    "cads": ("digits", "2+cads"),  # CADS anneals a learned class embedding: the exact mixture has none
    "minority": ("digits", "2+minority:w=2"),  # the minority classifier shipped for the digits model
    # K = 2 particles per group (chunks of 2 keep the groups whole); the pixel-mass reward scores any shape cheaply
    "fk-steering": ("gmm-cond", "3+fk-steering:k=2,lam=10,potential=max,reward=pixel-mass"),
    "fkc": ("gmm-cond", "fkc:k=2,cfg=3"),  # classifier-free guidance as a geometric average, with its weights
    "svdd": ("gmm-cond", "3+svdd:m=2,reward=pixel-mass:-1"),
}
#: Guidances that need a stochastic sampler: a deterministic one must be refused (ValueError naming the need).
NEEDS_NOISE = {"fk-steering", "fkc", "svdd"}
CLASSIFIER_FREE = "ClassifierFree-3"  # the test id of ClassifierFree(3.0), the one guidance not built from a spec
STEPS, SAMPLES = 4, 3  # chunks of 2 and 1 in the batch-size check (particle methods: 2K samples, chunks of K)
#: DC-Solver's compensation ratios for the 4 steps (the first dc_order = 2 must be 1).
DC_RATIOS = [1.0, 1.0, 1.05, 0.95]

#: Name → solver factory; ``teleport`` is DPM-Solver++ 2M from a Gaussian-teleported start (one step skipped).
SOLVERS: dict[str, Callable[[], object]] = {
    "ddim": DDIM,
    "dpm++1": lambda: DPMSolverPlusPlus(1),
    "dpm++2m": lambda: DPMSolverPlusPlus(2),
    "dpm++3m": lambda: DPMSolverPlusPlus(3),
    "sde-dpm++2m": lambda: DPMSolverPlusPlus(2, sde=True),
    "ddim-eta1": lambda: DDIM(eta=1.0),
    "euler-maruyama": EulerMaruyama,
    "dpm++2s": lambda: DPMSolverPlusPlusSinglestep(2),
    "unipc": lambda: UniPC(2, "bh2"),
    "dc-solver": lambda: DCSolver(DC_RATIOS, UniPC(2, "bh2")),
    "dpm++2m+ts": lambda: ExposureBiasTimeShift(DPMSolverPlusPlus(2)),
    "teleport": lambda: DPMSolverPlusPlus(2),
}


@functools.cache
def _bundle(model: str) -> ModelBundle:
    return load_model(model)


@functools.cache
def _teleport_statistics(model: str) -> GaussianStatistics | dict[int, GaussianStatistics]:
    """Per-class Gaussians for a class-conditional model, the data's Gaussian otherwise."""
    if model == "gmm-cond":
        from diffsamplers.models.conditional_gmm import default_conditional_mixture

        return {c: GaussianStatistics.from_gmm(m) for c, m in enumerate(default_conditional_mixture().classes)}
    bundle = _bundle(model)
    if bundle.gaussian_statistics is not None:
        return bundle.gaussian_statistics()
    from diffsamplers.teleport.statistics import class_statistics

    return class_statistics(bundle.data)


def _guidance(name: str) -> tuple[str, float | None, tuple[Guidance, ...]]:
    """The model, classifier-free scale and hooks of a case."""
    if name == CLASSIFIER_FREE:
        return "gmm-cond", None, (ClassifierFree(3.0),)
    if name not in CASES:
        pytest.fail(
            f"guidance {name!r} is registered in recipes.GUIDANCES but has no case: add {name!r}: (model, spec) to "
            f"CASES in {__name__.replace('.', '/')}.py (a small model and options that act within {STEPS} steps)"
        )
    model, spec = CASES[name]
    recipe = parse_guidance(spec)
    assert [n for n, _ in recipe.terms] == [name], f"the case of {name!r} must name it once: {spec!r}"
    return model, recipe.scale, recipe.build(_bundle(model))


def _samples(hooks: tuple[Guidance, ...]) -> tuple[int, int]:
    """(samples, chunk size of the batch-size check): 3 in chunks of 2, or 2K in chunks of K for K particles."""
    k = particle_group_size(hooks)
    return (SAMPLES, 2) if k == 1 else (2 * k, k)


@functools.cache
def _stochastic(solver_name: str) -> bool:
    """Whether the solver's plan on the test's grid injects noise (``teleport`` runs deterministic DPM-Solver++)."""
    process = _bundle("gmm-cond").process
    return SOLVERS[solver_name]().plan(process, parse_schedule("linspace").build(process, STEPS)).stochastic


def _run(solver_name: str, model: str, scale: float | None, hooks: tuple[Guidance, ...], **kwargs) -> torch.Tensor:
    bundle = _bundle(model)
    n, k = _samples(hooks)[0], particle_group_size(hooks)
    labels = bundle.labels_for(range(n), [c for c in (1, 4, 7) for _ in range(k)] if bundle.num_classes >= 10 else None)
    # a class-conditional model gets the null label too (a guidance may set a classifier-free scale)
    cond, uncond = bundle.conditions(labels, 1.0 if labels is None else 3.0)
    schedule = parse_schedule(bundle.default_schedule).build(bundle.process, STEPS)
    args = dict(
        shape=(n, *bundle.sample_shape),
        seeds=range(100, 100 + n),
        cond=cond,
        uncond=uncond,
        guidance_scale=scale,
        guidance=hooks,
        progress=False,
        **kwargs,
    )
    solver = SOLVERS[solver_name]()
    if solver_name == "teleport":
        return GaussianTeleport(_teleport_statistics(model), skip=1).sample(bundle.denoiser, solver, schedule, **args)
    return sample(bundle.denoiser, solver, schedule, **args)


GUIDANCE_NAMES = [*sorted(GUIDANCES), CLASSIFIER_FREE]


@pytest.mark.parametrize("solver_name", SOLVERS)
@pytest.mark.parametrize("guidance_name", GUIDANCE_NAMES)
def test_guidance_with_solver(guidance_name, solver_name):
    model, scale, hooks = _guidance(guidance_name)
    if guidance_name in NEEDS_NOISE and not _stochastic(solver_name):
        with pytest.raises(ValueError, match="needs a stochastic sampler"):
            _run(solver_name, model, scale, hooks)
        return
    samples, chunk = _samples(hooks)
    whole = _run(solver_name, model, scale, hooks)
    assert whole.shape == (samples, *_bundle(model).sample_shape) and whole.dtype == torch.float32
    assert torch.isfinite(whole).all()
    assert torch.equal(whole, _run(solver_name, model, scale, hooks)), "two runs with the same seeds differ"
    chunked = _run(solver_name, model, scale, hooks, batch_size=chunk)
    if not torch.allclose(whole, chunked, atol=1e-5, rtol=0):  # rounding amplified, or a batch dependence?
        whole = _run(solver_name, model, scale, hooks, dtype=torch.float64)
        chunked = _run(solver_name, model, scale, hooks, dtype=torch.float64, batch_size=chunk)
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0), (
        f"batch of 2 vs whole: max difference {(whole - chunked).abs().max():.3g}"
    )


def test_the_solver_table_has_stochastic_and_deterministic_solvers():
    """The refusal check and the particle checks both run: the table holds solvers of each kind."""
    stochastic = {name for name in SOLVERS if _stochastic(name)}
    assert stochastic == {"sde-dpm++2m", "ddim-eta1", "euler-maruyama"}, stochastic


def test_every_case_is_registered():
    """A case whose guidance is no longer registered (renamed, removed) is stale."""
    assert not set(CASES) - set(GUIDANCES), f"cases for unregistered guidances: {sorted(set(CASES) - set(GUIDANCES))}"
