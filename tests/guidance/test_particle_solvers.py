"""Every particle and candidate method × every stochastic solver, on the exact class-conditional mixture
(``gmm-cond``, 1×8×8) in a few steps: FK steering (Singhal et al. 2025) with each potential, Feynman–Kac correctors
(Skreta et al. 2025) for annealing, classifier-free guidance and a product of two classes, and SVDD-PM (Li et al.
2024). Each pair gives finite float32 samples of the right shape, records its weighting or selecting steps, and repeats
bit for bit with the same seeds; with a deterministic solver each method refuses to run (``ValueError`` naming the
need for a stochastic sampler and the solver).

The statistics of each method (the targets it samples) are tested in its own module; this one checks that the methods
and the solvers' state, noise and re-indexing fit together."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from diffsamplers import DDIM, DPMSolverPlusPlus, Euler, EulerMaruyama, UniPC, sample
from diffsamplers.apps.recipes import parse_schedule
from diffsamplers.apps.registry import ModelBundle, load_model
from diffsamplers.guidance import FKSteering
from diffsamplers.guidance.fk_correctors import FeynmanKacCorrector
from diffsamplers.guidance.fk_steering import POTENTIALS
from diffsamplers.guidance.particles import ParticleGuidance
from diffsamplers.guidance.rewards import PixelMass
from diffsamplers.guidance.svdd import SVDD
from diffsamplers.step import Guidance

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, K = 4, 2
LABELS = [1, 1, 4, 4]  # two groups of K = 2 particles, one class each


def _product() -> FeynmanKacCorrector:
    experts = [{"class_labels": torch.tensor([c])} for c in (1, 4)]
    return FeynmanKacCorrector.product(experts, K)


#: Name → a fresh guidance (particles: K per group; SVDD: K candidates per sample and step).
METHODS: dict[str, Callable[[], Guidance]] = {
    **{
        f"fk-steering-{p}": functools.partial(lambda p: FKSteering(PixelMass(), K, 10.0, p, interval=1), p)
        for p in POTENTIALS
    },
    "fkc-annealing": lambda: FeynmanKacCorrector.annealing(2.0, K),
    "fkc-cfg": lambda: FeynmanKacCorrector.classifier_free(3.0, K),
    "fkc-product": _product,
    "svdd-pm": lambda: SVDD(PixelMass(-1), K, value="pm"),
}
#: Solvers that inject noise at every step but the last (Euler's churn only below σ̃ = 50: above, the churned level
#: would leave the model's range at this grid's first level, 157).
STOCHASTIC: dict[str, Callable[[], object]] = {
    "sde-dpm++1": lambda: DPMSolverPlusPlus(1, sde=True),
    "sde-dpm++2m": lambda: DPMSolverPlusPlus(2, sde=True),
    "sde-dpm++3m": lambda: DPMSolverPlusPlus(3, sde=True),
    "ddim-eta1": lambda: DDIM(eta=1.0),
    "ddim-eta0.5": lambda: DDIM(eta=0.5),
    "euler-maruyama": EulerMaruyama,
    "euler-churn": lambda: Euler(s_churn=1.0, s_tmax=50.0),
}
DETERMINISTIC: dict[str, Callable[[], object]] = {
    "ddim": DDIM,
    "dpm++2m": lambda: DPMSolverPlusPlus(2),
    "euler": Euler,
    "unipc": lambda: UniPC(2, "bh2"),
}


@functools.cache
def _bundle() -> ModelBundle:
    return load_model("gmm-cond")


def _run(guidance: Guidance, solver: object) -> torch.Tensor:
    bundle = _bundle()
    cond, uncond = bundle.conditions(torch.tensor(LABELS), 3.0)
    schedule = parse_schedule("linspace").build(bundle.process, STEPS)
    return sample(
        bundle.denoiser,
        solver,
        schedule,
        shape=(len(LABELS), *bundle.sample_shape),
        seeds=range(10, 10 + len(LABELS)),
        cond=cond,
        uncond=uncond,
        guidance_scale=1.0,
        guidance=guidance,
        progress=False,
    )


def test_the_solver_tables_are_what_they_say():
    bundle = _bundle()
    schedule = parse_schedule("linspace").build(bundle.process, STEPS)
    for name, make in {**STOCHASTIC, **DETERMINISTIC}.items():
        assert make().plan(bundle.process, schedule).stochastic == (name in STOCHASTIC), name


@pytest.mark.parametrize("solver_name", STOCHASTIC)
@pytest.mark.parametrize("method_name", METHODS)
def test_method_with_stochastic_solver(method_name, solver_name):
    guidance = METHODS[method_name]()
    x = _run(guidance, STOCHASTIC[solver_name]())
    assert x.shape == (len(LABELS), *_bundle().sample_shape) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    history = list(guidance.history)
    assert history, "no weighting or selecting step was recorded"
    if isinstance(guidance, ParticleGuidance):
        assert history[-1].index == STEPS - 1 and bool(history[-1].resampled.all())  # the final resampling
        for record in history:  # ancestors stay within their group of K
            groups = record.ancestors.view(-1, K) // K
            assert torch.equal(groups, torch.arange(len(LABELS) // K).view(-1, 1).expand_as(groups))
    else:
        assert all(r.values.shape == (len(LABELS), K) for r in history)
        assert {r.index for r in history} <= set(range(STEPS - 1))  # the last step (to σ̃ = 0) draws no noise
    again = METHODS[method_name]()
    assert torch.equal(x, _run(again, STOCHASTIC[solver_name]())), "two runs with the same seeds differ"
    assert len(again.history) == len(history)


@pytest.mark.parametrize("solver_name", DETERMINISTIC)
@pytest.mark.parametrize("method_name", METHODS)
def test_method_refuses_a_deterministic_solver(method_name, solver_name):
    solver = DETERMINISTIC[solver_name]()
    with pytest.raises(ValueError, match="needs a stochastic sampler") as err:
        _run(METHODS[method_name](), solver)
    assert solver.name in str(err.value)
