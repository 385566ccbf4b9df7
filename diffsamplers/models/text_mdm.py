"""The bundled character-level masked diffusion language model: a small time-agnostic bidirectional transformer.

**Network.** :class:`TextMDM` maps a sequence of token ids ``x`` (B, L) — real symbols ``0 … V − 1`` and the mask
``V`` — to logits (B, L, V) of p_θ(x_0^ℓ | x_t) over the V real symbols at every position. It takes no time input:
the optimal masked-diffusion denoiser depends on x_t only, not on t (Zheng et al. 2024, "Masked Diffusion Models
are Secretly Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling", arXiv:2409.02908, Prop. 3.2;
MDLM's OpenWebText model also runs with ``time_conditioning=False``), so ``t`` is accepted and ignored. Token
embedding with an extra row for the mask, pre-LayerNorm encoder blocks (bidirectional scaled-dot-product attention
with rotary position embeddings, Su et al. 2021, + GELU MLP), a final LayerNorm and a linear head. Rotary rather
than learned absolute positions: the score of a pair depends on its offset only, which a character model trained on
random windows needs, and it learns local structure in far fewer steps on a CPU budget. The logits at
unmasked positions are the network's raw output: samplers copy unmasked tokens (MDLM's carry-over, Sahoo et al.
2024, Sec. 3.2.2) and the loss ignores them.

**Objective** (:func:`mdlm_loss`). The continuous-time negative ELBO of masked diffusion (Sahoo et al. 2024, "Simple
and Effective Masked Diffusion Language Models", arXiv:2406.07524, Eq. 10–11; Shi et al. 2024, "Simplified and
Generalized Masked Diffusion for Discrete Data", arXiv:2406.04329, Eq. 5): with α_t = 1 − m(t) the probability
that a token is still clean at time t,

    NELBO(x_0) = ∫₀¹ −α'_t / (1 − α_t) · E_{x_t ∼ q(·|x_0)} [ Σ_{ℓ : x_t^ℓ = mask} −log p_θ(x_0^ℓ | x_t) ] dt
               = ∫₀¹ m'(t) / m(t) · E[ Σ_{masked ℓ} −log p_θ(x_0^ℓ | x_t) ] dt,

and for the linear schedule m(t) = t the weight m'(t)/m(t) is 1/t. Training draws one t per sequence from a
low-discrepancy grid (t_i = ε + (1 − ε)·((u + i/B) mod 1), Sahoo et al. 2024 Sec. 4 / Kingma et al. 2021), masks each
token independently with probability t, and averages the weighted cross-entropy per character.

**Held-out NELBO** (:func:`masked_count_nelbo`). Conditioning on the number n of masked tokens (|S| = n has
probability C(L, n) tⁿ (1 − t)^{L−n} and ∫₀¹ t⁻¹ C(L, n) tⁿ (1 − t)^{L−n} dt = 1/n) gives the same NELBO as
Σ_{n=1}^{L} E_{|S| = n}[ (1/n) Σ_{ℓ∈S} −log p_θ(x_0^ℓ | x_{¬S}) ] — the order-agnostic form of Zheng et al. 2024,
Prop. 3.1 (Hoogeboom et al. 2022, ARDM). Per character it is the mean over n uniform in {1 … L} of the mean
cross-entropy over a uniformly random set of n masked positions: an unbiased estimate without the 1/t weight's
variance, used for the held-out bits per character.

**Files.** :func:`save_text_mdm` writes ``model.safetensors`` (weights; the architecture in its header) and
``config.json`` (architecture, vocabulary, training settings, metrics); :func:`load_text_mdm` reads them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import ArtifactError, atomic_write_text, load_artifact, save_artifact
from ..data.text import CharVocab

__all__ = [
    "TEXT_MDM_DIR",
    "TEXT_MDM_KIND",
    "TextMDM",
    "TextMDMConfig",
    "load_text_mdm",
    "low_discrepancy_times",
    "masked_count_nelbo",
    "mdlm_loss",
    "save_text_mdm",
]

#: Where the bundled text model ships.
TEXT_MDM_DIR = Path(__file__).resolve().parent.parent / "assets" / "text_mdm"
#: The ``kind`` of its safetensors file (:mod:`diffsamplers.artifacts`).
TEXT_MDM_KIND = "text_mdm"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_SCRIPT = "scripts/train_text_mdm.py"


@dataclass(frozen=True)
class TextMDMConfig:
    """Hyperparameters of :class:`TextMDM`: V real symbols (the mask is id V), the context length L, the width,
    depth and heads of the transformer and the MLP's expansion factor."""

    vocab_size: int
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be an even multiple of n_heads ({self.n_heads}): rotary embeddings "
                "rotate pairs of channels"
            )


def _rotary(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables (length, head_dim / 2) of rotary position embeddings (Su et al. 2021, RoFormer, Eq. 34)."""
    freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angle = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freq
    return angle.cos(), angle.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of channels of (…, L, head_dim) queries or keys by the position's angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class _Block(nn.Module):
    """Pre-LayerNorm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)); attention is bidirectional, with rotary
    position embeddings on queries and keys (the attention score depends on relative position)."""

    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        a = F.scaled_dot_product_attention(q, k, v)  # no mask: every position sees every other
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class TextMDM(nn.Module):
    """p_θ(x_0 | x_t): (B, L) token ids (mask = V) → (B, L, V) logits; time-agnostic (``t`` is ignored).

    Inputs are checked: a non-integer tensor, a shape other than (B, L), L above the context length, or an id
    outside [0, V] → ``ValueError`` naming the value. The id check costs one host–device synchronisation per call
    (a reduction read back to raise the error); set ``check_inputs = False`` to skip it in a tight loop on inputs
    known to be valid.
    """

    time_conditioned = False

    def __init__(self, config: TextMDMConfig):
        super().__init__()
        self.config = config
        self.check_inputs = True
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size + 1, d)  # the last row embeds the mask
        self.blocks = nn.ModuleList(_Block(d, config.n_heads, config.mlp_ratio) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaling of the residual projections by 1/√(2 · depth)
            for proj in (block.proj, block.mlp[-1]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def vocab_size(self) -> int:
        """V, the number of real symbols."""
        return self.config.vocab_size

    @property
    def mask_id(self) -> int:
        """The mask token's id, V."""
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def check(self, x: torch.Tensor) -> None:
        """``ValueError`` naming the value for a bad input (see the class docstring)."""
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"the text model takes integer token ids, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"the text model takes (B, L) token ids with L ≥ 1, got shape {tuple(x.shape)}")
        if x.shape[1] > self.context_length:
            raise ValueError(
                f"a sequence of length {x.shape[1]} is longer than the model's context of {self.context_length}"
            )
        if self.check_inputs:
            bad = (x < 0) | (x > self.mask_id)
            if bool(bad.any()):
                value = int(x[bad][0])
                raise ValueError(
                    f"token id {value} is outside [0, {self.mask_id}] (V = {self.vocab_size} symbols, mask id "
                    f"{self.mask_id})"
                )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B, L, V) logits of p_θ(x_0^ℓ | x) over the V real symbols; ``t`` is ignored (time-agnostic)."""
        self.check(x)
        x = x.long()
        rotary = _rotary(x.shape[1], self.config.d_model // self.config.n_heads, x.device)
        h = self.token_embedding(x)
        for block in self.blocks:
            h = block(h, rotary)
        return self.head(self.norm(h))


def low_discrepancy_times(batch_size: int, generator: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """(B,) times t_i = ε + (1 − ε)·((u + i/B) mod 1), u ∼ U(0, 1) from ``generator``: one stratum of [ε, 1] per
    sequence (the low-discrepancy sampler of Kingma et al. 2021, App. I.1, used by Sahoo et al. 2024, Sec. 4)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    u = torch.rand((), generator=generator, device=generator.device)
    grid = torch.arange(int(batch_size), device=generator.device, dtype=torch.float32) / int(batch_size)
    return eps + (1.0 - eps) * torch.remainder(u + grid, 1.0)


def mdlm_loss(
    model: Any,
    x0: torch.Tensor,
    generator: torch.Generator,
    eps: float = 1e-3,
    mask_id: int | None = None,
) -> torch.Tensor:
    """The MDLM training loss of clean sequences ``x0`` (B, L): the continuous-time NELBO per character in nats,
    for the linear schedule m(t) = t (Sahoo et al. 2024, Eq. 10–11; Shi et al. 2024, Eq. 5):

        (1 / (B L)) Σ_b (1 / t_b) Σ_{ℓ masked in x_t^b} −log p_θ(x_0^{b,ℓ} | x_t^b),

    the ELBO weight −α'_t / (1 − α_t) = m'(t) / m(t) = 1/t. t_b from :func:`low_discrepancy_times` on [ε, 1]
    (MDLM's ``sampling_eps``; the dropped [0, ε] changes the expectation by at most about ε per character times the
    cross-entropy), each token masked independently with probability t_b; all draws from ``generator``, which must
    live on ``x0``'s device. ``model(x_t, t)`` → (B, L, V) logits; ``mask_id`` defaults to ``model.mask_id``.
    """
    mask_id = int(model.mask_id if mask_id is None else mask_id)
    b, n = x0.shape
    t = low_discrepancy_times(b, generator, eps).to(x0.device)
    masked = torch.rand((b, n), generator=generator, device=generator.device).to(x0.device) < t[:, None]
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(x_t, t)
    nll = F.cross_entropy(logits.float().reshape(b * n, -1), x0.reshape(-1), reduction="none").view(b, n)
    return (nll * masked / t[:, None]).sum() / (b * n)


@torch.no_grad()
def masked_count_nelbo(
    model: Any,
    x0: torch.Tensor,
    generator: torch.Generator,
    mask_id: int | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) unbiased estimates of the NELBO per character (nats) of each sequence of ``x0`` (B, L), in the masked-count
    form (Zheng et al. 2024, Prop. 3.1): n_b masked positions chosen uniformly at random, the mean cross-entropy over
    them. ``counts`` (B,) fixes n_b ∈ {1 … L}; by default they are stratified over the batch,
    n_b = 1 + ⌊L (u + b/B) mod L⌋ with u ∼ U(0, 1), so a batch of B ≥ L sequences visits every count. The same model
    under :func:`mdlm_loss` has the same expectation. ``t`` passed to the model is n_b / L."""
    mask_id = int(model.mask_id if mask_id is None else mask_id)
    b, n = x0.shape
    dev = generator.device
    if counts is None:
        u = torch.rand((), generator=generator, device=dev)
        counts = 1 + torch.floor(torch.remainder(u + torch.arange(b, device=dev) / b, 1.0) * n).long()
    counts = torch.as_tensor(counts, device=dev).long()
    if counts.shape != (b,) or bool(((counts < 1) | (counts > n)).any()):
        raise ValueError(f"counts must be (B,) = ({b},) integers in [1, {n}], got {counts.tolist()}")
    ranks = torch.rand((b, n), generator=generator, device=dev).argsort(dim=1).argsort(dim=1)
    masked = (ranks < counts[:, None]).to(x0.device)  # a uniformly random subset of n_b positions
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(x_t, counts.to(x0.device).float() / n)
    nll = F.cross_entropy(logits.float().reshape(b * n, -1), x0.reshape(-1), reduction="none").view(b, n)
    return (nll * masked).sum(dim=1) / counts.to(x0.device)


def save_text_mdm(model: TextMDM, vocab: CharVocab, folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` (weights, kind and architecture in the header) and ``folder/config.json``
    (``{"architecture", "vocab", **metadata}``), each atomically."""
    if vocab.size != model.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.size} symbols, the model {model.vocab_size}")
    root = Path(folder)
    arch = asdict(model.config)
    save_artifact(root / _WEIGHTS, dict(model.state_dict()), {"kind": TEXT_MDM_KIND, "architecture": arch})
    config = {"architecture": arch, "vocab": vocab.symbols, **metadata}
    atomic_write_text(root / _CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return root


def load_text_mdm(
    folder: str | Path | None = None, device: str | torch.device | None = None
) -> tuple[TextMDM, CharVocab, dict[str, Any]]:
    """(model in eval mode without weight gradients, its vocabulary, its ``config.json``) from ``folder`` (default:
    the bundled :data:`TEXT_MDM_DIR`). ``FileNotFoundError`` names a missing file and the script that makes it;
    ``ArtifactError`` when the files do not belong together."""
    root = Path(folder) if folder is not None else TEXT_MDM_DIR
    for name in (_WEIGHTS, _CONFIG):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"no text model at {root}: {root / name} is missing (train one with `python {_SCRIPT}`)"
            )
    metadata = json.loads((root / _CONFIG).read_text())
    try:
        config = TextMDMConfig(**metadata["architecture"])
        vocab = CharVocab(str(metadata["vocab"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{root / _CONFIG} is not a text model config ({err!r})") from None
    if vocab.size != config.vocab_size:
        raise ArtifactError(f"{root / _CONFIG}: {vocab.size} vocabulary symbols but vocab_size {config.vocab_size}")
    tensors, header = load_artifact(root / _WEIGHTS, kind=TEXT_MDM_KIND)
    if header.get("architecture") != asdict(config):
        raise ArtifactError(
            f"{root / _WEIGHTS} (architecture {header.get('architecture')}) does not match {root / _CONFIG} "
            f"(architecture {asdict(config)})"
        )
    model = TextMDM(config)
    model.load_state_dict(tensors)
    model.requires_grad_(False)
    model = model.eval()
    return (model.to(device) if device is not None else model), vocab, metadata
