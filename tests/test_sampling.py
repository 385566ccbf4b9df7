"""The sampling loop: seeds, chunking, callbacks, NaN detection and bad input."""

import pytest
import torch

from diffsamplers import DDIM, Denoiser, DPMSolverPlusPlus, NonFiniteError, sample
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import from_timesteps, uniform_logsnr

PROCESS = default_process()
GMM = default_mixture()
DEN = GMM.as_denoiser(PROCESS)
SHAPE = GMM.sample_shape


@pytest.mark.parametrize(
    "solver", [DPMSolverPlusPlus(2), DPMSolverPlusPlus(2, sde=True), DDIM(eta=0.7)], ids=lambda s: s.name
)
def test_per_sample_seeds_do_not_depend_on_the_batch(solver):
    # float64 so that only the loop's own behaviour counts (float32 matmuls round differently per batch size)
    seeds = [11, 22, 33, 44, 55]
    run = lambda n, s, **kw: sample(DEN, solver, 8, (n, *SHAPE), seeds=s, dtype=torch.float64, progress=False, **kw)  # noqa: E731
    full = run(5, seeds)
    assert torch.allclose(full, run(5, seeds, batch_size=2), atol=1e-12)
    assert torch.allclose(full[2:3], run(1, [33]), atol=1e-12)
    assert torch.allclose(full[[4, 2, 0]], run(3, [55, 33, 11]), atol=1e-12)
    f32 = sample(DEN, solver, 8, (5, *SHAPE), seeds=seeds, batch_size=3, progress=False)
    assert torch.allclose(f32.double(), full, atol=1e-5)


def test_generator_reproducibility_and_default_rng():
    a = sample(DEN, DPMSolverPlusPlus(), 5, (3, *SHAPE), generator=torch.Generator().manual_seed(1), progress=False)
    b = sample(DEN, DPMSolverPlusPlus(), 5, (3, *SHAPE), generator=torch.Generator().manual_seed(1), progress=False)
    c = sample(DEN, DPMSolverPlusPlus(), 5, (3, *SHAPE), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chunks_cover_a_large_batch_and_output_device():
    out = sample(
        DEN, DDIM(), 3, (37, *SHAPE), batch_size=10, seeds=list(range(37)), output_device="cpu", progress=False
    )
    assert out.shape == (37, *SHAPE) and torch.isfinite(out).all()


def test_callback_sees_every_evaluation():
    seen = []
    sample(
        DEN,
        DPMSolverPlusPlus(3),
        uniform_logsnr(PROCESS, 6),
        (4, *SHAPE),
        seeds=[0, 1, 2, 3],
        batch_size=3,
        callback=lambda info: seen.append(
            (info.batch_start, info.step, info.num_steps, info.sigma, info.x.shape, info.x0.shape)
        ),
        progress=False,
    )
    assert [s[1] for s in seen] == list(range(6)) * 2
    assert [s[0] for s in seen] == [0] * 6 + [3] * 6
    assert seen[0][3] == pytest.approx(PROCESS.sigma_max) and seen[-1][2] == 6
    assert seen[0][4] == (3, *SHAPE) and seen[-1][5] == (1, *SHAPE)


def test_x0_prediction_in_the_callback_is_the_model_output():
    xs = []
    sample(
        DEN, DDIM(), 4, (2, *SHAPE), seeds=[0, 1], callback=lambda i: xs.append((i.x, i.x0, i.sigma)), progress=False
    )
    x, x0, sigma = xs[1]
    a, s = (float(v) for v in PROCESS.alpha_sigma(sigma))
    assert torch.allclose(x0, GMM.denoise(x, a, s), atol=1e-6)


class _NaNAt(torch.nn.Module):
    def __init__(self, bad_timestep):
        super().__init__()
        self.bad = bad_timestep

    def forward(self, x, t):
        out = 0.1 * x
        return torch.where(t.view(-1, 1, 1, 1) == self.bad, torch.full_like(out, float("nan")), out)


def test_nan_from_the_model_names_the_step():
    den = Denoiser(_NaNAt(bad_timestep=500), PROCESS, "epsilon")
    with pytest.raises(
        NonFiniteError, match=r"step 2 of 3 \(evaluation index 1, sigma=.*timestep=500\) for 3 sample"
    ) as err:
        sample(den, DDIM(), from_timesteps(PROCESS, [999, 500, 100]), (3, 1, 4, 4), progress=False)
    assert err.value.step == 1


def test_classifier_free_guidance_through_the_loop():
    class Model(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return 0.05 * x + 0.01 * class_labels.view(-1, 1, 1, 1)

    den = Denoiser(Model(), PROCESS, "epsilon")
    labels = torch.arange(6)
    out = sample(
        den,
        DPMSolverPlusPlus(),
        5,
        (6, 1, 4, 4),
        seeds=list(range(6)),
        cond={"class_labels": labels},
        uncond={"class_labels": torch.tensor([0])},
        guidance_scale=4.0,
        batch_size=4,
        progress=False,
    )
    ref = torch.cat(
        [
            sample(
                den,
                DPMSolverPlusPlus(),
                5,
                (1, 1, 4, 4),
                seeds=[i],
                cond={"class_labels": labels[i : i + 1]},
                uncond={"class_labels": torch.tensor([0])},
                guidance_scale=4.0,
                progress=False,
            )
            for i in range(6)
        ]
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_explicit_noise_source_and_x_T():
    x_T = torch.randn(2, *SHAPE)
    a = sample(DEN, DPMSolverPlusPlus(2, sde=True), 6, x_T=x_T, noise=NoiseSource(seeds=[5, 6]), progress=False)
    b = sample(DEN, DPMSolverPlusPlus(2, sde=True), 6, x_T=x_T, noise=NoiseSource(seeds=[5, 6]), progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(schedule=0, shape=(2, *SHAPE)), ValueError, "num_steps must be >= 1, got 0"),
        (dict(schedule=-4, shape=(2, *SHAPE)), ValueError, "num_steps must be >= 1, got -4"),
        (dict(schedule=1001, shape=(2, *SHAPE)), ValueError, "beyond the training schedule"),
        (dict(schedule=5, shape=None), ValueError, r"give the batch shape"),
        (dict(schedule=5, shape=(2,)), ValueError, "shape must be"),
        (dict(schedule=5, shape=(3, *SHAPE), x_T=torch.zeros(2, *SHAPE)), ValueError, "does not match x_T's shape"),
        (dict(schedule=5, shape=(3, *SHAPE), seeds=[1, 2]), ValueError, "got 2 seeds for 3 samples"),
        (dict(schedule=5, shape=(3, *SHAPE), batch_size=0), ValueError, "batch_size must be a positive integer"),
        (dict(schedule=5, shape=(3, *SHAPE), cond={"y": torch.zeros(2)}), ValueError, "cond has batch size 2 but 3"),
        (dict(schedule=5, shape=(3, *SHAPE), generator=torch.Generator(), seeds=[1, 2, 3]), ValueError, "not both"),
        (dict(schedule=5, shape=(3, *SHAPE), dtype=torch.int64), TypeError, "floating dtype"),
        (
            dict(schedule=5, shape=(3, 1, 4, 4)),
            ValueError,
            r"sample shape \(1, 4, 4\) does not match the mixture's \(1, 8, 8\)",
        ),
    ],
)
def test_bad_input(kwargs, error, message):
    schedule = kwargs.pop("schedule")
    shape = kwargs.pop("shape")
    with pytest.raises(error, match=message):
        sample(DEN, DPMSolverPlusPlus(), schedule, shape, progress=False, **kwargs)


def test_sampling_builds_no_graph_unless_asked():
    """A diffusers model from ``from_pretrained`` has trainable weights: by default the sample carries no graph
    (the README's "From Python" example was killed for memory by the graph), and ``enable_grad=True`` gives a
    differentiable sample with the same values (for guidance or ratio searches built on ``sample``)."""
    from diffsamplers.models.digits import load_digits

    model = load_digits()
    den = model.denoiser()
    x_T = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    schedule = uniform_logsnr(den.process, 3)
    labels = {"class_labels": torch.tensor([1, 2])}
    plain = sample(den, DPMSolverPlusPlus(2), schedule, x_T=x_T, cond=labels, progress=False)
    assert not plain.requires_grad and plain.grad_fn is None
    out = sample(den, DPMSolverPlusPlus(2), schedule, x_T=x_T, cond=labels, progress=False, enable_grad=True)
    assert out.requires_grad
    weight = next(p for p in model.unet.parameters() if p.requires_grad)
    (grad,) = torch.autograd.grad(out.square().mean(), [weight])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), plain)
