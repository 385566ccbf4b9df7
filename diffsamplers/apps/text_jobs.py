"""``diffsamplers sample --model text`` and ``diffsamplers eval --model text``: the bundled masked diffusion language
model with the first-hitting and ancestral samplers.

``sample`` prints samples (one per line, the mask shown as ▒ where a sampler left one). ``eval`` compares the
samplers of :mod:`diffsamplers.masked.samplers` at equal sample quality: the first-hitting sampler (FHS; Zheng et al.
2024, arXiv:2409.02908, Alg. 1) and its parallel variant, against MDLM's ancestral sampler on T steps (Sahoo et al.
2024) with its model-call cache, each with categorical sampling in float64 and in float32 (the truncated Gumbel noise
of float32 code, Zheng et al.'s second finding). Quality is measured on the samples' text by a character 5-gram
model with Kneser–Ney smoothing fitted on the corpus's training split (:mod:`diffsamplers.metrics.ngram`:
bits per character, lower = closer to the corpus) and by the unigram entropy of the characters (bits; a sampler
with a lowered effective temperature has a lower entropy); the held-out text gives the reference row. Wall time
includes the model calls and the categorical sampling; NFE is the number of model calls per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .recipes import parse_guidance, parse_solver
from .registry import MaskedModelBundle

__all__ = ["DEFAULT_TEXT_METHODS", "format_text_table", "run_text_eval", "sample_text"]

#: (name, sampler spec, steps, categorical dtype) of ``eval --model text``.
DEFAULT_TEXT_METHODS: list[tuple[str, str, int, str]] = [
    ("first-hitting", "first-hitting", 0, "float64"),
    ("first-hitting", "first-hitting", 0, "float32"),
    ("first-hitting, 4 tokens per call", "first-hitting:k=4", 0, "float64"),
    ("ancestral, T = 128", "ancestral", 128, "float64"),
    ("ancestral, T = 1024", "ancestral", 1024, "float64"),
    ("ancestral, T = 1024", "ancestral", 1024, "float32"),
]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def sample_text(
    bundle: MaskedModelBundle,
    sampler: str,
    steps: int,
    count: int,
    seed: int = 0,
    dtype: str = "float64",
    guidance: str | None = None,
) -> tuple[list[str], int, float]:
    """``count`` samples of the model's context length as text, the NFE and the seconds, with the sampler spec
    ``sampler`` (``first-hitting[:k=K]`` or ``ancestral`` on ``steps`` steps) and categorical sampling in ``dtype``;
    ``guidance``: an ``fk-steering:…`` or ``svdd:…`` spec (:func:`~diffsamplers.apps.recipes.parse_guidance`) with a
    reward on token ids such as ``text-chars:digit``, run by
    :class:`~diffsamplers.guidance.masked.GuidedMaskedSampler`."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown categorical dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    if count < 1:
        raise ValueError(f"the number of samples must be at least 1, got {count}")
    recipe = parse_solver(sampler)
    method = recipe.build_masked(steps)
    if guidance:
        from ..guidance.masked import GuidedMaskedSampler

        parsed = parse_guidance(guidance)
        hooks = parsed.build(bundle)
        if parsed.scale is not None or len(hooks) != 1:
            raise ValueError(f"a masked model takes one fk-steering or svdd guidance, got {guidance!r}")
        method = GuidedMaskedSampler(method, hooks[0])
    diffusion = replace(bundle.diffusion, dtype=_DTYPES[dtype])
    model = diffusion.model
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(int(seed))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    with torch.no_grad():
        x = diffusion.all_masked(count, bundle.sequence_length, device)
        out = method.sample(diffusion, x, generator=generator)
        sync()
    seconds = time.perf_counter() - began
    return bundle.vocab.decode_batch(out.tokens.cpu()), int(out.nfe), seconds


def run_text_eval(
    bundle: MaskedModelBundle,
    num_samples: int = 64,
    seed: int = 0,
    methods: Sequence[tuple[str, str, int, str]] | None = None,
    select: str | None = None,
) -> dict[str, Any]:
    """Every method's wall time, NFE, n-gram bits per character and unigram entropy of ``num_samples`` samples."""
    from ..data.text import split_text
    from ..metrics.ngram import reference_ngram, unigram_entropy

    methods = list(methods or DEFAULT_TEXT_METHODS)
    if select:
        methods = [m for m in methods if select.lower() in m[0].lower()]
        if not methods:
            raise ValueError(f"no method matches {select!r}")
    ngram = reference_ngram()
    length = bundle.sequence_length
    held = split_text("held_out")
    windows = [held[i : i + length] for i in range(0, len(held) - length + 1, length)]
    report: dict[str, Any] = {
        "model": bundle.name,
        "num_samples": num_samples,
        "sequence_length": length,
        "seed": seed,
        "metric": "bits per character under a character 5-gram (Kneser–Ney) of the training split; unigram entropy "
        "of the characters in bits",
        "held_out": {
            "ngram_bits_per_char": ngram.bits_per_char(windows),
            "unigram_entropy": unigram_entropy(windows),
            "windows": len(windows),
        },
        "rows": [],
    }
    for name, spec, steps, dtype in methods:
        texts, nfe, seconds = sample_text(bundle, spec, steps, num_samples, seed, dtype)
        report["rows"].append(
            {
                "name": name,
                "sampler": spec,
                "steps": steps or None,
                "dtype": dtype,
                "nfe": nfe,
                "seconds": seconds,
                "ngram_bits_per_char": ngram.bits_per_char(texts),
                "unigram_entropy": unigram_entropy(texts),
                "example": texts[0],
            }
        )
    return report


def format_text_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table, the held-out text last."""
    lines = [
        "| sampler | categorical | NFE | seconds | 5-gram bits/char | unigram entropy |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | {row['dtype']} | {row['nfe']} | {row['seconds']:.2f} | "
            f"{row['ngram_bits_per_char']:.3f} | {row['unigram_entropy']:.3f} |"
        )
    held = report["held_out"]
    lines.append(
        f"| held-out text ({held['windows']} windows) | — | — | — | {held['ngram_bits_per_char']:.3f} | "
        f"{held['unigram_entropy']:.3f} |"
    )
    return "\n".join(lines)
