"""scripts/particles_digits.py and scripts/bench_particles.py end to end (small settings): docs/particles.md's claim
that the final reward rises with the particles K and the candidates M, on the digits model with a reward that is not
differentiated; the sweep resumes from its JSON; the bench measures both arms."""

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _run(script, *args):
    return runpy.run_path(str(ROOT / "scripts" / script), run_name="script")["main"]([str(a) for a in args])


def test_reward_rises_with_particles_and_candidates(tmp_path, capsys):
    out, png = tmp_path / "particles.json", tmp_path / "particles.png"
    assert _run("particles_digits.py", "--samples", 30, "--steps", 6, "--json", out, "--png", png) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    for method, letter in (("FK steering", "K"), ("SVDD-PM", "M")):
        rewards = [rows[f"{method} {letter}={n}"]["reward"] for n in (1, 2, 4, 8)]
        assert all(a < b for a, b in zip(rewards, rewards[1:])), (method, rewards)
        shares = [rows[f"{method} {letter}={n}"]["share_target"] for n in (1, 8)]
        assert shares[1] > shares[0] + 0.3
    # K = 1 and M = 1 are the base sampler: the same samples, the same row
    assert rows["FK steering K=1"]["fd_digits"] == rows["SVDD-PM M=1"]["fd_digits"]
    assert rows["FK steering K=8"]["evaluations_per_sample"] == 8 * 6 and png.stat().st_size > 0
    capsys.readouterr()
    assert _run("particles_digits.py", "--samples", 30, "--steps", 6, "--json", out) == 0  # resumes: nothing to draw
    printed = capsys.readouterr().out
    assert "reward" in printed and ": reward" not in printed


def test_bench_measures_batched_and_sequential_arms(tmp_path):
    out = tmp_path / "bench.json"
    assert _run("bench_particles.py", "--counts", 1, 2, "--steps", 3, "--repeats", 1, "--json", out) == 0
    report = json.loads(out.read_text())
    for key, letter in (("particles", "K"), ("candidates", "M")):
        assert [row[letter] for row in report[key]] == [1, 2]
        assert all(row["batched_s"] > 0 and row["sequential_s"] > 0 for row in report[key])
