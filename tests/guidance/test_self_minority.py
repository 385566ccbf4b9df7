"""The self-guided minority sampler (Um & Ye, ECCV 2024): the sign of its effect on the reconstruction loss, the
x̂0-form update against the paper's DDPM mean shift, w = 0, the schedule, chunked gradients, the solvers, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from diffsamplers import DDIM, DPMSolverPlusPlus, UniPC, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.denoiser import Denoiser
from diffsamplers.diagnostics import HostReadCounter
from diffsamplers.guidance import SelfGuidedMinority
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.solvers.exposure_bias_time_shift import ExposureBiasTimeShift
from diffsamplers.step import SamplingRun, StepContext, normalised_time, predict, step

pytestmark = pytest.mark.usefixtures("single_thread")

N = 6


@pytest.fixture(scope="module")
def gmm():
    return load_model("gmm")


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


class _Spy(SelfGuidedMinority):
    """Records ĝ at every guided evaluation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads: dict[int, list[torch.Tensor]] = {}

    def gradient(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        g = super().gradient(ctx, x, x0)
        self.grads.setdefault(ctx.index, []).append(g)
        return g


def _sample(bundle, solver, guidance=None, steps: int = 10, n: int = N, scale: float = 1.0, **kwargs) -> torch.Tensor:
    cond, uncond = bundle.conditions(bundle.labels_for(range(n)), scale)
    return sample(
        bundle.denoiser,
        solver,
        uniform_logsnr(bundle.process, steps),
        shape=(n, *bundle.sample_shape),
        seeds=range(10, 10 + n),
        cond=cond,
        uncond=uncond,
        guidance_scale=scale if uncond is not None else None,
        guidance=guidance,
        progress=False,
        **kwargs,
    )


def _start(bundle, solver, plan, guidance, n: int = N) -> SamplingRun:
    cond, _ = bundle.conditions(bundle.labels_for(range(n)))
    x = torch.zeros(n, *bundle.sample_shape)
    return SamplingRun.start(
        solver, plan, x, denoiser=bundle.denoiser, cond=cond, guidance=guidance, noise=NoiseSource(seeds=range(n))
    )


def _midway(bundle, solver, steps: int, k: int) -> tuple[object, SamplingRun, torch.Tensor]:
    """An unguided run taken to evaluation ``k``: (plan, run, x_k)."""
    plan = solver.plan(bundle.process, uniform_logsnr(bundle.process, steps))
    run = _start(bundle, solver, plan, None)
    x = torch.randn(N, *bundle.sample_shape, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
    for i in range(k):
        x = step(run, i, x)
    return plan, run, x


def _reconstruction_loss(bundle, plan, index: int, x: torch.Tensor) -> torch.Tensor:
    """L(x) = ‖x̂0 − D(α_s x̂0 + σ_s ε, s)‖ at evaluation ``index``, s = 0.8, with a fixed ε (the measured score)."""
    process, cond = bundle.process, bundle.conditions(bundle.labels_for(range(N)))[0]
    x0 = bundle.denoiser.predict_x0(x, plan.timesteps[index], plan.alpha_t[index], plan.sigma_t[index], cond=cond)
    t = 0.8 * process.t_max
    alpha, sigma = (float(v) for v in process.alpha_sigma(process.sigma_tilde(t)))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    again = bundle.denoiser.predict_x0(alpha * x0 + sigma * eps, float(process.timestep(t)), alpha, sigma, cond=cond)
    return (x0 - again).flatten(1).norm(dim=1)


@pytest.mark.parametrize("name", ["gmm", "digits"])
def test_one_step_raises_the_reconstruction_loss_and_the_flipped_sign_lowers_it(name, request):
    bundle = request.getfixturevalue(name)
    solver, k = DDIM(), 8
    plan, run, x = _midway(bundle, solver, 20, k)
    losses = {}
    for sign in (1, -1, 0):
        guided = _start(bundle, solver, plan, SelfGuidedMinority(0.0 if sign == 0 else 0.2, every=1, sign=sign or 1))
        guided.state = run.state.copy()
        with torch.no_grad():
            losses[sign] = _reconstruction_loss(bundle, plan, k + 1, step(guided, k, x))
    assert bool((losses[1] > losses[0]).all()) and bool((losses[-1] < losses[0]).all()), losses
    assert float(losses[1].mean() - losses[0].mean()) > 0.05 * float(losses[0].mean())


def test_the_update_is_the_papers_ddpm_mean_shift(gmm):
    """DDIM with η = 1 is the ancestral DDPM step (Σ = β̃): x̂0 ← x̂0 + w·σ_s²/α_s·ĝ moves x_s by exactly w·Σ·ĝ, with ĝ
    the ℓ∞-normalised gradient of ‖x̂0 − sg[D(α_p x̂0 + σ_p ε, p)]‖ computed here by hand."""
    solver, k, w = DDIM(eta=1.0), 5, 0.3
    plan, run, x = _midway(gmm, solver, 12, k)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    outs = []
    for weight in (0.0, w):
        r = _start(gmm, solver, plan, SelfGuidedMinority(weight, every=1))
        r.state = run.state.copy()
        outs.append(step(r, k, x, z=z))
    # by hand: the paper's steps 1-6 (the re-noise draw is the guidance stream's first)
    process = gmm.process
    xg = x.clone().requires_grad_(True)
    x0 = gmm.denoiser.predict_x0(xg, plan.timesteps[k], plan.alpha_t[k], plan.sigma_t[k])
    a_p, s_p = (float(v) for v in process.alpha_sigma(process.sigma_tilde(0.8 * process.t_max)))
    eps = NoiseSource(seeds=range(N)).substream("self-minority").draw(0, N, x.shape[1:], x.device, x.dtype)
    with torch.no_grad():
        target = gmm.denoiser.predict_x0(a_p * x0 + s_p * eps, 0.8 * process.t_max, a_p, s_p)
    (g,) = torch.autograd.grad((x0 - target).flatten(1).norm(dim=1).sum(), xg)
    g_hat = g / g.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
    a_t, s_t, a_s, s_s = (
        float(v) for v in (plan.alpha_t[k], plan.sigma_t[k], plan.alpha_t[k + 1], plan.sigma_t[k + 1])
    )
    var = (s_t**2 - (a_t / a_s) ** 2 * s_s**2) * s_s**2 / s_t**2  # σ²_{t|s} σ_s²/σ_t², DDPM's posterior variance
    torch.testing.assert_close(outs[1] - outs[0], w * var * g_hat, rtol=1e-4, atol=1e-6)


def test_w_zero_is_the_unguided_sampler_exactly(digits):
    run = lambda guidance: _sample(digits, DPMSolverPlusPlus(2), guidance, steps=6, n=4)  # noqa: E731
    base = run(None)
    assert torch.equal(run(SelfGuidedMinority(0.0, every=1)), base)
    assert torch.equal(run(parse_guidance("self-minority:w=0").build(digits)), base)
    assert not torch.equal(run(SelfGuidedMinority(0.1, every=1)), base)


@pytest.mark.parametrize(
    "every, cutoff, expected",
    [
        (5, None, [4, 9, 14]),  # counted from the last evaluation (the official t % inter_rate == 0); the last one,
        (1, None, list(range(19))),  # a step to σ̃ = 0, has c = 0 and is skipped
        (3, None, [1, 4, 7, 10, 13, 16]),
        (5, 0.5, None),  # only the guided evaluations above t = 0.5
        (19, None, [0]),
    ],
)
def test_schedule_lists_the_guided_evaluations(gmm, every, cutoff, expected):
    solver = DDIM()
    plan = solver.plan(gmm.process, uniform_logsnr(gmm.process, 20))
    spy = _Spy(0.1, every=every, cutoff=cutoff)
    if expected is None:
        expected = [k for k in (4, 9, 14) if normalised_time(plan, k) > cutoff]
        assert 0 < len(expected) < 3
    assert spy.schedule(plan) == expected
    calls = []
    model = gmm.denoiser

    class _Counting(Denoiser):
        def __init__(self):
            super().__init__(model.model, model.process, model.prediction_type)

        def predict_x0(self, x, *args, **kwargs):
            calls.append(x.requires_grad)
            return model.predict_x0(x, *args, **kwargs)

    sample(
        _Counting(),
        solver,
        uniform_logsnr(gmm.process, 20),
        shape=(2, 1, 8, 8),
        seeds=[1, 2],
        guidance=spy,
        progress=False,
    )
    assert sorted(spy.grads) == expected  # the hook acted exactly there …
    assert len(calls) == 20 + len(expected) and sum(calls) == len(expected)  # … with a graph only there


def test_the_score_convention_guides_the_last_step_too(gmm):
    plan = DDIM().plan(gmm.process, uniform_logsnr(gmm.process, 20))
    assert SelfGuidedMinority(0.1, variance="score").schedule(plan) == [4, 9, 14, 19]
    assert SelfGuidedMinority(0.0, variance="score").schedule(plan) == []


@pytest.mark.parametrize("name, dtype, tol", [("gmm", torch.float64, 1e-10), ("digits", torch.float32, 1e-5)])
def test_chunked_gradient_equals_the_whole_batch(name, dtype, tol, request):
    """ĝ at one step from the same x, in one piece and in chunks of 4 of 6 (gmm in float64: equal to rounding)."""
    bundle = request.getfixturevalue(name)
    solver, k = DPMSolverPlusPlus(2), 3
    plan, run, x = _midway(bundle, solver, 10, k)
    grads, x0s = [], []
    for chunk in (None, 4, 1):
        spy = _Spy(0.3, every=1, chunk_size=chunk)
        r = _start(bundle, solver, plan, spy)
        r.state = run.state.copy()
        with torch.no_grad():
            x0s.append(predict(r, k, x.to(dtype)))
        grads.append(spy.grads[k][0])
    for g, x0 in zip(grads[1:], x0s[1:]):
        torch.testing.assert_close(g, grads[0], rtol=tol, atol=tol)
        torch.testing.assert_close(x0, x0s[0], rtol=tol, atol=tol)
    assert torch.allclose(grads[0].abs().flatten(1).amax(1), torch.ones(N, dtype=dtype))  # ℓ∞-normalised per sample


@pytest.mark.parametrize(
    "solver", [DPMSolverPlusPlus(2), UniPC(), DDIM(), ExposureBiasTimeShift(DPMSolverPlusPlus(2))], ids=str
)
def test_solvers_are_deterministic_and_batch_independent(digits, solver):
    run = lambda guidance, **kw: _sample(digits, solver, guidance, steps=6, n=4, scale=2.0, **kw)  # noqa: E731
    first = run(SelfGuidedMinority(0.3, every=2))
    assert bool(torch.isfinite(first).all())
    assert torch.equal(first, run(SelfGuidedMinority(0.3, every=2)))
    in_pairs = run(SelfGuidedMinority(0.3, every=2, chunk_size=1), batch_size=2)
    torch.testing.assert_close(in_pairs, first, rtol=0, atol=1e-5)
    assert float((first - run(None)).abs().max()) > 1e-2  # it acted


@pytest.mark.parametrize("batch_size, runs", [(None, 1), (2, 3)])
def test_the_zero_gradient_check_reads_the_device_once_per_run(gmm, batch_size, runs):
    def reads(guidance) -> int:
        with HostReadCounter() as counter:
            _sample(gmm, DPMSolverPlusPlus(2), guidance, steps=5, batch_size=batch_size)
        return counter.total

    assert reads(SelfGuidedMinority(0.3, every=1)) == reads(None) + runs  # 5 guided steps, one check per run


def test_the_step_keeps_no_graph(gmm):
    solver = DPMSolverPlusPlus(2)
    plan = solver.plan(gmm.process, uniform_logsnr(gmm.process, 10))
    run = _start(gmm, solver, plan, SelfGuidedMinority(0.3, every=1))
    with torch.no_grad():  # as sample() runs its steps
        x0 = predict(run, 0, torch.randn(N, 1, 8, 8))
    assert not x0.requires_grad and x0.grad_fn is None
    x_T = torch.randn(N, 1, 8, 8).requires_grad_(True)  # under enable_grad the run's graph survives the hook
    out = sample(
        gmm.denoiser, solver, 4, x_T=x_T, guidance=SelfGuidedMinority(0.3, every=1), enable_grad=True, progress=False
    )
    (g,) = torch.autograd.grad(out.sum(), x_T)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("self-minority:w=-1", "w must be a finite number ≥ 0, got -1"),
        ("self-minority:w=inf", "w must be a finite number ≥ 0, got inf"),
        ("self-minority:w=nan", "w must be a finite number ≥ 0, got nan"),
        ("self-minority:w=0.1,p=0", r"level p \(the re-noise time\) must lie in \(0, 1\], got 0"),
        ("self-minority:w=0.1,p=1.5", r"must lie in \(0, 1\], got 1.5"),
        ("self-minority:w=0.1,k=0", r"every \(k\) must be an integer ≥ 1, got 0"),
        ("self-minority:w=0.1,k=2.5", r"every \(k\) must be an integer ≥ 1, got 2.5"),
        ("self-minority:w=0.1,sign=2", "sign must be \\+1 \\(minority\\) or -1 \\(majority\\), got 2"),
        ("self-minority:w=0.1,cutoff=1", r"cutoff \(t_mid\) must be a time in \[0, 1\) or None, got 1"),
        ("self-minority:w=0.1,chunk=0", "chunk must be an integer ≥ 1, got 0"),
        ("self-minority:w=0.1,p=0.5,level=0.5", "give level/p once"),
        ("self-minority:w=0.1,distance=ssim", "unknown distance 'ssim'"),
        (
            "self-minority:w=0.1,distance=lpips",
            "distance .lpips. needs LPIPS-alex on disk .nothing is downloaded.; missing: ",
        ),
        ("self-minority:w=0.1,bogus=1", "bad option"),
        ("self-minority", "self-minority needs its scale"),
    ],
)
def test_bad_options_name_the_value(gmm, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_guidance(spec).build(gmm)


def test_registered_options_reach_the_guidance(gmm):
    (g,) = parse_guidance("self-minority:w=0.2,p=0.6,k=2,cutoff=0.2,sign=-1,chunk=8,draws=2").build(gmm)
    assert isinstance(g, SelfGuidedMinority) and g.needs_grad
    assert (g.w, g.level, g.every, g.cutoff, g.sign, g.chunk_size, g.draws) == (0.2, 0.6, 2, 0.2, -1, 8, 2)
    assert g.model_name == "gmm"


class _Wrapped(Denoiser):
    """The gmm denoiser with its output passed through ``post(x0, x)``."""

    def __init__(self, bundle, post):
        super().__init__(bundle.denoiser.model, bundle.process, bundle.denoiser.prediction_type)
        self.inner, self.post = bundle.denoiser, post

    def predict_x0(self, x, *args, **kwargs):
        return self.post(self.inner.predict_x0(x, *args, **kwargs), x)


_OFFSET = torch.nn.Parameter(torch.zeros(()))


@pytest.mark.parametrize(
    "post, why",
    [
        (lambda x0, x: x0.detach(), "has no autograd graph"),  # computed off the graph
        (lambda x0, x: x0.detach() + _OFFSET, "does not depend on x through autograd"),  # a graph, not to x
        (lambda x0, x: 0.0 * x + x0.detach(), "zero for every sample"),  # a graph to x, but a zero gradient
    ],
)
@pytest.mark.parametrize("chunk", [None, 2])
def test_a_model_without_gradients_is_named(gmm, post, why, chunk):
    with pytest.raises(ValueError, match=f"the model GMMModel gives none \\(.*{why}"):
        sample(
            _Wrapped(gmm, post),
            DDIM(),
            5,
            shape=(N, 1, 8, 8),
            guidance=SelfGuidedMinority(0.1, every=1, chunk_size=chunk),
            progress=False,
        )


def test_renoise_draws_come_from_the_samples_own_streams(gmm):
    """A sample's guided result does not depend on which other samples share its batch (already in the solver test)
    nor on the draws of another sample: rows 0-2 of a 6-sample run equal a 3-sample run's."""
    g = SelfGuidedMinority(0.5, every=1, draws=2)
    six = _sample(gmm, DDIM(eta=1.0), g, n=6)
    three = _sample(gmm, DDIM(eta=1.0), g, n=3)
    torch.testing.assert_close(six[:3], three, rtol=0, atol=1e-5)
    assert math.isfinite(float(six.sum()))
