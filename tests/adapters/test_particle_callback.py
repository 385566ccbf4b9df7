"""FK steering's particle resampling as a diffusers callback, in a real StableDiffusionPipeline (small random
components, nothing downloaded): λ = 0 is the pipeline bit for bit; a large λ resamples within the groups of
``num_images_per_prompt`` and gathers the latents, the scheduler's history and both halves of the classifier-free
guidance embeddings with the same ancestors; diffusers' schedulers, deterministic samplers and ragged batches are
refused; the scheduler's ``reindex`` gathers its multistep state (against a run on the gathered inputs)."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffsamplers import DCSolverScheduler, DPMSolverPlusPlusScheduler
from diffsamplers.adapters.particle_callback import ParticleResampling

from .test_pipelines import sd_pipe  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a photo of a digit", "a drawing of a cat"]
K = 4
STEPS = 5


def x0_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def _sde(pipe, **config) -> None:
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(
        pipe.original_scheduler_config, algorithm_type="sde-dpmsolver++", **config
    )


def _run(pipe, cb=None, inputs=None, prompts=PROMPTS, k=K, **kwargs) -> torch.Tensor:
    if cb is not None:
        kwargs.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=inputs or cb.tensor_inputs)
    return pipe(
        prompts,
        num_images_per_prompt=k,
        height=32,
        width=32,
        guidance_scale=6.0,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


class Spy:
    """Wraps the callback: the latents, the scheduler's state and the embeddings before and after each call."""

    def __init__(self, cb: ParticleResampling):
        self.cb, self.calls = cb, []

    @property
    def tensor_inputs(self) -> list[str]:
        return self.cb.tensor_inputs

    def __call__(self, pipe, i, t, kwargs):
        state = pipe.scheduler.state
        before = {
            "kwargs": {n: v.clone() for n, v in kwargs.items()},
            "history": [h.clone() for h in state.history],
            "anchor": None if state.anchor is None else state.anchor.clone(),
        }
        records = len(self.cb.history)
        out = self.cb(pipe, i, t, kwargs)
        state = pipe.scheduler.state
        after = {"kwargs": dict(out), "history": list(state.history), "anchor": state.anchor}
        record = self.cb.history[-1] if len(self.cb.history) > records else None
        self.calls.append((before, after, record))
        return out


def _check_gathered(spy: Spy, batch: int) -> int:
    """Every tensor the callback returned, and the scheduler's state, is the one before gathered by the step's
    ancestors (the embeddings' [negative; positive] halves alike); returns the number of non-identity steps."""
    moved = 0
    for before, after, record in spy.calls:
        assert record is not None  # interval 1: every step weighs
        a = record.ancestors
        assert torch.equal(a // K, torch.arange(batch) // K)  # within the groups only
        moved += int(not torch.equal(a, torch.arange(batch)))
        assert torch.equal(after["kwargs"]["latents"], before["kwargs"]["latents"][a])
        embeds = before["kwargs"]["prompt_embeds"]
        assert embeds.shape[0] == 2 * batch
        assert torch.equal(after["kwargs"]["prompt_embeds"], embeds[torch.cat([a, a + batch])])
        assert len(after["history"]) == len(before["history"]) >= 1
        for h_after, h_before in zip(after["history"], before["history"]):
            assert torch.equal(h_after, h_before[a])
        if before["anchor"] is not None:
            assert torch.equal(after["anchor"], before["anchor"][a])
    return moved


def test_lambda_zero_is_the_pipeline_bit_for_bit(sd_pipe, caplog):  # noqa: F811
    _sde(sd_pipe)
    plain = _run(sd_pipe)
    cb = ParticleResampling(x0_mean, K, lam=0.0, generator=3)
    with caplog.at_level(logging.WARNING, logger="diffsamplers.adapters.particle_callback"):
        out = _run(sd_pipe, cb)
        assert not caplog.records  # the negative embeddings are inside the [negative; positive] prompt_embeds
        assert torch.equal(_run(sd_pipe, cb, inputs=["latents"]), plain)
    assert "['prompt_embeds', 'negative_prompt_embeds']" in caplog.text  # not passed, so not gathered: a warning
    assert torch.equal(out, plain)
    assert [r.index for r in cb.history] == list(range(STEPS))
    assert all(torch.equal(r.ancestors, torch.arange(len(PROMPTS) * K)) for r in cb.history)
    assert torch.equal(cb.log_weights, torch.zeros(len(PROMPTS), K, dtype=torch.float64))


def test_resampling_gathers_latents_history_and_both_embedding_halves(sd_pipe):  # noqa: F811
    _sde(sd_pipe)
    decoded = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        decoded.append(z.shape)
        return z[:, :2]

    batch = len(PROMPTS) * K
    cb = ParticleResampling(x0_mean, K, lam=1e4, decode=decode, generator=1)
    spy = Spy(cb)
    seen = []
    hook = sd_pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        out = _run(sd_pipe, spy)
    finally:
        hook.remove()
    assert decoded == [(batch, 4, 16, 16)] * STEPS  # x̂0 at every step, the returned latents at the last
    decoded.clear()
    assert len(cb.history) == STEPS and _check_gathered(spy, batch) >= 2
    # the embeddings stay with their prompts: group g's positive rows are prompt g's, the negative half the empty one
    with torch.no_grad():
        pos, neg = sd_pipe.encode_prompt(PROMPTS, "cpu", K, True)
    for embeds in seen:
        assert torch.equal(embeds, torch.cat([neg, pos]))
    # the last step resamples by the final reward, with λ this large every particle is its group's best
    final = spy.calls[-1][0]["kwargs"]["latents"]
    best = x0_mean(decode(final)).view(-1, K).max(dim=1).values
    assert torch.equal(cb.rewards.view(-1, K), best.double().unsqueeze(1).expand(-1, K))
    for g in range(len(PROMPTS)):
        assert all(torch.equal(out[g * K + j], out[g * K]) for j in range(K))
    assert torch.equal(cb.log_weights, torch.zeros(len(PROMPTS), K, dtype=torch.float64))
    # the uniforms have their own seed: the same seed, the same images
    again = ParticleResampling(x0_mean, K, lam=1e4, decode=decode, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_run(sd_pipe, again), out)


def test_per_row_embeddings_follow_their_particles(sd_pipe):  # noqa: F811
    """Distinct embeddings in every row: the UNet's conditional rows at the last step are the original rows of each
    particle's lineage (the composed ancestors), its unconditional rows the negative embedding."""
    _sde(sd_pipe)
    with torch.no_grad():
        pos, neg = sd_pipe.encode_prompt(PROMPTS, "cpu", K, True)
    pos = pos + 0.01 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(5))
    cb = ParticleResampling(x0_mean, K, lam=1e4, potential="max", generator=2)
    seen = []
    hook = sd_pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        _run(sd_pipe, cb, inputs=cb.tensor_inputs_for(sd_pipe), prompts=None, k=1, prompt_embeds=pos)
    finally:
        hook.remove()
    lineage = torch.arange(pos.shape[0])
    for r in cb.history[:-1]:
        lineage = lineage[r.ancestors]
    assert not torch.equal(lineage, torch.arange(pos.shape[0]))
    uncond, cond = seen[-1].chunk(2)
    assert torch.equal(cond, pos[lineage])
    assert torch.equal(uncond, neg.expand_as(uncond))


def test_refuses_other_schedulers_deterministic_samplers_and_ragged_batches(sd_pipe):  # noqa: F811
    cb = ParticleResampling(x0_mean, K)
    sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        sd_pipe.original_scheduler_config, algorithm_type="sde-dpmsolver++"
    )
    with pytest.raises(TypeError, match=r"DPMSolverMultistepScheduler.*diffsamplers\.DPMSolverPlusPlusScheduler"):
        _run(sd_pipe, cb)
    sd_pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(sd_pipe.original_scheduler_config)
    with pytest.raises(ValueError, match="stochastic"):
        _run(sd_pipe, cb)
    _sde(sd_pipe)
    with pytest.raises(ValueError, match="multiple of 4"):
        _run(sd_pipe, cb, prompts=PROMPTS[:1], k=3)
    with pytest.raises(ValueError, match="latents"):
        cb(sd_pipe, 0, 999, {"prompt_embeds": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="λ"):
        ParticleResampling(x0_mean, K, lam=-1.0)
    with pytest.raises(ValueError, match="potential"):
        ParticleResampling(x0_mean, K, potential="rt")
    with pytest.raises(ValueError, match="scheme"):
        ParticleResampling(x0_mean, K, scheme="sorted")
    with pytest.raises(ValueError, match="num_particles"):
        ParticleResampling(x0_mean, 0)
    with pytest.raises(ValueError, match="generator"):
        ParticleResampling(x0_mean, K, generator="seed")
    with pytest.raises(TypeError, match="reward"):
        ParticleResampling(None, K)


@pytest.mark.parametrize(
    "cls, config",
    [
        (DPMSolverPlusPlusScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        (DPMSolverPlusPlusScheduler, {"solver_order": 3, "exposure_bias_shift_half_width": 200}),
        (DCSolverScheduler, {"solver_order": 3}),  # UniPC: a corrector and its anchor
    ],
    ids=["sde-dpm++2m", "dpm++3m-time-shift", "unipc"],
)
def test_scheduler_reindex_gathers_its_state(cls, config):
    """Reindexing after two steps and stepping on gathered inputs equals running on the gathered inputs from the
    start: the multistep history (and anchor, time-shifted points) follows the ancestors."""
    gen = torch.Generator().manual_seed(0)
    shape, steps = (4, 2, 3, 3), 5
    x = torch.randn(shape, generator=gen)
    scale = torch.tensor([0.2, 0.6, 1.0, 1.4]).view(-1, 1, 1, 1)  # rows of different variance: different shifts
    x0s = [torch.randn(shape, generator=gen) * scale for _ in range(steps)]
    noise = [torch.randn(shape, generator=gen) for _ in range(steps)]
    index = torch.tensor([2, 2, 0, 3])

    def loop(sample, outputs, noises, reindex_after=None, gather_state=True):
        sched = cls(prediction_type="sample", **config)
        sched.set_timesteps(steps)
        for k, t in enumerate(sched.timesteps):
            model_output = outputs[k] + 0.1 * sample  # x̂0 from the "model", which depends on the sample
            sample = sched.step(model_output, t, sample, variance_noise=noises[k]).prev_sample
            if k == reindex_after:
                before = sched.state.copy()
                if gather_state:
                    sched.reindex(index)
                    after = sched.state
                    assert all(torch.equal(a, b[index]) for a, b in zip(after.history, before.history, strict=True))
                    assert (after.anchor is None) == (before.anchor is None)
                    if after.anchor is not None:
                        assert torch.equal(after.anchor, before.anchor[index])
                    for j, point in getattr(before, "points", {}).items():
                        assert len(point.timestep.unique()) > 1  # the rows were shifted apart
                        assert torch.equal(after.points[j].timestep, point.timestep[index])
                sample = sample[index]
        return sample, sched

    # rows i of the reference run are rows index[i] of the reindexed one up to the reindexing (step 2), after it
    # both take the same inputs
    a, sched = loop(x, x0s, noise, reindex_after=1)
    b, _ = loop(x[index], [e[index] for e in x0s[:2]] + x0s[2:], [n[index] for n in noise[:2]] + noise[2:])
    assert torch.equal(a, b)
    ungathered, _ = loop(x, x0s, noise, reindex_after=1, gather_state=False)
    assert not torch.allclose(a, ungathered, atol=1e-4)  # the sample alone is not enough: the history matters

    # bad indices
    with pytest.raises(ValueError, match="batch size 4"):
        sched.reindex(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D integer"):
        sched.reindex(torch.zeros(4))
