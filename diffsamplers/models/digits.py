"""The bundled digits models: a class-conditional diffusion UNet and the FD-digits feature network.

Both are trained by scripts in ``scripts/`` on scikit-learn's digits (:mod:`diffsamplers.data.digits`) and
ship as safetensors + JSON inside the package:

* ``assets/digits/`` — a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) with a
  ``UNet2DModel`` (16×16, 1 channel, 11 class embeddings: digits 0–9 and the null class 10 for
  classifier-free guidance) trained with DDPM's linear β schedule on v-prediction. It loads with diffusers'
  own ``UNet2DModel.from_pretrained`` / :class:`diffsamplers.adapters.DigitsPipeline.from_pretrained`;
* ``assets/digits_classifier/`` — :class:`DigitsClassifier` (held-out accuracy in its ``config.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..noise import DiscreteVP, noise_process_from_config
from .digits_classifier import DigitsClassifier

__all__ = [
    "ASSETS",
    "DIGITS_PIPELINE_DIR",
    "DIGITS_CLASSIFIER_DIR",
    "DigitsModel",
    "load_digits",
    "load_digits_classifier",
    "save_digits_classifier",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_PIPELINE_DIR = ASSETS / "digits"
DIGITS_CLASSIFIER_DIR = ASSETS / "digits_classifier"
NULL_CLASS = 10


def _missing(path: Path, script: str) -> FileNotFoundError:
    return FileNotFoundError(f"bundled weights not found at {path}; train them with `python scripts/{script}`")


@dataclass
class DigitsModel:
    """The bundled class-conditional digits UNet with its noise process."""

    unet: torch.nn.Module
    process: DiscreteVP
    prediction_type: str = "epsilon"
    num_classes: int = 10
    null_class: int = NULL_CLASS
    sample_shape: tuple[int, int, int] = (1, 16, 16)
    path: Path = DIGITS_PIPELINE_DIR

    def denoiser(self, guidance_scale: float = 1.0) -> Denoiser:
        return Denoiser(self.unet, self.process, self.prediction_type, guidance_scale=guidance_scale)

    def labels(self, classes: torch.Tensor | list[int]) -> torch.Tensor:
        labels = torch.as_tensor(classes, dtype=torch.long)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError(f"classes must be a non-empty list of digits, got {classes!r}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"classes must lie in 0..{self.num_classes - 1}, got {bad.tolist()}")
        return labels

    def conditions(self, classes: torch.Tensor | list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) model inputs for :func:`diffsamplers.sample` with classifier-free guidance."""
        labels = self.labels(classes).to(self.device)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels[:1], self.null_class)}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def load_digits(path: str | Path | None = None, device: str | torch.device | None = None) -> DigitsModel:
    """The bundled digits diffusion model (or one saved by ``scripts/train_digits.py`` at ``path``), offline."""
    from diffusers import UNet2DModel

    root = Path(path) if path is not None else DIGITS_PIPELINE_DIR
    if not (root / "unet" / "config.json").exists():
        raise _missing(root / "unet", "train_digits.py")
    unet = UNet2DModel.from_pretrained(root / "unet", local_files_only=True).eval()
    if device is not None:
        unet = unet.to(device)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    process = noise_process_from_config(scheduler_config)
    return DigitsModel(unet, process, scheduler_config.get("prediction_type", "epsilon"), path=root)


def save_digits_classifier(model: DigitsClassifier, path: str | Path, metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**model.config, **metrics}, indent=2))


def load_digits_classifier(
    path: str | Path | None = None, device: str | torch.device | None = None
) -> DigitsClassifier:
    """The bundled FD-digits feature network / classifier, in eval mode."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else DIGITS_CLASSIFIER_DIR
    if not (root / "model.safetensors").exists():
        raise _missing(root, "train_digits_classifier.py")
    config = json.loads((root / "config.json").read_text())
    model = DigitsClassifier(num_classes=config["num_classes"], width=config["width"])
    model.load_state_dict(load_file(str(root / "model.safetensors")))
    return model.eval().to(device) if device is not None else model.eval()
