"""Guidance in the jobs: ``sample --compare-unguided`` (unguided and guided grids from the same noises) and
``eval --guidance SPEC`` (named guidances in our solvers, diffusers' schedulers skipped, the spec recorded)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsamplers.apps import recipes
from diffsamplers.apps.cli import main
from diffsamplers.apps.digits_eval import KNN_METRICS, format_table, run_eval
from diffsamplers.guidance import Guidance, StepContext

pytestmark = pytest.mark.usefixtures("single_thread")


class _Shrink(Guidance):
    """A test guidance: x̂0 scaled by ``factor`` at every step."""

    def __init__(self, factor: float = 0.5):
        self.factor = float(factor)

    def guide_x0(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.factor * x0


@pytest.fixture
def shrink(monkeypatch):
    """``shrink[:factor=F]`` registered for this test only."""
    monkeypatch.setitem(recipes.GUIDANCES, "shrink", lambda bundle, **options: _Shrink(**options))
    return "shrink"


def _halves(path, gap: int = 16) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(path))
    width = (image.shape[1] - gap) // 2
    assert (image[:, width : width + gap] == 255).all()  # the white gap between the grids
    return image[:, :width], image[:, width + gap :]


@pytest.mark.parametrize(
    ("spec", "equal"), [("3+shrink:factor=0.5", False), ("shrink+2", False), ("3", True), (None, True)]
)
def test_compare_unguided_writes_both_grids_from_the_same_noises(spec, equal, shrink, tmp_path, capsys):
    out = tmp_path / "compare.png"
    guidance = [] if spec is None else ["--guidance", spec]
    argv = ["sample", "--model", "gmm-cond", "--steps", "4", "--classes", "1,7", "--per-class", "3", *guidance]
    assert main([*argv, "--compare-unguided", "--output", str(out)]) == 0
    left, right = _halves(out)
    assert left.shape == (2 * 33 + 1, 3 * 33 + 1)  # 2 rows (classes) × 3 samples of 8 px × 4 + 1 px padding
    assert np.array_equal(left, right) == equal  # no named guidance: both sides are the same samples
    message = capsys.readouterr().out
    assert "left: classifier-free scale" in message and "the same noises" in message
    # the right half is the plain `sample` grid of the same spec and seeds
    single = tmp_path / "single.png"
    assert main([*argv, "--output", str(single)]) == 0
    assert np.array_equal(np.asarray(Image.open(single)), right)


def test_compare_unguided_left_is_the_scale_alone(shrink, tmp_path):
    argv = ["sample", "--model", "gmm-cond", "--steps", "4", "--classes", "0,5", "--per-class", "2"]
    assert main([*argv, "--guidance", "3+shrink", "--compare-unguided", "--output", str(tmp_path / "c.png")]) == 0
    assert main([*argv, "--guidance", "3", "--output", str(tmp_path / "plain.png")]) == 0
    assert np.array_equal(_halves(tmp_path / "c.png")[0], np.asarray(Image.open(tmp_path / "plain.png")))


METHODS = [
    ("DPM-Solver++ 2M", "dpm++2m", "linspace"),
    ("diffusers DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler", "linspace"),
]


def test_eval_with_a_named_guidance(shrink):
    plain = run_eval(nfes=[4], num_samples=20, guidance="2", methods=METHODS, progress=False)
    guided = run_eval(nfes=[4], num_samples=20, guidance="2+shrink:factor=0.9", methods=METHODS, progress=False)
    assert (guided["guidance"], guided["guidance_scale"]) == ("2+shrink:factor=0.9", 2.0)
    ours, theirs = guided["methods"]
    assert "skipped" not in ours and all(ours[m]["4"] is not None for m in ("fd_digits", *KNN_METRICS))
    assert ours["fd_digits"]["4"] != plain["methods"][0]["fd_digits"]["4"]  # the guidance acted
    assert "diffusers' schedulers take a scale only" in theirs["skipped"]
    assert all(theirs[m]["4"] is None for m in ("fd_digits", "class_accuracy", *KNN_METRICS, "seconds"))
    assert "—" in format_table(guided).splitlines()[2]  # diffusers' row: dashes
    # the plain scale runs diffusers' scheduler too: the same samples as ours (to float32 rounding)
    assert plain["methods"][1]["fd_digits"]["4"] == pytest.approx(plain["methods"][0]["fd_digits"]["4"], rel=1e-3)
    assert plain["held_out"] == guided["held_out"]


def test_eval_records_the_spec_and_reports_bad_options_in_one_line(shrink, tmp_path, capsys):
    assert main(["eval", "--guidance", "shrink:bogus=1", "--nfe", "4", "--num-samples", "4", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("diffsamplers eval: error: --guidance: 'shrink:bogus=1 (shrink)': bad option")
    argv = ["eval", "--guidance", "1.5", "--nfe", "3", "--num-samples", "12", "--methods", "Karras", "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["guidance"], report["guidance_scale"]) == ("1.5", 1.5)
    assert "guidance 1.5 (classifier-free scale 1.5)" in capsys.readouterr().out
