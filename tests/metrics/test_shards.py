"""Sharded sampling: resume, corrupt shards, configuration guard, and 1 vs 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffsamplers.adapters import DigitsPipeline
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.metrics import ModuleFeatures, ShardRun, sample_seed
from tests.metrics.test_frechet_and_features import TinyFeatures

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A class-conditional 16×16 pipeline folder with random weights (the digits layout, no training)."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        norm_num_groups=4,
    )
    path = tmp_path_factory.mktemp("tiny_pipeline")
    DigitsPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampler(tiny_pipeline_dir):
    source = load_model(str(tiny_pipeline_dir))
    return make_sampler(source, "dpm++2m", 3, batch_size=5)


def _run(path, features=None):
    return ShardRun(path, num_samples=12, shard_size=4, config={"test": 1})


def test_seeds_are_per_index_and_distinct():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(b, i) for b in range(3) for i in range(100)}) == 300


def test_resume_after_interruption_gives_identical_statistics(tmp_path, sampler):
    features = ModuleFeatures(TinyFeatures())
    full = _run(tmp_path / "full")
    full.generate(sampler, features, progress=False)
    calls = []

    def interrupted(indices):
        calls.append(indices[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sampler(indices)

    part = _run(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        part.generate(interrupted, features, progress=False)
    assert sorted(p.name for p in (tmp_path / "part").glob("shard_*")) == [
        "shard_000000.safetensors",
        "shard_000001.safetensors",
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "part").glob("shard_*")}
    redone = part.generate(sampler, features, progress=False)
    assert redone == [2]  # only the missing shard
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    a, b = full.feature_stats(), part.feature_stats()
    assert a.n == b.n == 12
    assert (a.mu == b.mu).all() and (a.sigma == b.sigma).all()
    assert torch.equal(full.load("images"), part.load("images"))


def test_corrupt_shard_is_detected_and_regenerated(tmp_path, sampler, caplog):
    features = ModuleFeatures(TinyFeatures())
    run = _run(tmp_path)
    run.generate(sampler, features, progress=False)
    before = run.load("images")
    path = run.shard_path(1)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        assert run.generate(sampler, features, progress=False) == [1]
    assert "corrupt" in caplog.text
    assert torch.equal(run.load("images"), before)


def test_directory_of_another_configuration_is_refused(tmp_path, sampler):
    _run(tmp_path).generate(sampler, ModuleFeatures(TinyFeatures()), progress=False)
    other = ShardRun(tmp_path, num_samples=12, shard_size=4, config={"test": 2})
    with pytest.raises(ValueError, match="holds samples of another configuration"):
        other.prepare()


def test_missing_shards_are_reported(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(FileNotFoundError, match="3 shard\\(s\\) missing"):
        run.load("images")


def test_images_do_not_depend_on_batch_size_or_chunk(tiny_pipeline_dir):
    source = load_model(str(tiny_pipeline_dir))
    a, la = make_sampler(source, "dpm++2m", 3, batch_size=7)(range(10))
    b, lb = make_sampler(source, "dpm++2m", 3, batch_size=3)(range(4, 10))
    assert torch.equal(la[4:], lb)
    assert (a[4:].int() - b.int()).abs().max() <= 1  # uint8 rounding of float32 matmuls of other batch sizes


def _eval_fid(args, out, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "scripts" / "eval_fid.py")
    if processes == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script]
    result = subprocess.run(
        cmd + args + ["--out", str(out), "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_one_and_two_processes_give_identical_images(tmp_path, tiny_pipeline_dir):
    from safetensors.torch import load_file

    args = [
        "--model",
        str(tiny_pipeline_dir),
        "--solver",
        "dpm++2m",
        "--steps",
        "3",
        "--num-samples",
        "12",
        "--shard-size",
        "3",
        "--batch-size",
        "3",
        "--metric",
        "module:tests.metrics.test_frechet_and_features:TinyFeatures",
        "--save-stats",
        str(tmp_path / "stats.npz"),
    ]
    one = _eval_fid(args, tmp_path / "one", processes=1)
    two = _eval_fid(args, tmp_path / "two", processes=2)
    assert one["num_samples"] == two["num_samples"] == 12
    for s in range(4):
        a = load_file(str(tmp_path / "one" / f"shard_{s:06d}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"shard_{s:06d}.safetensors"))
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # The saved statistics serve as reference: the same configuration is at distance ~0.
    again = _eval_fid(args[:-2] + ["--ref-stats", str(tmp_path / "stats.npz")], tmp_path / "two")
    assert again["frechet_distance"] == pytest.approx(0.0, abs=1e-9)
