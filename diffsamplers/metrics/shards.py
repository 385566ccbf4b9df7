"""Sample shards on disk: FID-scale sampling that survives interruption and splits across processes.

Sample index i always gets the same seed, so the images do not depend on how many processes (or machines)
share the work. Shard s holds indices [s·S, (s+1)·S) and belongs to process s mod P. Each shard is one
safetensors file — uint8 images, their features, indices and labels — written to a temporary name and
renamed, so a shard on disk is either complete or absent. A shard that fails to load or does not match the
run's configuration is reported and regenerated; finished shards are never redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .frechet import FeatureStats

__all__ = ["ShardRun", "sample_seed"]

logger = logging.getLogger(__name__)


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run seeded ``base_seed`` (distinct across base seeds)."""
    return (int(base_seed) * 0x9E3779B1 + int(index)) % (2**63)


@dataclass
class ShardRun:
    """``num_samples`` samples in shards of ``shard_size`` under ``directory`` for one configuration."""

    directory: Path
    num_samples: int
    shard_size: int
    config: dict[str, Any]

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        canonical = json.dumps(
            {**self.config, "num_samples": self.num_samples, "shard_size": self.shard_size}, sort_keys=True
        )
        self.config_hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard_{shard:06d}.safetensors"

    def shards_of(self, process_index: int, num_processes: int) -> list[int]:
        return [s for s in range(self.num_shards) if s % num_processes == process_index]

    # -- writing --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the directory and record the configuration; refuse a directory of another run."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "run.json"
        record = {
            "config": self.config,
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "config_hash": self.config_hash,
        }
        if meta.exists():
            previous = json.loads(meta.read_text())
            if previous.get("config_hash") != self.config_hash:
                raise ValueError(
                    f"{self.directory} holds samples of another configuration ({previous.get('config')}); "
                    "use a new output directory"
                )
            return
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, meta)

    def is_valid(self, shard: int) -> bool:
        path = self.shard_path(shard)
        if not path.exists():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                indices = f.get_tensor("indices")
                images = f.get_tensor("images")
                features = f.get_tensor("features")
                labels = f.get_tensor("labels")
            expected = self.shard_range(shard)
            ok = (
                meta.get("config_hash") == self.config_hash
                and indices.tolist() == list(expected)
                and images.dtype == torch.uint8
                and images.shape[0] == len(expected) == features.shape[0] == labels.shape[0]
                and bool(torch.isfinite(features).all())
            )
        except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt shard
            logger.warning("shard %s is corrupt (%s); regenerating it", path.name, err)
            return False
        if not ok:
            logger.warning("shard %s does not match this run; regenerating it", path.name)
        return ok

    def write(self, shard: int, images: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        from safetensors.torch import save_file

        expected = self.shard_range(shard)
        if images.dtype != torch.uint8 or images.shape[0] != len(expected):
            raise ValueError(
                f"shard {shard}: expected {len(expected)} uint8 images, got {images.dtype} {tuple(images.shape)}"
            )
        tensors = {
            "images": images.contiguous().cpu(),
            "features": features.double().contiguous().cpu(),
            "labels": labels.long().contiguous().cpu(),
            "indices": torch.tensor(list(expected), dtype=torch.long),
        }
        path = self.shard_path(shard)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"config_hash": self.config_hash, "shard": str(shard)})
        os.replace(tmp, path)

    def generate(
        self,
        make_images: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
        features: Callable[[torch.Tensor], torch.Tensor],
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
    ) -> list[int]:
        """Generate this process's missing shards; returns the shards it (re)generated.

        ``make_images(indices)`` returns (uint8 images, labels) for those sample indices.
        """
        from tqdm.auto import tqdm

        self.prepare()
        todo = [s for s in self.shards_of(process_index, num_processes) if not self.is_valid(s)]
        for shard in tqdm(todo, desc=f"shards (process {process_index})", disable=not progress):
            images, labels = make_images(list(self.shard_range(shard)))
            self.write(shard, images, features(images), labels)
        return todo

    # -- reading --------------------------------------------------------------------------------
    def load(self, key: str) -> torch.Tensor:
        """One tensor of every shard, concatenated in sample order (all shards must be present)."""
        from safetensors.torch import load_file

        missing = [s for s in range(self.num_shards) if not self.shard_path(s).exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) missing in {self.directory}, e.g. {missing[:5]}: run again to resume"
            )
        return torch.cat([load_file(str(self.shard_path(s)))[key] for s in range(self.num_shards)])

    def feature_stats(self) -> FeatureStats:
        features = self.load("features")
        return FeatureStats(features.shape[1]).update(features)
