"""The sampling loop: seeds, chunking, callbacks, NaN detection and bad input."""

import pytest
import torch

from diffsamplers import (
    DDIM,
    DCSolver,
    Denoiser,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    NonFiniteError,
    UniPC,
    sample,
)
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.rng import NoiseSource
from diffsamplers.sampling import initial_noise
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
    """37 samples in chunks of 10 (the last one short): the same samples as one batch, gathered on the output
    device. The mixture's denoiser reduces over its components with batched matmuls whose float32 rounding
    depends on the batch size, so the comparison is to 1e-4 (observed ≤ 3e-5 on values of order 1)."""
    seeds = list(range(37))
    out = sample(DEN, DDIM(), 3, (7, *SHAPE), batch_size=3, seeds=seeds[:7], output_device="meta", progress=False)
    assert out.is_meta and out.shape == (7, *SHAPE)  # every chunk was moved to the output device
    chunked = sample(DEN, DDIM(), 3, (37, *SHAPE), batch_size=10, seeds=seeds, progress=False)
    whole = sample(DEN, DDIM(), 3, (37, *SHAPE), seeds=seeds, progress=False)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)


# -- chunked = unchunked ------------------------------------------------------------------------------------
# An elementwise network (ε = 0.1·x + per-sample offsets from its inputs) makes each sample's arithmetic the same
# whatever its chunk: runs that must agree are compared bit for bit.


class _Elementwise(torch.nn.Module):
    def forward(self, x, t, class_labels, extra=None, shared=None, scale=1.0):
        out = 0.1 * x + 0.02 * class_labels.view(-1, 1, 1, 1).float() + 1e-4 * t.view(-1, 1, 1, 1).float()
        if extra is not None:
            out = out + scale * extra["emb"].sum(1).view(-1, 1, 1, 1)
        if shared is not None:
            out = out + shared.sum(1).view(-1, 1, 1, 1)
        return out


ELEMENTWISE = Denoiser(_Elementwise(), PROCESS, "epsilon")
N = 5
LABELS = torch.tensor([0, 7, 3, 3, 9])
SMALL = (1, 8, 8)  # 64 values per sample


def _elementwise_run(solver, batch_size=None, **kw):
    kw = {"cond": {"class_labels": LABELS}, "progress": False, **kw}
    return sample(ELEMENTWISE, solver, uniform_logsnr(PROCESS, 8), batch_size=batch_size, **kw)


@pytest.mark.parametrize(
    "solver",
    [DPMSolverPlusPlus(2), DPMSolverPlusPlus(3), DPMSolverPlusPlusSinglestep(2), UniPC(3), DCSolver()],
    ids=lambda s: s.name,
)
def test_chunked_equals_unchunked_given_x_T(solver):
    x_T = torch.randn(N, *SMALL, generator=torch.Generator().manual_seed(0))
    whole = _elementwise_run(solver, x_T=x_T)
    for k in (1, 2, 3, 5, 8):  # single rows, an uneven last chunk, exactly N, more than N
        assert torch.equal(_elementwise_run(solver, k, x_T=x_T), whole), k
    # the mixture (batched matmuls, see above): float64 leaves only the reductions' order, ~1e-15
    gmm_x_T = torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    run = lambda k: sample(DEN, solver, 8, x_T=gmm_x_T, dtype=torch.float64, batch_size=k, progress=False)  # noqa: E731
    torch.testing.assert_close(run(2), run(None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", [DPMSolverPlusPlus(2, sde=True), DDIM(eta=1.0)], ids=lambda s: s.name)
def test_chunked_stochastic_run_with_per_sample_seeds(solver):
    """Per-sample seeds: x_T and every step's noise come from the sample's own stream, so chunking changes
    nothing, bit for bit; one generator for the batch draws in batch order, so there the chunks matter."""
    seeds = [101, 5, 77, 3, 12]
    whole = _elementwise_run(solver, shape=(N, *SMALL), seeds=seeds)
    for k in (1, 2, 4):
        assert torch.equal(_elementwise_run(solver, k, shape=(N, *SMALL), seeds=seeds), whole), k
    # the noise mattered: the same x_T without step noise (eta = 0 / ODE) ends elsewhere
    x_T = initial_noise(PROCESS, PROCESS.sigma_max, (N, *SMALL), NoiseSource(seeds=seeds))
    ode = DDIM() if isinstance(solver, DDIM) else DPMSolverPlusPlus(2)
    assert float((whole - _elementwise_run(ode, x_T=x_T)).abs().min()) > 0
    gen = lambda k: _elementwise_run(solver, k, shape=(N, *SMALL), generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(gen(None), gen(None)) and not torch.equal(gen(2), gen(None))


@pytest.mark.parametrize("solver", [DPMSolverPlusPlus(2), UniPC(2)], ids=lambda s: s.name)
def test_chunked_conditions_and_classifier_free_guidance(solver):
    """Per-sample conditions (flat and nested) are split with the batch; broadcast (batch-1) tensors and
    non-tensors are passed to every chunk; classifier-free guidance batches uncond and cond per chunk."""
    x_T = torch.randn(N, *SMALL, generator=torch.Generator().manual_seed(2))
    emb = torch.randn(N, 3, generator=torch.Generator().manual_seed(3))
    shared = torch.randn(1, 3, generator=torch.Generator().manual_seed(4))
    cond = {"class_labels": LABELS, "extra": {"emb": emb}, "shared": shared, "scale": 0.5}
    uncond = {"class_labels": torch.tensor([10, 10, 10, 11, 11]), "extra": {"emb": torch.zeros(1, 3)}}
    uncond |= {"shared": shared, "scale": 0.5}

    def run(k, scale=3.0):
        return _elementwise_run(solver, k, x_T=x_T, cond=cond, uncond=uncond, guidance_scale=scale)

    whole = run(None)
    for k in (1, 2, 3):
        assert torch.equal(run(k), whole), k
    # each row really saw its own inputs: sample 3 alone equals row 3
    alone = _elementwise_run(
        solver,
        x_T=x_T[3:4],
        cond={**cond, "class_labels": LABELS[3:4], "extra": {"emb": emb[3:4]}},
        uncond={**uncond, "class_labels": torch.tensor([11])},
        guidance_scale=3.0,
    )
    assert torch.equal(alone, whole[3:4])
    assert not torch.equal(whole, run(None, 1.0))  # guidance acted


def test_chunked_callback_rows():
    """The callback's ``batch_start`` places each chunk's x and x̂0: reassembled, they are the unchunked
    run's, step by step and bit for bit."""
    x_T = torch.randn(N, *SMALL, generator=torch.Generator().manual_seed(5))

    def record(k):
        seen = []
        _elementwise_run(DPMSolverPlusPlus(2), k, x_T=x_T, callback=seen.append)
        xs = torch.full((8, N, *SMALL), float("nan"))
        x0s = torch.full((8, N, *SMALL), float("nan"))
        for info in seen:
            rows = slice(info.batch_start, info.batch_start + info.x.shape[0])
            assert torch.isnan(xs[info.step, rows]).all()  # every (step, row) is reported once
            xs[info.step, rows], x0s[info.step, rows] = info.x, info.x0
        return [(i.batch_start, i.step) for i in seen], xs, x0s

    order, xs, x0s = record(None)
    assert order == [(0, k) for k in range(8)]
    for k, starts in ((2, [0, 2, 4]), (3, [0, 3]), (1, [0, 1, 2, 3, 4])):
        chunk_order, chunk_xs, chunk_x0s = record(k)
        assert chunk_order == [(s, j) for s in starts for j in range(8)]
        assert torch.equal(chunk_xs, xs) and torch.equal(chunk_x0s, x0s)


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
    torch.testing.assert_close(out.detach(), plain)
    # the gradient is the loss's: a central difference along it (no-graph runs) gives |grad| (measured: 4e-5
    # relative at ε = 3e-3; float32 rounding of the loss bounds it, 1e-3 allowed)
    direction = grad / grad.norm()

    def loss():
        return float(sample(den, DPMSolverPlusPlus(2), schedule, x_T=x_T, cond=labels, progress=False).square().mean())

    eps, before = 3e-3, weight.detach().clone()
    with torch.no_grad():
        weight.add_(eps * direction)
        up = loss()
        weight.copy_(before - eps * direction)
        down = loss()
        weight.copy_(before)
    assert (up - down) / (2 * eps) == pytest.approx(float(grad.norm()), rel=1e-3)
