"""DigitsPipeline with our and diffusers' schedulers, and the sample / fid commands, on a tiny random model."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from PIL import Image

from diffsamplers import DPMSolverPlusPlusScheduler
from diffsamplers.adapters import DigitsPipeline
from diffsamplers.apps.cli import main
from tests.metrics.test_shards import tiny_pipeline_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):  # noqa: F811
    p = DigitsPipeline.from_pretrained(tiny_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_our_scheduler_matches_diffusers_in_the_pipeline(pipe, guidance):
    config = pipe.scheduler.config
    out = {}
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        pipe.scheduler = cls.from_config(config)
        out[cls.__name__] = pipe([0, 3, 7], 8, guidance, generator=torch.Generator().manual_seed(0)).images
    assert out["DPMSolverPlusPlusScheduler"].shape == (3, 1, 16, 16)
    assert torch.allclose(out["DPMSolverPlusPlusScheduler"], out["DPMSolverMultistepScheduler"], atol=1e-5)


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_pipeline_runs_diffusers_schedulers(pipe, cls):
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    images = pipe([1, 2], 5, 2.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


def test_pipeline_rejects_bad_labels(pipe):
    with pytest.raises(ValueError, match="class_labels must be digits 0..9"):
        pipe([3, 10], 2)


def test_sample_command_writes_a_grid(tmp_path, tiny_pipeline_dir):  # noqa: F811
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_pipeline_dir),
                "--steps",
                "3",
                "--classes",
                "1,2,3",
                "--per-class",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    image = Image.open(out)
    assert image.size == (2 * 65 + 1, 3 * 65 + 1)  # 16 px × 4, 1 px padding


def test_sample_command_bad_class(tmp_path, tiny_pipeline_dir, capsys):  # noqa: F811
    assert (
        main(["sample", "--model", str(tiny_pipeline_dir), "--classes", "12", "--output", str(tmp_path / "x.png")]) == 2
    )
    assert capsys.readouterr().err.splitlines() == [
        "diffsamplers sample: error: --classes must be class labels in 0..9, got [12]"
    ]


def test_fid_command_runs_and_resumes(tmp_path, tiny_pipeline_dir, capsys):  # noqa: F811
    args = [
        "fid",
        "--model",
        str(tiny_pipeline_dir),
        "--steps",
        "2",
        "--num-samples",
        "6",
        "--shard-size",
        "3",
        "--metric",
        "module:tests.metrics.test_frechet_and_features:TinyFeatures",
        "--quiet",
    ]
    run = tmp_path / "new" / "run"  # its parent is created too
    assert main([*args, "--output", str(run)]) == 0
    first = json.loads((run / "result.json").read_text())
    assert first["num_samples"] == 6 and "frechet_distance" not in first  # no reference for a foreign model
    capsys.readouterr()
    assert main([*args, "--out", str(run)]) == 0  # the old flag; everything done: nothing regenerated, same result
    assert json.loads((run / "result.json").read_text()) == first
    assert "diffsamplers fid: warning: --out is deprecated, use --output" in capsys.readouterr().err


def test_sample_command_unconditional_model(tmp_path, capsys):
    """The exact mixture: no classes, guidance 1 by default, 12 samples in rows that they fill."""
    out = tmp_path / "gmm.png"
    assert main(["sample", "--model", "gmm", "--steps", "3", "--per-class", "12", "--output", str(out)]) == 0
    assert Image.open(out).size == (12 * 33 + 1, 33 + 1)  # 8 px × 4, 1 px padding
    assert "12 samples from gmm with dpm++2m, 3 steps (linspace), guidance 1, seed 0" in capsys.readouterr().out


def test_unknown_model_folder(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffsamplers sample: error: {tmp_path} is not a diffusers pipeline")


def test_eval_command_small_run(tmp_path, capsys):
    """The main job on the bundled model, reduced: two methods, one NFE, 20 samples."""
    args = [
        "eval",
        "--nfe",
        "4",
        "--num-samples",
        "20",
        "--methods",
        "2M",
        "--json",
        str(tmp_path / "e.json"),
        "--plot",
        str(tmp_path / "e.png"),
        "--quiet",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    names = [m["name"] for m in report["methods"]]
    assert "DPM-Solver++ 2M" in names and "diffusers DPM-Solver++ 2M" in names
    ours = next(m for m in report["methods"] if m["name"] == "DPM-Solver++ 2M")
    theirs = next(m for m in report["methods"] if m["name"] == "diffusers DPM-Solver++ 2M")
    # same solver, same grid, same per-sample seeds: the same samples (to float32 rounding)
    assert ours["fd_digits"]["4"] == pytest.approx(theirs["fd_digits"]["4"], rel=1e-3)
    assert report["held_out"]["class_accuracy"] >= 0.97
    assert report["guidance"] == "1" and report["guidance_scale"] == 1.0  # the default spec: no guidance
    for row in (ours, report["held_out"]):  # the k-NN metrics beside FD-digits, for the samples and the floor
        values = [row[m]["4"] if row is ours else row[m] for m in ("precision", "recall", "coverage")]
        assert all(0.0 <= v <= 1.0 for v in values)
        for metric in ("density", "avg_knn_distance", "within_class_diversity"):
            assert (row[metric]["4"] if row is ours else row[metric]) > 0
    assert (tmp_path / "e.png").stat().st_size > 5000
    out = capsys.readouterr().out
    assert "held-out digits (359)" in out and "# k-NN metrics vs the training digits" in out
