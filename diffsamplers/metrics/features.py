"""Feature networks for Fréchet distances: the bundled digits network, Inception (FID), or any module.

Every extractor takes **uint8** images (N, C, H, W) — what sample shards store — and returns float
features (N, d). Float images are turned into uint8 by rounding (:func:`diffsamplers.data.digits.to_uint8`),
not truncation, so numbers match the literature's image-file pipelines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..models.digits_classifier import DigitsClassifier

__all__ = [
    "FeatureExtractor",
    "DigitsFeatures",
    "ModuleFeatures",
    "InceptionFeatures",
    "INCEPTION_WEIGHTS_NAME",
    "find_inception_weights",
]

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_uint8(images: torch.Tensor, channels: int | None, size: tuple[int, int] | None, who: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"{who} takes uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{who} takes {channels}-channel images, got {images.shape[1]} channels")
    if size is not None and tuple(images.shape[2:]) != size:
        raise ValueError(f"{who} takes {size[0]}×{size[1]} images, got {images.shape[2]}×{images.shape[3]}")


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class DigitsFeatures:
    """FD-digits: the 64-d penultimate features of the bundled digits classifier (not Inception: not FID)."""

    name = "fd-digits"

    def __init__(self, classifier: DigitsClassifier):
        self.classifier = classifier.eval()
        self.dim = classifier.feature_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8(images, 1, (16, 16), "the digits feature network")
        device = next(self.classifier.parameters()).device
        return self.classifier.features(_to_float(images).to(device)).double().cpu()

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class predictions from stored features (the classifier's last layer)."""
        head = self.classifier.head
        return head(features.to(head.weight.dtype).to(head.weight.device)).argmax(1).cpu()


class ModuleFeatures:
    """Any ``nn.Module`` mapping uint8 images (N, C, H, W) to (N, d) features.

    The module receives the uint8 images unchanged, as torchmetrics' ``FrechetInceptionDistance`` feeds a
    custom feature extractor, so one module gives the same features here and there.
    """

    def __init__(self, module: nn.Module, name: str = "custom", channels: int | None = None):
        self.module = module.eval()
        self.name = name
        self.channels = channels
        self.dim = int(getattr(module, "num_features", 0) or getattr(module, "feature_dim", 0) or 0)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8(images, self.channels, None, f"feature network {self.name!r}")
        out = self.module(images).double().cpu()
        if out.ndim != 2:
            raise ValueError(f"feature network {self.name!r} must return (N, d) features, got {tuple(out.shape)}")
        self.dim = out.shape[1]
        return out


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights file, from ``path`` or the torch hub cache; a clear error if absent."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    candidate = Path(path) if path is not None else hub
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        "FID needs the Inception weights and nothing is downloaded at run time. On a machine with network access "
        f"download {INCEPTION_WEIGHTS_URL}, then either pass --inception-weights /path/to/{INCEPTION_WEIGHTS_NAME} "
        f"or put the file at {hub} (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')} moves that folder)."
        + (f" Looked for: {candidate}." if path is not None else "")
    )


class InceptionFeatures:
    """2048-d pool features of FID's InceptionV3 via torchmetrics' ``FrechetInceptionDistance``.

    ``antialias=False`` selects the TF1-compatible bilinear resize (torch-fidelity's), so numbers are
    comparable with published FIDs; grayscale images are repeated to 3 channels.
    """

    name = "fid-inception"
    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        path = find_inception_weights(weights)
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:  # pragma: no cover
            raise ImportError("FID needs torchmetrics with torch-fidelity: pip install 'diffsamplers[fid]'") from err
        try:
            metric = FrechetInceptionDistance(
                feature=2048, normalize=False, antialias=False, feature_extractor_weights_path=str(path)
            )
        except ModuleNotFoundError as err:
            raise ImportError("FID's Inception network comes from torch-fidelity: pip install torch-fidelity") from err
        self.inception = metric.inception.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8(images, None, None, "the Inception feature network")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        elif images.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        return self.inception(images.to(self.device)).double().cpu()
