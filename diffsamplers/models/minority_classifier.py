"""The minority classifier p_ψ(l̃ | x_t, t) of minority guidance, and its files.

Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion Models", ICLR 2024 (arXiv:2301.12334),
Sec. 3.2: a classifier of the *quantised minority score* l̃ ∈ {0, …, L − 1} of a clean sample (Eq. 6; a higher
level is a more unique sample, see :mod:`diffsamplers.tuning.minority`), trained on noised samples x_t at
uniformly drawn noise levels with cross-entropy, exactly as a noise-aware class classifier for classifier guidance
(Dhariwal & Nichol 2021). Its gradient ∇ₓ log p_ψ(l̃ | x_t) steers sampling (Eq. 8,
:class:`diffsamplers.guidance.minority.MinorityGuidance`).

The official classifier is a small ADM encoder on top of a frozen ImageNet noisy classifier; for the bundled
16×16 digits :class:`MinorityClassifier` is a compact convolutional network conditioned on the noise level
through FiLM (per-channel scale and shift from an embedding of log σ̃, σ̃ = σ/α). Conditioning on log σ̃ rather
than on a step index makes the classifier indifferent to respacing: the paper's pitfall of mapping respaced
indices back to the 1000-step index (their ``SpacedDiffusion`` wrapper) does not arise.

A classifier belongs to one diffusion model and one quantisation: its ``config.json`` records the model's id
(:func:`network_id`, a hash of the network's weights), the number of levels L, the thresholds, the perturbation
level and the distance the scores were computed with. :func:`load_minority_classifier` refuses a file made for
another model or another L, naming both values.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import ArtifactError, atomic_write_text, load_artifact, save_artifact

__all__ = [
    "CLASSIFIER_KIND",
    "MINORITY_SUFFIX",
    "MinorityClassifier",
    "MinorityClassifierInfo",
    "default_minority_dir",
    "load_minority_classifier",
    "network_id",
    "save_minority_classifier",
]

#: The ``kind`` of a minority classifier's safetensors file (:mod:`diffsamplers.artifacts`).
CLASSIFIER_KIND = "minority_classifier"
#: A model folder ``…/NAME`` ships its minority classifier in the sibling folder ``…/NAME_minority``.
MINORITY_SUFFIX = "_minority"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def network_id(network: Any) -> str:
    """A short id of a network's weights: the first 16 hex digits of the SHA-256 of its state dict (names, dtypes,
    shapes and bytes, in name order). Two networks with the same id compute the same function."""
    if not isinstance(network, nn.Module):
        raise TypeError(f"a model id is a hash of a torch network's weights; got {type(network).__name__}")
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def default_minority_dir(model_folder: str | Path) -> Path:
    """Where the minority classifier of the model in ``model_folder`` ships: the sibling ``<name>_minority``."""
    folder = Path(model_folder)
    return folder.parent / f"{folder.name}{MINORITY_SUFFIX}"


class _FiLMBlock(nn.Module):
    """conv 3×3 → GroupNorm → (1 + scale)·h + shift from the noise embedding → SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)
        self.film = nn.Linear(embed_dim, 2 * cout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return nn.functional.silu(self.norm(self.conv(h)) * (1 + scale) + shift)


class MinorityClassifier(nn.Module):
    """p_ψ(l̃ | x_t, σ̃): logits over L minority levels of a noised image x_t at noise level σ̃ = σ/α.

    Five FiLM blocks (channels w, 2w, 2w, 3w, 3w; strides 1, 2, 1, 2, 2) take a 16×16 image to 2×2, a linear
    head gives the L logits. The noise level enters as Fourier features of log σ̃ through a two-layer MLP.
    ``x`` is the sampler's own x_t = α x0 + σ ε (not rescaled).
    """

    def __init__(
        self, num_levels: int, in_channels: int = 1, image_size: int = 16, width: int = 24, embed_dim: int = 64
    ):
        super().__init__()
        if int(num_levels) < 2:
            raise ValueError(f"a minority classifier needs at least 2 levels, got {num_levels}")
        if image_size % 8:
            raise ValueError(f"the image size must be a multiple of 8, got {image_size}")
        self.config = {
            "num_levels": int(num_levels),
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "width": int(width),
            "embed_dim": int(embed_dim),
        }
        self.num_levels = int(num_levels)
        self.register_buffer("frequencies", torch.logspace(math.log10(0.05), math.log10(5.0), embed_dim // 4))
        self.embed = nn.Sequential(nn.Linear(embed_dim // 2, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        channels = [in_channels, width, 2 * width, 2 * width, 3 * width, 3 * width]
        strides = [1, 2, 1, 2, 2]
        self.blocks = nn.ModuleList(
            _FiLMBlock(channels[i], channels[i + 1], strides[i], embed_dim) for i in range(len(strides))
        )
        self.head = nn.Linear(channels[-1] * (image_size // 8) ** 2, self.num_levels)

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"the minority classifier takes (N, {c}, {s}, {s}) samples, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, log_sigma_tilde: torch.Tensor | float) -> torch.Tensor:
        """(N, L) logits of x_t at noise level log σ̃ (a number, or one per sample)."""
        self._check(x)
        level = torch.as_tensor(log_sigma_tilde, dtype=x.dtype, device=x.device).reshape(-1)
        level = level.expand(x.shape[0]) if level.numel() == 1 else level
        phase = level[:, None] * self.frequencies.to(x.dtype)
        h, emb = x, self.embed(torch.cat([phase.sin(), phase.cos()], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h.flatten(1))


@dataclass(frozen=True)
class MinorityClassifierInfo:
    """What a minority classifier was trained for (its ``config.json`` beside the network's hyperparameters).

    ``model_id`` is :func:`network_id` of the diffusion network whose minority scores made the labels,
    ``model`` its name; ``thresholds`` the L − 1 equal-frequency boundaries of the scores
    (:func:`~diffsamplers.tuning.minority.minority_levels`); ``time`` the normalised perturbation time s of the
    score, ``num_draws`` its Monte-Carlo draws and ``distance`` its distance; ``metrics`` the training report.
    """

    model: str
    model_id: str
    num_levels: int
    thresholds: tuple[float, ...]
    time: float
    num_draws: int
    distance: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def check(self, *, model_id: str | None = None, num_levels: int | None = None, source: str = "") -> None:
        """Raise ``ValueError`` naming the value when the classifier is for another model or level count."""
        where = f"the minority classifier {source}" if source else "the minority classifier"
        if model_id is not None and model_id != self.model_id:
            raise ValueError(
                f"{where} was trained for model {self.model!r} (model id {self.model_id}), not for this model "
                f"(model id {model_id}): its levels are quantiles of another model's minority scores; train one "
                "for this model with scripts/train_minority_classifier.py"
            )
        if num_levels is not None and int(num_levels) != self.num_levels:
            raise ValueError(f"{where} has {self.num_levels} minority levels, not {int(num_levels)}")


def save_minority_classifier(model: MinorityClassifier, path: str | Path, info: MinorityClassifierInfo) -> Path:
    """Write ``path/model.safetensors`` (weights, with kind, model id and L in its header) and
    ``path/config.json`` (hyperparameters and ``info``), each atomically."""
    if info.num_levels != model.num_levels or len(info.thresholds) != model.num_levels - 1:
        raise ValueError(
            f"the classifier has {model.num_levels} levels; info gives {info.num_levels} levels and "
            f"{len(info.thresholds)} thresholds (L − 1 = {model.num_levels - 1} expected)"
        )
    root = Path(path)
    header = {"kind": CLASSIFIER_KIND, "model_id": info.model_id, "num_levels": info.num_levels}
    save_artifact(root / _WEIGHTS, dict(model.state_dict()), header)
    config = {"architecture": model.config, **asdict(info), "thresholds": list(info.thresholds)}
    atomic_write_text(root / _CONFIG, json.dumps(config, indent=2) + "\n")
    return root


def load_minority_classifier(
    path: str | Path,
    *,
    model_id: str | None = None,
    num_levels: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[MinorityClassifier, MinorityClassifierInfo]:
    """The classifier in folder ``path`` (eval mode, no gradients of its weights) and what it was trained for.

    ``model_id`` (:func:`network_id` of the diffusion network it will guide) and ``num_levels`` are checked
    against the file: ``ValueError`` naming both values when they differ. ``FileNotFoundError`` names the missing
    file and the script that makes one.
    """
    root = Path(path)
    for name in (_WEIGHTS, _CONFIG):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"no minority classifier at {root}: {root / name} is missing "
                "(train one with scripts/train_minority_classifier.py)"
            )
    config = json.loads((root / _CONFIG).read_text())
    try:
        arch = config["architecture"]
        info = MinorityClassifierInfo(
            model=str(config["model"]),
            model_id=str(config["model_id"]),
            num_levels=int(config["num_levels"]),
            thresholds=tuple(float(v) for v in config["thresholds"]),
            time=float(config["time"]),
            num_draws=int(config["num_draws"]),
            distance=str(config["distance"]),
            metrics=dict(config.get("metrics", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{root / _CONFIG} is not a minority classifier config ({err!r})") from None
    info.check(model_id=model_id, num_levels=num_levels, source=str(root))
    tensors, header = load_artifact(root / _WEIGHTS, kind=CLASSIFIER_KIND)
    if header.get("model_id") != info.model_id or int(header.get("num_levels", -1)) != info.num_levels:
        raise ArtifactError(
            f"{root / _WEIGHTS} (model id {header.get('model_id')}, {header.get('num_levels')} levels) does not "
            f"match {root / _CONFIG} (model id {info.model_id}, {info.num_levels} levels)"
        )
    model = MinorityClassifier(**arch)
    model.load_state_dict(tensors)
    model.requires_grad_(False)
    model = model.eval()
    return (model.to(device) if device is not None else model), info
