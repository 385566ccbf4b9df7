"""DPMSolverPlusPlusScheduler inside real diffusers pipelines, assembled from small random components.

Nothing is downloaded: the UNets, VAE and CLIP text encoder are built from configs with random weights, and
the CLIP tokenizer from a byte-level vocabulary written on the fly.
"""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from diffsamplers import DCSolver, DCSolverScheduler, Denoiser, DPMSolverPlusPlus, DPMSolverPlusPlusScheduler, sample
from diffsamplers.noise import noise_process_from_config
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def ddpm_pipe():
    return DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler())


@pytest.mark.parametrize("steps", [4, 10])
def test_ddpm_pipeline_drop_in(ddpm_pipe, steps):
    images = {}
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        ddpm_pipe.scheduler = cls.from_config(ddpm_pipe.scheduler.config)
        out = ddpm_pipe(
            batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        images[cls.__name__] = torch.from_numpy(out.images)
    assert images["DPMSolverPlusPlusScheduler"].shape == (2, 16, 16, 3)
    assert torch.allclose(images["DPMSolverPlusPlusScheduler"], images["DPMSolverMultistepScheduler"], atol=1e-5)


def test_our_loop_reproduces_the_pipeline(ddpm_pipe):
    """diffsamplers.sample on the pipeline's UNet equals the pipeline run with our scheduler."""
    ddpm_pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(ddpm_pipe.scheduler.config)
    piped = ddpm_pipe(
        batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(3), output_type="np"
    ).images
    config = dict(ddpm_pipe.scheduler.config)
    process = noise_process_from_config(config)
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    schedule = schedule_from_scheduler_config(process, config, 8)
    with torch.no_grad():
        ours = sample(
            Denoiser(ddpm_pipe.unet, process, "epsilon"), DPMSolverPlusPlus(2), schedule, x_T=x_T, progress=False
        )
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(ours, torch.from_numpy(piped), atol=1e-5)


def _clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    byte_chars = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = byte_chars[:], 0
    for b in range(256):
        if b not in byte_chars:
            chars.append(256 + extra)
            extra += 1
    vocab = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[chr(c) + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=600,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=_clip_tokenizer(tmp_path_factory.mktemp("tok")),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = scheduler.config
    return pipe


def _run_sd(pipe, **kwargs):
    out = pipe(
        "a photo of a digit",
        height=32,
        width=32,
        guidance_scale=6.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize(
    "config",
    [{}, {"solver_order": 3}, {"use_karras_sigmas": True}, {"algorithm_type": "sde-dpmsolver++"}],
    ids=lambda c: ",".join(c) or "default",
)
def test_stable_diffusion_drop_in(sd_pipe, config):
    latents = {}
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        sd_pipe.scheduler = cls.from_config(sd_pipe.original_scheduler_config, **config)
        latents[cls.__name__] = _run_sd(sd_pipe, num_inference_steps=6)
    ours, theirs = latents["DPMSolverPlusPlusScheduler"], latents["DPMSolverMultistepScheduler"]
    assert ours.shape == (1, 4, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


def test_stable_diffusion_custom_timesteps_and_sigmas(sd_pipe):
    sd_pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(sd_pipe.original_scheduler_config)
    ays_timesteps = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    by_timesteps = _run_sd(sd_pipe, timesteps=ays_timesteps)
    assert sd_pipe.scheduler.num_inference_steps == 10
    reference = DPMSolverMultistepScheduler.from_config(sd_pipe.scheduler.config)
    sd_pipe.scheduler = reference
    assert torch.allclose(by_timesteps, _run_sd(sd_pipe, timesteps=ays_timesteps), atol=1e-4)
    # sigmas= is an addition of ours (diffusers' DPM-Solver has only timesteps=): the published AYS levels.
    sd_pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(reference.config)
    ays_sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
    by_sigmas = _run_sd(sd_pipe, sigmas=ays_sigmas)
    assert torch.isfinite(by_sigmas).all()
    assert float((by_sigmas - by_timesteps).abs().max()) < 0.05 * float(by_timesteps.abs().max())


def test_our_loop_with_classifier_free_guidance_reproduces_stable_diffusion(sd_pipe):
    """diffsamplers.sample on the pipeline's UNet2DConditionModel (CFG in one batched call) equals the pipeline."""
    config = sd_pipe.original_scheduler_config
    sd_pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(config)
    piped = _run_sd(sd_pipe, num_inference_steps=6)
    with torch.no_grad():
        cond, uncond = sd_pipe.encode_prompt("a photo of a digit", "cpu", 1, True)
        x_T = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        full = dict(sd_pipe.scheduler.config)
        process = noise_process_from_config(full)
        ours = sample(
            Denoiser(sd_pipe.unet, process, "epsilon", guidance_scale=6.0),
            DPMSolverPlusPlus(2),
            schedule_from_scheduler_config(process, full, 6),
            x_T=x_T,
            cond={"encoder_hidden_states": cond},
            uncond={"encoder_hidden_states": uncond},
            progress=False,
        )
    assert torch.allclose(ours, piped, atol=1e-4), float((ours - piped).abs().max())


@pytest.mark.usefixtures("single_thread")
def test_stable_diffusion_dc_solver_drop_in(sd_pipe):
    """DCSolverScheduler in a real StableDiffusionPipeline (CFG 6): UniPC's numbers with ratios 1."""
    latents = {}
    for cls in (UniPCMultistepScheduler, DCSolverScheduler):
        sd_pipe.scheduler = cls.from_config(
            sd_pipe.original_scheduler_config, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"
        )
        latents[cls.__name__] = _run_sd(sd_pipe, num_inference_steps=6)
    ours, theirs = latents["DCSolverScheduler"], latents["UniPCMultistepScheduler"]
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


@pytest.mark.usefixtures("single_thread")
def test_stable_diffusion_with_dc_ratios(sd_pipe, tmp_path):
    """Ratios in the JSON config; the pipeline's result equals diffsamplers.sample with DCSolver (CFG 6)."""
    ratios = [1.0, 1.0, 1.1, 0.9, 1.2, 1.05]
    sd_pipe.scheduler = DCSolverScheduler.from_config(sd_pipe.original_scheduler_config, dc_ratios=ratios)
    sd_pipe.scheduler.save_pretrained(tmp_path)
    sd_pipe.scheduler = DCSolverScheduler.from_pretrained(tmp_path)
    piped = _run_sd(sd_pipe, num_inference_steps=6)
    assert list(sd_pipe.scheduler.active_ratios) == ratios
    with torch.no_grad():
        cond, uncond = sd_pipe.encode_prompt("a photo of a digit", "cpu", 1, True)
        x_T = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        full = dict(sd_pipe.scheduler.config)
        process = noise_process_from_config(full)
        ours = sample(
            Denoiser(sd_pipe.unet, process, "epsilon", guidance_scale=6.0),
            DCSolver(ratios),
            schedule_from_scheduler_config(process, full, 6),
            x_T=x_T,
            cond={"encoder_hidden_states": cond},
            uncond={"encoder_hidden_states": uncond},
            progress=False,
        )
    assert torch.allclose(ours, piped, atol=1e-4), float((ours - piped).abs().max())
