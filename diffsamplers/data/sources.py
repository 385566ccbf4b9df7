"""Data sources for the methods that need real data (Align Your Steps optimisation, Gaussian statistics).

A data source is a tensor of clean samples ``(N, *shape)``, a pair ``(samples, labels)`` of tensors, or any
iterable of batches — tensors, ``(samples, labels)`` pairs or ``{"x": samples, ...}`` mappings (e.g. a torch
``DataLoader``). :func:`iter_batches` turns any of them into ``(x0, cond)`` batches, ``cond`` being ``None``
or ``{"class_labels": labels}``; :func:`take` collects a fixed number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["DataSource", "iter_batches", "take"]

DataSource = torch.Tensor | tuple | Iterable[Any]
Batch = tuple[torch.Tensor, dict[str, torch.Tensor] | None]


def _split(item: Any) -> Batch:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, Mapping):
        x = item.get("x", item.get("images", item.get("sample")))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a mapping batch needs an 'x' tensor, got keys {sorted(item)}")
        labels = item.get("class_labels", item.get("labels"))
        return x, (None if labels is None else {"class_labels": labels})
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        labels = item[1]
        return item[0], (None if labels is None else {"class_labels": torch.as_tensor(labels)})
    raise TypeError(
        f"cannot read a batch from {type(item).__name__}: expected a tensor, (samples, labels) or a mapping"
    )


def iter_batches(data: DataSource, batch_size: int = 1024) -> Iterator[Batch]:
    """``(x0, cond)`` batches of a data source (see the module docstring)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(data, torch.Tensor) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].ndim >= 2
    ):
        x, cond = _split(data)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"data must have shape (N, *sample_shape) with N > 0, got {tuple(x.shape)}")
        for start in range(0, x.shape[0], batch_size):
            stop = start + batch_size
            yield x[start:stop], (None if cond is None else {k: v[start:stop] for k, v in cond.items()})
        return
    for item in data:
        yield _split(item)


def take(data: DataSource, n: int, seed: int | None = 0) -> Batch:
    """``n`` samples (and their labels): a seeded random subset of a tensor source, the first ``n`` of a stream."""
    if n <= 0:
        raise ValueError(f"need a positive number of samples, got {n}")
    if isinstance(data, torch.Tensor) or (isinstance(data, tuple) and isinstance(data[0], torch.Tensor)):
        x, cond = _split(data)
        if n > x.shape[0]:
            raise ValueError(f"asked for {n} samples but the data has {x.shape[0]}")
        idx = (
            torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n] if seed is not None else None
        )
        if idx is None:
            return x[:n], (None if cond is None else {k: v[:n] for k, v in cond.items()})
        return x[idx], (None if cond is None else {k: v[idx] for k, v in cond.items()})
    xs, conds, count = [], [], 0
    for x, cond in iter_batches(data):
        xs.append(x)
        conds.append(cond)
        count += x.shape[0]
        if count >= n:
            break
    if count < n:
        raise ValueError(f"asked for {n} samples but the data stream ended after {count}")
    x = torch.cat(xs)[:n]
    if any(c is None for c in conds):
        return x, None
    return x, {k: torch.cat([c[k] for c in conds])[:n] for k in conds[0]}
