"""Random streams for sampling: one generator for the whole batch, or one seed per sample.

With per-sample seeds each sample owns a generator and draws its initial noise and then its step noise
from it in order, so a sample's result does not depend on the batch or chunk it ran in. Noise is drawn in
float32 and cast, so float32 and float64 runs start from the same x_T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NoiseSource"]


class NoiseSource:
    """Draws standard normal noise for rows ``start:stop`` of a batch.

    Args:
        generator: one ``torch.Generator`` for the whole batch (draws depend on the batch layout).
        seeds: one integer seed per sample (draws independent of the batch layout).
        generator_device: where per-sample generators live; CPU (the default) gives the same numbers on
            every machine.
    """

    def __init__(
        self,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
        generator_device: str | torch.device = "cpu",
    ):
        if generator is not None and seeds is not None:
            raise ValueError("pass either a generator or per-sample seeds, not both")
        self.generator = generator
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.generator_device = torch.device(generator_device)
        self._per_sample: dict[int, torch.Generator] = {}
        self._substreams: dict[str, NoiseSource] = {}

    def substream(self, key: str) -> NoiseSource:
        """An independent stream named ``key`` (e.g. a guidance's own draws), the same object on every call.

        Per-sample seeds give per-sample substreams (seeded from the sample's seed and ``key``), so a guidance's
        draws neither depend on the batch nor shift the solver's noise; one generator gives one derived generator.
        """
        cached = self._substreams.get(key)
        if cached is not None:
            return cached
        salt = _stable_hash(key)
        if self.seeds is not None:
            sub = NoiseSource(seeds=[_mix(seed, salt) for seed in self.seeds], generator_device=self.generator_device)
        elif self.generator is not None:
            gen = torch.Generator(device=self.generator.device).manual_seed(_mix(self.generator.initial_seed(), salt))
            sub = NoiseSource(generator=gen, generator_device=self.generator_device)
        else:
            sub = NoiseSource(generator_device=self.generator_device)
        self._substreams[key] = sub
        return sub

    def _sample_generator(self, index: int) -> torch.Generator:
        gen = self._per_sample.get(index)
        if gen is None:
            assert self.seeds is not None
            gen = torch.Generator(device=self.generator_device).manual_seed(self.seeds[index])
            self._per_sample[index] = gen
        return gen

    def draw(
        self, start: int, stop: int, sample_shape: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """A (stop − start, *sample_shape) tensor of N(0, 1) noise on ``device`` in ``dtype``."""
        shape = (stop - start, *sample_shape)
        if self.seeds is not None:
            if stop > len(self.seeds):
                raise ValueError(f"{len(self.seeds)} seeds given for a batch of at least {stop} samples")
            rows = [
                torch.randn(tuple(sample_shape), generator=self._sample_generator(i), device=self.generator_device)
                for i in range(start, stop)
            ]
            out = torch.stack(rows)
        elif self.generator is not None:
            out = torch.randn(shape, generator=self.generator, device=self.generator.device)
        else:
            out = torch.randn(shape, device=device)
        return out.to(device=device, dtype=dtype)


def _stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same in every process (Python's ``hash`` of a str is salted)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _mix(seed: int, salt: int) -> int:
    """A 63-bit seed from a seed and a salt (SplitMix64's finaliser), so nearby seeds give unrelated streams."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + salt) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
