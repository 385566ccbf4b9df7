"""The guidance interface: classifier-free guidance as a member, per-sample random streams for guidance draws,
the guidance spec parser."""

import pytest
import torch

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.guidance import ClassifierFree, Conditions, Guidance, StepContext
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_logsnr

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cond_model():
    return load_model("gmm-cond")


def _run(bundle, n: int = 6, batch_size: int | None = None, **kwargs) -> torch.Tensor:
    labels = torch.arange(n) % bundle.num_classes
    cond, uncond = bundle.conditions(labels, 3.0)
    return sample(
        bundle.denoiser,
        DPMSolverPlusPlus(2),
        uniform_logsnr(bundle.process, 6),
        shape=(n, *bundle.sample_shape),
        seeds=range(100, 100 + n),
        batch_size=batch_size,
        cond=cond,
        uncond=uncond,
        progress=False,
        **kwargs,
    )


def test_classifier_free_guidance_is_a_member(cond_model):
    assert torch.equal(_run(cond_model, guidance_scale=3.0), _run(cond_model, guidance=ClassifierFree(3.0)))
    varying = _run(cond_model, guidance=ClassifierFree(lambda t: 1.0 + 2.0 * (1 - t)))
    assert not torch.equal(varying, _run(cond_model, guidance_scale=3.0))
    with pytest.raises(ValueError, match="scale must be a finite number > 0, got -1.0"):
        ClassifierFree(-1.0)


class _NoisyCondition(Guidance):
    """Adds per-sample N(0, 1) noise from the guidance's own stream to x̂0 (a test probe)."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        z = ctx.noise("probe", x0.shape[1:], x0.device, x0.dtype)
        self.draws.append(z)
        return x0 + 0.01 * z


def test_guidance_draws_are_per_sample_and_batch_independent(cond_model):
    probe_whole, probe_chunked = _NoisyCondition(), _NoisyCondition()
    whole = _run(cond_model, guidance=probe_whole)
    chunked = _run(cond_model, batch_size=2, guidance=probe_chunked)
    for k in range(6):  # chunk c's draw at step k is entry 6c + k: the same numbers as the whole batch's
        assert torch.equal(probe_whole.draws[k], torch.cat([probe_chunked.draws[6 * c + k] for c in range(3)]))
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0)  # the batch changes only float rounding
    assert (whole - _run(cond_model)).abs().max() > 1e-3


def test_substreams_are_independent_of_the_solver_stream():
    a = NoiseSource(seeds=[1, 2, 3])
    b = NoiseSource(seeds=[1, 2, 3])
    a.substream("x").draw(0, 3, (4,), torch.device("cpu"), torch.float32)  # a guidance draw in between …
    main_a = a.draw(0, 3, (4,), torch.device("cpu"), torch.float32)
    main_b = b.draw(0, 3, (4,), torch.device("cpu"), torch.float32)
    assert torch.equal(main_a, main_b)  # … does not shift the solver's stream
    sub = NoiseSource(seeds=[1, 2, 3]).substream("x")
    assert sub is not a.substream("x") and a.substream("x") is a.substream("x")
    first = sub.draw(0, 3, (4,), torch.device("cpu"), torch.float32)
    assert not torch.allclose(first, main_a)
    assert not torch.equal(first, NoiseSource(seeds=[1, 2, 3]).substream("y").draw(0, 3, (4,), "cpu", torch.float32))


def test_step_context_time_is_normalised(cond_model):
    seen = []

    class Probe(Guidance):
        def condition(self, ctx: StepContext, conditions: Conditions) -> Conditions:
            seen.append(ctx.time)
            return conditions

    _run(cond_model, guidance=Probe())
    assert len(seen) == 6 and all(0.0 <= t <= 1.0 for t in seen)
    assert seen == sorted(seen, reverse=True) and seen[0] > 0.99


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "guidance spec is empty"),
        ("nope:w=1", "unknown guidance 'nope'"),
        ("0", "finite number > 0, got 0"),
        ("inf", "finite number > 0, got inf"),
        ("2+3", "gives the classifier-free scale twice"),
        ("2+", "has an empty term"),
    ],
)
def test_bad_guidance_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_guidance(spec)


def test_a_number_is_the_classifier_free_scale(cond_model):
    recipe = parse_guidance("7.5")
    assert recipe.scale == 7.5 and recipe.build(cond_model) == ()
