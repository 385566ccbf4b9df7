"""Files written by long jobs (learned ratios and schedules, regressions, data statistics, optimiser
checkpoints, cached trajectories): safetensors + JSON metadata.

A file holds named tensors and one JSON document (stored in the safetensors header under ``"diffsamplers"``),
so the numbers and their description cannot drift apart. Writes are atomic — a temporary file in the same
directory, flushed and renamed over the target — so an interrupted job leaves either the previous file or
the new one, never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_artifact", "load_artifact", "atomic_write_text", "ArtifactError"]

_KEY = "diffsamplers"


class ArtifactError(ValueError):
    """A file is missing, is not one of ours, or describes something else than what it is used for."""


def _atomic_replace(path: Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON-serialisable ``metadata`` (with its ``"kind"``) to ``path``."""
    from safetensors.torch import save_file

    header = {_KEY: json.dumps(metadata, sort_keys=True)}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic_replace(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=header))


def load_artifact(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_artifact`; ``kind`` checks its ``metadata["kind"]``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"{path} is not a safetensors file ({err})") from None
    if _KEY not in header:
        raise ArtifactError(f"{path} has no diffsamplers metadata")
    metadata = json.loads(header[_KEY])
    if kind is not None and metadata.get("kind") != kind:
        raise ArtifactError(f"{path} holds {metadata.get('kind')!r}, not {kind!r}")
    return tensors, metadata
