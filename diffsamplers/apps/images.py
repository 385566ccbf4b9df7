"""Image grids for sample sheets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["image_suffixes", "make_grid", "save_grid", "save_grids_side_by_side"]


def make_grid(images: torch.Tensor, rows: int, scale: int = 4, padding: int = 1) -> torch.Tensor:
    """uint8 (N, C, H, W) → one uint8 (H', W', C) grid, ``rows`` rows, each pixel ``scale``× (nearest)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    if rows <= 0 or n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    hh, ww = h * scale + padding, w * scale + padding
    grid = torch.full((c, rows * hh + padding, cols * ww + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, padding + r * hh : padding + r * hh + h * scale, padding + k * ww : padding + k * ww + w * scale] = big[
            i
        ]
    return grid.permute(1, 2, 0)


def image_suffixes() -> frozenset[str]:
    """File extensions Pillow can write (``.png``, ``.jpg``, …): what :func:`save_grid` accepts."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def _write(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 (H, W, C) grid as an image file (its extension chooses the format)."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in image_suffixes():
        raise ValueError(f"{path}: not an image file name Pillow can write (.png, .jpg, .webp, …)")
    array = grid.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 4) -> Path:
    return _write(make_grid(images, rows, scale), path)


def save_grids_side_by_side(
    sheets: Sequence[torch.Tensor], rows: int, path: str | Path, scale: int = 4, gap: int = 16
) -> Path:
    """Grids of equally many uint8 (N, C, H, W) images, ``rows`` rows each, left to right with a white gap of
    ``gap`` pixels between them (e.g. the same noises sampled without and with a guidance)."""
    grids = [make_grid(images, rows, scale) for images in sheets]
    if not grids or len({g.shape for g in grids}) != 1:
        raise ValueError(
            f"side-by-side grids need one or more sheets of the same shape, got {[tuple(s.shape) for s in sheets]}"
        )
    space = torch.full((grids[0].shape[0], int(gap), grids[0].shape[2]), 255, dtype=torch.uint8)
    parts = [part for g in grids for part in (space, g)][1:]
    return _write(torch.cat(parts, dim=1), path)
