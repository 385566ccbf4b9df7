"""scikit-learn's handwritten digits (1,797 images of 8×8, 10 classes), as diffusion training data.

The 8×8 images (values 0–16) are upsampled bilinearly to 16×16 and mapped to [−1, 1]. A fixed stratified
split holds out 20 % (359 images) for evaluation; the bundled models are trained on the other 1,438.
The data ship inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGITS_RESOLUTION", "NUM_CLASSES", "load_digits_dataset", "to_uint8"]

DIGITS_RESOLUTION = 16
NUM_CLASSES = 10
_HELD_OUT_FRACTION = 0.2
_SPLIT_SEED = 0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a fixed random 20 % is held out."""
    rng = np.random.default_rng(_SPLIT_SEED)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(_HELD_OUT_FRACTION * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_dataset(
    split: Literal["train", "test", "all"] = "train", resolution: int = DIGITS_RESOLUTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, resolution, resolution) float32 in [−1, 1], labels (N,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits data come with scikit-learn: pip install scikit-learn") from err
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: expected 'train', 'test' or 'all'")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    if split != "all":
        train, test = _split_indices(bunch.target)
        keep = torch.from_numpy(train if split == "train" else test)
        images, labels = images[keep], labels[keep]
    return images.contiguous(), labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → uint8 with rounding (not truncation), as image files store them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
