"""Models to sample from and the samplers that turn sample indices into images, for evaluation jobs.

A model is the bundled digits model (``"digits"``) or a diffusers pipeline folder with ``unet/``
(``UNet2DModel``) and ``scheduler/``. A sampler is one of our solvers by name (see
:data:`diffsamplers.solvers.registry.SOLVERS`) on a named schedule (``"linspace"``, or ``"linspace/sigma_min"``
to name the final level too), DC-Solver (``"dc-solver"``: ratios predicted by the cascade polynomial
regression shipped in the model folder as ``dc_solver_cpr.safetensors``; ``"dc-solver:PATH"``: a ratio or CPR
file), or a diffusers scheduler class (``"diffusers:DPMSolverMultistepScheduler"``) run through a pipeline. Every sample index has its own seed
(:func:`diffsamplers.evaluation.shards.sample_seed`), so the images of an index never depend on the batch,
the process or the sampler family.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.digits import to_uint8
from ..denoiser import Denoiser
from ..noise import NoiseProcess, noise_process_from_config
from ..sampling import sample
from ..schedules.spacing import build_schedule
from ..solvers.base import Solver
from ..solvers.registry import make_solver
from .shards import sample_seed

__all__ = ["ModelSource", "load_model_source", "make_sampler", "DIFFUSERS_PREFIX"]

DIFFUSERS_PREFIX = "diffusers:"


@dataclass
class ModelSource:
    name: str
    path: Path
    unet: torch.nn.Module
    process: NoiseProcess
    scheduler_config: dict[str, Any]
    prediction_type: str
    sample_shape: tuple[int, ...]
    num_classes: int  # 0 for an unconditional model
    null_class: int | None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def labels_for(self, indices: Sequence[int], classes: Sequence[int] | None) -> torch.Tensor:
        """The class of each sample index: ``classes`` cycled (all classes by default); −1 if unconditional."""
        if self.num_classes == 0:
            return torch.full((len(indices),), -1, dtype=torch.long)
        pool = list(range(self.num_classes)) if not classes else [int(c) for c in classes]
        bad = [c for c in pool if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"classes must lie in 0..{self.num_classes - 1}, got {bad}")
        return torch.tensor([pool[i % len(pool)] for i in indices], dtype=torch.long)


def load_model_source(spec: str | Path = "digits", device: str | torch.device | None = None) -> ModelSource:
    """``"digits"`` (bundled) or a diffusers pipeline folder holding ``unet/`` and ``scheduler/``."""
    from diffusers import UNet2DModel

    from ..models.digits import DIGITS_PIPELINE_DIR

    root = DIGITS_PIPELINE_DIR if str(spec) == "digits" else Path(spec)
    if not (root / "unet" / "config.json").exists() or not (root / "scheduler" / "scheduler_config.json").exists():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder with unet/ and scheduler/ (UNet2DModel)")
    unet = UNet2DModel.from_pretrained(root / "unet", local_files_only=True).eval()
    if device is not None:
        unet = unet.to(device)
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    embeds = unet.config.num_class_embeds or 0
    return ModelSource(
        name=str(spec),
        path=root,
        unet=unet,
        process=noise_process_from_config(config),
        scheduler_config=config,
        prediction_type=config.get("prediction_type", "epsilon"),
        sample_shape=(unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
        num_classes=max(embeds - 1, 0),
        null_class=embeds - 1 if embeds else None,
    )


def make_sampler(
    source: ModelSource,
    solver: str,
    steps: int,
    schedule: str = "linspace",
    guidance_scale: float = 1.0,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    batch_size: int = 256,
) -> Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]:
    """A function from sample indices to (uint8 images, labels), deterministic per index."""
    if solver.startswith(DIFFUSERS_PREFIX):
        return _diffusers_sampler(
            source, solver[len(DIFFUSERS_PREFIX) :], steps, schedule, guidance_scale, seed, classes, batch_size
        )
    spacing, _, final = schedule.partition("/")
    sched = build_schedule(source.process, steps, spacing, final or None)  # type: ignore[arg-type]
    solver_obj = (
        _dc_solver(source, solver, steps, guidance_scale) if solver.startswith("dc-solver") else make_solver(solver)
    )
    denoiser = Denoiser(source.unet, source.process, source.prediction_type)

    def run(indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = source.labels_for(indices, classes)
        kwargs: dict[str, Any] = {}
        if source.num_classes:
            kwargs["cond"] = {"class_labels": labels.to(source.device)}
            kwargs["uncond"] = {"class_labels": torch.tensor([source.null_class], device=source.device)}
        with torch.no_grad():
            x = sample(
                denoiser,
                solver_obj,
                sched,
                (len(indices), *source.sample_shape),
                seeds=[sample_seed(seed, i) for i in indices],
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                progress=False,
                **kwargs,
            )
        return to_uint8(x.cpu()), labels

    return run


def _dc_solver(source: ModelSource, spec: str, steps: int, guidance_scale: float) -> Solver:
    """DC-Solver with ratios from a ratio file or a CPR fit (the model folder's, by default)."""
    from ..dc.cpr import CascadePolynomialRegression
    from ..dc.ratios import DCRatios
    from ..solvers.dc_solver import DCSolver

    _, _, path = spec.partition(":")
    file = Path(path) if path else source.path / "dc_solver_cpr.safetensors"
    if not file.exists():
        raise FileNotFoundError(
            f"no DC-Solver ratios at {file}: search them with scripts/search_dc_ratios.py and fit a CPR with "
            "scripts/fit_cpr.py, then pass dc-solver:PATH"
        )
    try:
        cpr = CascadePolynomialRegression.load(file)
    except Exception:  # noqa: BLE001 - not a CPR file: a searched ratio file
        found = DCRatios.load(file)
        if found.nfe != steps:
            raise ValueError(f"{file} holds ratios for {found.nfe} steps, not {steps}") from None
        return DCSolver(found.ratios)
    fitted = cpr.nfe_range
    if fitted is not None and not fitted[0] <= steps <= fitted[1]:
        raise OutsideFitError(
            f"the CPR in {file} was fitted on NFE {fitted[0]}–{fitted[1]}; its polynomial in the NFE is not "
            f"trusted at {steps} steps: search ratios for {steps} steps (scripts/search_dc_ratios.py)"
        )
    return DCSolver(cpr.predict(steps, guidance_scale))


class OutsideFitError(ValueError):
    """DC-Solver ratios asked of a cascade polynomial regression outside the NFE range it was fitted on."""


def _diffusers_sampler(
    source: ModelSource,
    class_name: str,
    steps: int,
    schedule: str,
    guidance_scale: float,
    seed: int,
    classes: Sequence[int] | None,
    batch_size: int,
) -> Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]:
    import diffusers

    from ..pipelines import DigitsPipeline

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {class_name!r}")
    # The scheduler's own grid, with diffusers' spacing named by `schedule` where it is one; DDIM's linspace
    # spacing steps by a different stride than its timesteps, so DDIM runs on "trailing".
    spacing = schedule if schedule in ("linspace", "leading", "trailing") else "linspace"
    extra = {"timestep_spacing": spacing}
    if class_name == "DDIMScheduler":
        extra = {"timestep_spacing": "trailing", "set_alpha_to_one": True}
    scheduler = cls.from_config(source.scheduler_config, **extra)

    def run(indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = source.labels_for(indices, classes)
        chunks = []
        for start in range(0, len(indices), batch_size):
            part = list(indices[start : start + batch_size])
            gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in part]
            if source.num_classes:
                pipe = DigitsPipeline(unet=source.unet, scheduler=scheduler)
                pipe.set_progress_bar_config(disable=True)
                out = pipe(labels[start : start + len(part)], steps, guidance_scale, generator=gens).images
            else:
                pipe = diffusers.DDPMPipeline(unet=source.unet, scheduler=scheduler)
                pipe.set_progress_bar_config(disable=True)
                out = torch.from_numpy(pipe(len(part), gens, steps, output_type="np").images).permute(0, 3, 1, 2)
            chunks.append(out.cpu())
        images = torch.cat(chunks)
        return (images * 255).round().to(torch.uint8), labels

    return run
