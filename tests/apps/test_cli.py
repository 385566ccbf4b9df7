"""The ``diffsamplers`` command line and the benchmark script run end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffsamplers.apps.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_compare(tmp_path_factory):
    """The main job exactly as the README runs it (default NFEs, methods and samples)."""
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--json", str(out / "c.json"), "--plot", str(out / "c.png"), "--quiet"]) == 0
    return json.loads((out / "c.json").read_text()), out


def test_compare_default_run(default_compare, capsys):
    report, out = default_compare
    assert report["nfe"] == [5, 6, 8, 10, 15, 20, 50]
    assert (out / "c.png").stat().st_size > 10_000
    by_name = {m["name"]: m["errors"] for m in report["methods"]}
    assert {"DPM-Solver++ 2M", "diffusers DPM-Solver++ 2M", "diffusers UniPC (bh2)", "diffusers Euler"} <= set(by_name)
    for name, errors in by_name.items():
        for nfe, err in errors.items():
            if name == "diffusers Heun" and int(nfe) % 2 == 0:
                assert err is None  # Heun spends 2·steps − 1 evaluations
            else:
                assert err is not None and math.isfinite(err) and err > 0, (name, nfe, err)
    # Same grid, same algorithm: our 2M and 3M (reference form) equal diffusers' to 3 digits.
    for nfe in map(str, report["nfe"]):
        assert by_name["DPM-Solver++ 2M"][nfe] == pytest.approx(by_name["diffusers DPM-Solver++ 2M"][nfe], rel=1e-3)
        assert by_name["DPM-Solver++ 3M (reference)"][nfe] == pytest.approx(
            by_name["diffusers DPM-Solver++ 3M"][nfe], rel=1e-3
        )
    # Our UniPC is diffusers' UniPC; DC-Solver (ratios searched per NFE on other noises) improves on it.
    for nfe in map(str, report["nfe"]):
        assert by_name["UniPC (bh2)"][nfe] == pytest.approx(by_name["diffusers UniPC (bh2)"][nfe], rel=1e-3)
        assert by_name["DC-Solver (bh2, searched)"][nfe] < 0.99 * by_name["UniPC (bh2)"][nfe]
    # Errors fall with NFE, and a uniform-logSNR grid beats diffusers' linspace grid from 10 NFE on.
    assert by_name["DPM-Solver++ 2M"]["50"] < by_name["DPM-Solver++ 2M"]["5"] / 3
    for nfe in ("10", "15", "20", "50"):
        assert by_name["DPM-Solver++ 2M, logSNR"][nfe] < by_name["diffusers DPM-Solver++ 2M"][nfe] / 2


def test_compare_table_output(capsys, tmp_path):
    assert main(["compare", "--nfe", "5", "8", "--num-samples", "4", "--methods", "2M", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DPM-Solver++ 2M" in out and "diffusers DPM-Solver++ 2M" in out and "UniPC" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--nfe", "0"], "--nfe must be positive"),
        (["compare", "--nfe", "5", "--methods", "nonexistent"], "no method matches"),
    ],
)
def test_compare_bad_arguments(argv, message, capsys):
    assert main([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "diffsamplers.apps.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compare" in result.stdout


def test_bench_step_overhead_script_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_step_overhead.py"),
            "--device",
            "cpu",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    ours = next(r for r in rows if r["loop"] == "diffsamplers sample(), 2M, check_finite=False")
    assert ours["host_reads_per_run"] == 0
    dc = next(r for r in rows if r["loop"] == "diffsamplers sample(), DC-Solver, check_finite=False")
    assert dc["host_reads_per_run"] == 0 and dc["ratio_vs_unipc"]["1"] > 0
    assert all(r["ms_per_step"]["1"] > 0 for r in rows)


def test_bench_throughput_script_runs(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_throughput.py"),
            "--device",
            "cpu",
            "--batch",
            "2",
            "--models",
            "digits",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["ours_images_per_s"] > 0 and row["diffusers_images_per_s"] > 0
    assert 0.0 <= row["scheduler_share_ours"] < 1.0
