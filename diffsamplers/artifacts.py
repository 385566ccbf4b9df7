"""Files written by long jobs (learned schedules, data statistics, optimiser checkpoints): safetensors with the
metadata as JSON in the header, written atomically so that an interruption never leaves a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_artifact", "load_artifact", "atomic_write_text"]

_KEY = "diffsamplers"


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_artifact(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Save ``tensors`` and JSON-serialisable ``metadata`` (tagged with ``kind``) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    header = json.dumps({"kind": kind, **metadata})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata={_KEY: header}))
    return path


def load_artifact(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_artifact`; raises if it is missing or of another kind."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(_KEY)
        if header is None:
            raise ValueError(f"{path} is not a diffsamplers file (no '{_KEY}' metadata)")
        meta = json.loads(header)
        if meta.get("kind") != kind:
            raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("kind")
    return tensors, meta
