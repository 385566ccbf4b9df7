"""``MaskedDiffusionScheduler``: a diffusers-style loop over the exact Markov-chain model gives the library samplers'
tokens bit for bit (ancestral, MDLM; first-hitting, Zheng et al. 2024, arXiv:2409.02908), the model times a
time-conditioned network receives, the exact law (χ² over the 81 sequences), the config round trip, ``add_noise``'s
masking rate m(t), and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffsamplers.adapters.masked_scheduler import MaskedDiffusionScheduler, MaskedSchedulerOutput
from diffsamplers.masked.samplers import AncestralSampler, FirstHittingSampler, MaskedDiffusion
from diffsamplers.masked.schedules import masking_schedule
from diffsamplers.models.markov_chain import default_markov_chain

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = ["linear", "cosine", "poly:p=2", "loglinear:eps=0.001"]


@pytest.fixture(scope="module")
def chain():
    return default_markov_chain()


def _library(model, spec, sampler, steps, *, time_conditioned=False, dtype=torch.float64, **sample_kw):
    d = MaskedDiffusion(
        model, 3, masking_schedule(spec), context_length=4, time_conditioned=time_conditioned, dtype=dtype
    )
    return sampler.sample(d, **sample_kw).tokens


def _loop(scheduler, model, x, steps, generator, outputs=None):
    """The diffusers-style loop of the module docstring."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        logits = model(x, scheduler.model_timesteps(x, generator=generator))
        out = scheduler.step(logits, t, x, generator=generator)
        if outputs is not None:
            outputs.append((x, logits, out))
        x = out.prev_sample
    return x


@pytest.mark.parametrize("spec", SCHEDULES)
def test_ancestral_loop_equals_the_library_sampler(chain, spec):
    for steps, dtype in [(1, "float64"), (7, "float64"), (60, "float64"), (7, "float32")]:
        scheduler = MaskedDiffusionScheduler(3, masking_schedule=spec, categorical_dtype=dtype)
        x = _loop(scheduler, chain, scheduler.init_noise(512, 4), steps, torch.Generator().manual_seed(steps))
        ref = _library(
            chain,
            spec,
            AncestralSampler(steps),
            steps,
            dtype=getattr(torch, dtype),
            batch=512,
            length=4,
            generator=torch.Generator().manual_seed(steps),
        )
        assert torch.equal(x, ref), (spec, steps, dtype)
        assert (x != 3).all()


@pytest.mark.parametrize("spec", SCHEDULES)
def test_first_hitting_loop_equals_the_library_sampler(chain, spec):
    for k in (1, 2, 3, 4):
        scheduler = MaskedDiffusionScheduler(3, masking_schedule=spec, sampler="first_hitting", tokens_per_step=k)
        steps = scheduler.first_hitting_steps(4)
        assert steps == math.ceil(4 / k)
        x = _loop(scheduler, chain, scheduler.init_noise(512, 4), steps, torch.Generator().manual_seed(k))
        ref = _library(
            chain, spec, FirstHittingSampler(k), steps, batch=512, length=4, generator=torch.Generator().manual_seed(k)
        )
        assert torch.equal(x, ref), (spec, k)
        assert (x != 3).all()


def test_infilling_and_extra_first_hitting_steps_match_the_library(chain):
    """From a partially masked start (two masks per row) both loops match the library; first-hitting steps beyond
    ⌈n/k⌉ leave the finished rows untouched."""
    start = torch.tensor([[0, 3, 3, 2], [3, 1, 3, 1], [3, 3, 0, 0]]).repeat(100, 1)
    for sampler, scheduler, steps in [
        (AncestralSampler(9), MaskedDiffusionScheduler(3, masking_schedule="cosine"), 9),
        (FirstHittingSampler(), MaskedDiffusionScheduler(3, masking_schedule="cosine", sampler="first_hitting"), 2),
        (FirstHittingSampler(), MaskedDiffusionScheduler(3, masking_schedule="cosine", sampler="first_hitting"), 5),
    ]:
        x = _loop(scheduler, chain, start, steps, torch.Generator().manual_seed(3))
        ref = _library(chain, "cosine", sampler, steps, x=start, generator=torch.Generator().manual_seed(3))
        assert torch.equal(x, ref), (type(sampler).__name__, steps)
        kept = start != 3
        assert torch.equal(x[kept], start[kept])


@pytest.mark.parametrize("sampler,k,steps", [("ancestral", 1, 12), ("first_hitting", 1, 4), ("first_hitting", 2, 2)])
def test_a_time_conditioned_model_gets_the_library_times(chain, sampler, k, steps):
    """A model whose logits depend on t: the loop calls it at the very times the library does (first-hitting: the
    coming hitting times, read ahead from the generator), also with the global generator (``generator=None``)."""

    def recorder(calls):
        def model(x, t):
            calls.append(t.clone())
            return chain(x) + t.to(torch.float64)[:, None, None] * torch.tensor([1.5, 0.0, -1.5], dtype=torch.float64)

        return model

    for seeded in (True, False):
        ours, theirs = [], []
        scheduler = MaskedDiffusionScheduler(
            3, masking_schedule="cosine", sampler=sampler, tokens_per_step=k, time_conditioned=True
        )
        torch.manual_seed(21)
        g = torch.Generator().manual_seed(20) if seeded else None
        x = _loop(scheduler, recorder(ours), scheduler.init_noise(256, 4), steps, g)
        torch.manual_seed(21)
        g = torch.Generator().manual_seed(20) if seeded else None
        lib = AncestralSampler(steps) if sampler == "ancestral" else FirstHittingSampler(k)
        ref = _library(recorder(theirs), "cosine", lib, steps, time_conditioned=True, batch=256, length=4, generator=g)
        assert torch.equal(x, ref), seeded
        assert len(ours) == len(theirs) == steps
        assert all(a.dtype == b.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(ours, theirs))
        if sampler == "first_hitting":
            assert ours[0].unique().numel() > 200  # per-row random times, not a grid


def test_timesteps_row_times_and_the_x0_preview(chain):
    anc = MaskedDiffusionScheduler(3, masking_schedule="poly:p=2")
    anc.set_timesteps(5, device="cpu")
    assert anc.timesteps.dtype == torch.float32
    assert torch.equal(anc.timesteps, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2]))
    outputs = []
    _loop(anc, chain, anc.init_noise(64, 4), 5, torch.Generator().manual_seed(0), outputs)
    assert anc.row_times is not None and torch.equal(anc.row_times, torch.zeros(64, dtype=torch.float64))
    for x, logits, out in outputs:
        assert isinstance(out, MaskedSchedulerOutput) and out.prev_sample.dtype == torch.int64
        masked = x == 3
        assert torch.equal(out.pred_original_sample[~masked], x[~masked])
        assert torch.equal(out.pred_original_sample[masked], logits.argmax(-1)[masked])
        assert torch.equal(out.prev_sample[~masked], x[~masked])  # clean tokens are carried over
    # logits that disagree with the clean tokens: the preview keeps the sample's clean tokens
    anc.set_timesteps(3)
    x = torch.tensor([[0, 3, 1, 3], [3, 2, 2, 3]]).repeat(50, 1)
    logits = torch.randn(100, 4, 3, generator=torch.Generator().manual_seed(1))
    out = anc.step(logits, anc.timesteps[0], x, generator=torch.Generator().manual_seed(2))
    masked = x == 3
    assert torch.equal(out.pred_original_sample[~masked], x[~masked])
    assert torch.equal(out.pred_original_sample[masked], logits.argmax(-1)[masked])
    prev, x0 = anc.step(logits, anc.timesteps[1], out.prev_sample, return_dict=False)
    assert prev.shape == x0.shape == (100, 4)

    for k in (1, 3):
        fhs = MaskedDiffusionScheduler(
            3, masking_schedule="cosine", sampler="first_hitting", tokens_per_step=k, time_conditioned=True
        )
        fhs.set_timesteps(fhs.first_hitting_steps(4))
        assert fhs.timesteps.dtype == torch.int64 and fhs.timesteps.tolist() == list(range(len(fhs.timesteps)))[::-1]
        x, g = fhs.init_noise(300, 4), torch.Generator().manual_seed(k)
        times = [torch.ones(300, dtype=torch.float64)]
        for t in fhs.timesteps:
            ahead = fhs.model_timesteps(x, generator=g)
            out = fhs.step(chain(x), t, x, generator=g)
            assert torch.equal((out.prev_sample == 3).sum(1), ((x == 3).sum(1) - k).clamp(min=0))
            if k == 1:  # one event per step: the row moves to the time the model was called at
                assert torch.equal(fhs.row_times.to(torch.float32), ahead)
            else:
                assert (fhs.row_times <= ahead.double() + 1e-7).all()
            times.append(fhs.row_times)
            x = out.prev_sample
        series = torch.stack(times, dim=1)
        assert (series > 0).all() and (series <= 1).all() and (series.diff(dim=1) <= 0).all()


def test_the_scheduler_loop_samples_the_chain_law(chain):
    """χ² over the 81 sequences: first-hitting (k = 1) and a fine ancestral grid are exact, a 2-step grid is not."""
    n = 20_000
    for spec, sampler, steps, exact in [
        ("cosine", "first_hitting", 4, True),
        ("linear", "ancestral", 200, True),
        ("linear", "ancestral", 2, False),
    ]:
        scheduler = MaskedDiffusionScheduler(3, masking_schedule=spec, sampler=sampler)
        x = _loop(scheduler, chain, scheduler.init_noise(n, 4), steps, torch.Generator().manual_seed(30))
        counts = torch.bincount(chain.index(x), minlength=81).double()
        p = stats.chisquare(counts.numpy(), (n * chain.probabilities).numpy()).pvalue
        print(f"{sampler} {spec} {steps} steps: chi-square p = {p:.3g}")
        assert (p > 1e-3) if exact else (p < 1e-12), (sampler, steps, p)


def test_config_round_trip(tmp_path, chain):
    scheduler = MaskedDiffusionScheduler(
        3,
        masking_schedule="poly:p=2",
        sampler="first_hitting",
        tokens_per_step=2,
        categorical_dtype="float32",
        time_conditioned=True,
    )
    assert scheduler.config.mask_token_id == 3
    scheduler.save_config(tmp_path)
    loaded = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    again = MaskedDiffusionScheduler.from_config(scheduler.config)
    keys = [k for k in scheduler.config if not k.startswith("_")]
    for other in (loaded, again):
        assert {k: other.config[k] for k in keys} == {k: scheduler.config[k] for k in keys}
    samples = [
        _loop(s, chain, s.init_noise(64, 4), 2, torch.Generator().manual_seed(5)) for s in (scheduler, loaded, again)
    ]
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[0], samples[2])
    other_mask = MaskedDiffusionScheduler.from_config(MaskedDiffusionScheduler(5, mask_token_id=-1).config)
    assert other_mask.mask_token_id == -1 and (other_mask.init_noise(2, 3) == -1).all()
    switched = MaskedDiffusionScheduler.from_config(scheduler.config, sampler="ancestral")
    assert switched.config.sampler == "ancestral" and switched.config.masking_schedule == "poly:p=2"


def test_add_noise_masks_at_rate_m_t():
    rows, length = 1000, 200
    clean = torch.randint(0, 3, (rows, length), generator=torch.Generator().manual_seed(0))
    for spec in ("cosine", "loglinear:eps=0.1"):
        scheduler = MaskedDiffusionScheduler(3, masking_schedule=spec)
        schedule = masking_schedule(spec)
        for t in (0.0, 0.3, 0.7, 1.0):
            noisy = scheduler.add_noise(clean, t, generator=torch.Generator().manual_seed(1))
            assert noisy.dtype == torch.int64
            kept = noisy != 3
            assert torch.equal(noisy[kept], clean[kept])
            rate, m = float((~kept).double().mean()), schedule(t)
            assert abs(rate - m) <= 5 * math.sqrt(m * (1 - m) / clean.numel()) + 1e-12, (spec, t, rate, m)
        # one time per row
        t = torch.linspace(0, 1, rows)
        noisy = scheduler.add_noise(clean, t, generator=torch.Generator().manual_seed(2))
        rate_rows = (noisy == 3).double().mean(1)
        m_rows = schedule(t.double())
        assert float((rate_rows - m_rows).abs().max()) < 5 * math.sqrt(0.25 / length)
        assert abs(float(rate_rows.mean() - m_rows.mean())) < 5 * math.sqrt(0.25 / clean.numel())
    # masks already present stay; the same generator seed gives the same mask
    half = clean.clone()
    half[:, ::2] = 3
    a = scheduler.add_noise(half, 0.2, generator=torch.Generator().manual_seed(3))
    assert (a[:, ::2] == 3).all()
    assert torch.equal(a, scheduler.add_noise(half, 0.2, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(scheduler.scale_model_input(half, 0.5), half)


def test_bad_inputs_name_the_value(chain):
    s = MaskedDiffusionScheduler(3)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 4, 3), 1.0, s.init_noise(1, 4))
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"num_inference_steps must be a positive integer, got {steps}"):
            s.set_timesteps(steps)
    s.set_timesteps(4)
    x = s.init_noise(2, 4)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="over 4 tokens.*vocab_size=3"):
        s.step(torch.zeros(2, 4, 4), t, x)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\), got \(2, 5, 3\)"):
        s.step(torch.zeros(2, 5, 3), t, x)
    with pytest.raises(ValueError, match="floating-point logits"):
        s.step(torch.zeros(2, 4, 3, dtype=torch.int64), t, x)
    with pytest.raises(ValueError, match="token id 7"):
        s.step(torch.zeros(2, 4, 3), t, torch.tensor([[0, 7, 3, 3], [3, 3, 3, 3]]))
    with pytest.raises(ValueError, match="token id -1"):
        s.step(torch.zeros(2, 4, 3), t, torch.tensor([[0, -1, 3, 3], [3, 3, 3, 3]]))
    with pytest.raises(ValueError, match="integer tensor"):
        s.step(torch.zeros(2, 4, 3), t, x.float())
    with pytest.raises(ValueError, match="timestep 0.55 is not in the schedule"):
        s.step(torch.zeros(2, 4, 3), 0.55, x)
    x = s.step(chain(x), t, x).prev_sample
    y = x.clone()
    y[0, 0] = 9  # a changed sample is checked again at a later step
    with pytest.raises(ValueError, match="token id 9"):
        s.step(chain(x), s.timesteps[1], y)
    for t in s.timesteps[1:]:
        x = s.step(chain(x), t, x).prev_sample
    with pytest.raises(ValueError, match="all 4 steps have been taken"):
        s.step(chain(x), 0.25, x)
    with pytest.raises(ValueError, match="mask id 2"):
        MaskedDiffusionScheduler(3, mask_token_id=2)
    with pytest.raises(ValueError, match="unknown masking schedule 'quadratic'"):
        MaskedDiffusionScheduler(3, masking_schedule="quadratic")
    with pytest.raises(ValueError, match="p=-1"):
        MaskedDiffusionScheduler(3, masking_schedule="poly:p=-1")
    with pytest.raises(ValueError, match="unknown sampler 'fhs'"):
        MaskedDiffusionScheduler(3, sampler="fhs")
    with pytest.raises(ValueError, match="tokens_per_step must be a positive integer, got 0"):
        MaskedDiffusionScheduler(3, sampler="first_hitting", tokens_per_step=0)
    with pytest.raises(ValueError, match="unknown categorical_dtype 'float16'"):
        MaskedDiffusionScheduler(3, categorical_dtype="float16")
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
        MaskedDiffusionScheduler(0)
    fhs = MaskedDiffusionScheduler(3, sampler="first_hitting", tokens_per_step=2)
    fhs.set_timesteps(1)
    with pytest.raises(ValueError, match=r"cannot unmask 4 tokens 2 at a time: need 2; call set_timesteps\(2\)"):
        fhs.step(torch.zeros(2, 4, 3), fhs.timesteps[0], fhs.init_noise(2, 4))
    with pytest.raises(ValueError, match="lie in \\[0, 1\\], got 1.5"):
        s.add_noise(x, 1.5)
    with pytest.raises(ValueError, match="float tensor, got torch.int64"):
        s.add_noise(x, torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="token id 5"):
        s.add_noise(torch.tensor([[0, 5, 1, 1]]), 0.5)
