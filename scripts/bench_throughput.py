"""Sampling throughput (images/s): our loop vs diffusers' pipeline loop with the same solver, same run.

Models: the bundled digits UNet (16×16) and a CIFAR-10-sized ``UNet2DModel`` (DDPM's CIFAR-10 config,
35.7 M parameters, random weights). Solver: DPM-Solver++ 2M, 25 steps, diffusers' linspace grid — ours
through :func:`diffsamplers.sample`, diffusers' through its pipeline (``DigitsPipeline`` / ``DDPMPipeline``)
with ``DPMSolverMultistepScheduler``. The scheduler's share of wall time is 1 − (time of the 25 model
calls alone) / (loop time). fp16 on CUDA, fp32 on the CPU.

    python scripts/bench_throughput.py                          # GPU: batch 64, 256, 1024
    python scripts/bench_throughput.py --device cpu --batch 8 --models digits
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

STEPS = 25


def cifar_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def _timed(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(unet, config: dict, batch: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Seconds per batch for our loop, diffusers' pipeline and the bare model calls."""
    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler

    from diffsamplers import Denoiser, DPMSolverPlusPlus, sample
    from diffsamplers.adapters import DigitsPipeline
    from diffsamplers.noise import noise_process_from_config
    from diffsamplers.schedules import diffusers_spacing

    cfg = unet.config
    process = noise_process_from_config(config)
    denoiser = Denoiser(unet, process, "epsilon")
    solver, schedule = DPMSolverPlusPlus(2), diffusers_spacing(process, STEPS)
    conditional = bool(cfg.num_class_embeds)
    labels = torch.arange(batch, device=device) % 10
    extra = {"class_labels": labels} if conditional else {}
    x_T = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    sched = DPMSolverMultistepScheduler.from_config(config)
    if conditional:
        pipe = DigitsPipeline(unet=unet, scheduler=sched)
        pipe_args: tuple = (labels, STEPS)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=sched)
        pipe_args = (batch, None, STEPS)
    pipe.set_progress_bar_config(disable=True)
    t_in = torch.zeros(batch, device=device, dtype=torch.long)

    @torch.no_grad()
    def ours():
        sample(denoiser, solver, schedule, x_T=x_T, cond=extra or None, progress=False, check_finite=False)

    def theirs():
        pipe(*pipe_args, output_type="np" if not conditional else "pt")

    @torch.no_grad()
    def model_only():
        for _ in range(STEPS):
            unet(x_T.to(dtype), t_in, **extra)

    return {
        "ours": _timed(ours, device, repeats),
        "diffusers": _timed(theirs, device, repeats),
        "model": _timed(model_only, device, repeats),
    }


def dtype_for(device: torch.device) -> torch.dtype:
    """The benchmark's dtype: fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_unet(name: str, device: torch.device) -> torch.nn.Module:
    """The ``digits`` or ``cifar`` UNet on ``device`` in the benchmark's dtype, in eval mode."""
    from diffsamplers.models.digits import load_digits

    return (load_digits().unet if name == "digits" else cifar_unet()).to(device, dtype_for(device)).eval()


def print_header() -> None:
    print(
        f"{'model':<8}{'batch':>7}{'ours img/s':>12}{'diffusers img/s':>17}{'ratio':>7}"
        f"{'sched. share ours':>19}{'sched. share diffusers':>24}"
    )


def throughput_row(name: str, unet: torch.nn.Module, batch: int, device: torch.device, repeats: int) -> dict:
    """Images/s of our loop and diffusers' pipeline, and the scheduler's share of each, at one batch (printed)."""
    from diffusers import DDPMScheduler

    t = measure(unet, dict(DDPMScheduler().config), batch, device, dtype_for(device), repeats)
    row = {
        "model": name,
        "batch": batch,
        "device": str(device),
        "ours_images_per_s": batch / t["ours"],
        "diffusers_images_per_s": batch / t["diffusers"],
        "scheduler_share_ours": max(0.0, 1 - t["model"] / t["ours"]),
        "scheduler_share_diffusers": max(0.0, 1 - t["model"] / t["diffusers"]),
    }
    print(
        f"{name:<8}{batch:>7}{row['ours_images_per_s']:>12.1f}{row['diffusers_images_per_s']:>17.1f}"
        f"{t['diffusers'] / t['ours']:>7.2f}{row['scheduler_share_ours']:>19.1%}{row['scheduler_share_diffusers']:>24.1%}"
    )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--models", nargs="+", default=["digits", "cifar"], choices=["digits", "cifar"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    print_header()
    for name in args.models:
        unet = load_unet(name, device)
        for batch in args.batch:
            rows.append(throughput_row(name, unet, batch, device, args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            json.dump({"device": name, "torch": torch.__version__, "steps": STEPS, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
