"""Train the bundled class-conditional digits diffusion model and write it into the package.

    python scripts/train_digits.py                      # 3,000 iterations, ~12 minutes on 2 CPU cores

A diffusers ``UNet2DModel`` (16×16, 1 channel, channels 16/32/64, attention at 4×4, 11 class embeddings:
digits 0–9 and a null class) is trained to predict v = α ε − σ x0 (Salimans & Ho 2022, Sec. 4; the
x̂0 it implies, α x − σ v̂, does not amplify the network's error by 1/α at high noise as ε-prediction
does) with DDPM's linear β schedule (1e-4 … 0.02, 1,000 steps) over the 1,438 training digits. Labels are dropped to
the null class with probability 0.1 so that classifier-free guidance works (Ho & Salimans 2022). AdamW,
learning rate 1e-3 with warm-up and cosine decay, batch 128, EMA 0.999 of the weights (the EMA is what
ships). Fixed seeds make it reproducible; a checkpoint every 250 iterations lets an interrupted run resume.
The result is a diffusers pipeline folder (``DigitsPipeline``: ``unet/`` + ``scheduler/``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffsamplers.adapters import DigitsPipeline
from diffsamplers.data.digits import NUM_CLASSES, load_digits_dataset
from diffsamplers.models.digits import DIGITS_PIPELINE_DIR, NULL_CLASS
from diffsamplers.noise import noise_process_from_config

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=8,
)


def build_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


def learning_rate(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(DIGITS_PIPELINE_DIR))
    parser.add_argument("--checkpoint", default="out/train_digits_checkpoint.pt", help="resumed from if present")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    # linear β 1e-4 … 0.02, 1000 steps; "linspace" spacing (DPM-Solver's and UniPC's default) for the schedulers
    # that pipelines derive from this config
    scheduler = DDPMScheduler(prediction_type="v_prediction", timestep_spacing="linspace")
    process = noise_process_from_config(dict(scheduler.config))
    alphas_cumprod = torch.as_tensor(process.alphas_cumprod, dtype=torch.float32, device=device)
    images, labels = (t.to(device) for t in load_digits_dataset("train"))

    unet = build_unet(args.seed).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    start_step = 0
    ckpt = Path(args.checkpoint)
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start_step = state["step"]
        print(f"resumed from {ckpt} at iteration {start_step}")

    n = len(images)
    began = time.time()
    for step in range(start_step, args.iterations):
        idx = torch.randint(0, n, (args.batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen).to(device) < args.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, len(alphas_cumprod), (args.batch_size,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0  # v
        loss = torch.nn.functional.mse_loss(unet(x_t, t, class_labels=y).sample, target)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.iterations, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if (step + 1) % 100 == 0:
            print(f"iteration {step + 1:5d}  loss {loss.item():.4f}  ({time.time() - began:.0f} s)", flush=True)
        if (step + 1) % 250 == 0 or step + 1 == args.iterations:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step + 1,
                },
                tmp,
            )
            os.replace(tmp, ckpt)

    pipe = DigitsPipeline(unet=ema.to("cpu").eval(), scheduler=scheduler)
    pipe.save_pretrained(args.output, safe_serialization=True)
    print(f"wrote {args.output} after {args.iterations} iterations ({time.time() - began:.0f} s this run)")


if __name__ == "__main__":
    main()
