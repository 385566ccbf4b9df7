"""scripts/gpu_report.py: the --smoke run on the CPU writes every file with the expected structure and marks what
needs CUDA as skipped with a reason; a part past its budget stops and keeps what it measured."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_report.py"
FILES = {"step_overhead": "step_overhead.json", "gpu_tests": "gpu_tests.json", "throughput": "throughput.json"}
FILES.update(particles="particles.json", masked="masked_text.json", ays="ays_digits.json")


@pytest.fixture(scope="module")
def gpu_report():
    """The script as a module (its top level imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_report"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return out, {name: json.loads((out / file).read_text()) for name, file in FILES.items()}


def test_every_file_records_the_run(smoke):
    out, parts = smoke
    report = json.loads((out / "report.json").read_text())
    assert report["parts"].keys() == FILES.keys() and report["wall_s"] > 0
    for name, data in parts.items():
        summary = report["parts"][name]
        assert summary["file"] == FILES[name] and summary["status"] == data["status"]
        assert data["status"] in ("ok", "partial", "skipped") and (data["status"] == "ok") == (data["reason"] is None)
        assert 0 <= data["wall_s"] <= data["budget_s"]
        meta = data["meta"]
        assert {"torch", "diffusers", "diffsamplers", "device_name", "date"} <= meta.keys() and meta["device"] == "cpu"
        assert meta["command"].split()[1:] == [str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)]
        assert all(s["what"] and s["reason"] for s in data["skipped"])


def test_cuda_parts_are_skipped_with_a_reason_on_the_cpu(smoke):
    _, parts = smoke
    tests = parts["gpu_tests"]
    assert tests["status"] == "skipped" and "needs a CUDA device" in tests["reason"]
    counts = tests["results"]["counts"]
    assert counts["total"] >= 2 and counts["skipped"] == counts["total"] and not tests["results"]["all_passed"]
    names = {t["test"] for t in tests["results"]["tests"]}
    assert "tests.solvers.test_dc_solver::test_no_cuda_synchronisation_in_the_loop" in names
    overhead = parts["step_overhead"]
    assert overhead["status"] == "partial" and "CUDA synchronisations" in overhead["skipped"][0]["what"]
    rows = {r["loop"]: r for r in overhead["results"]["rows"]}
    assert len(rows) == 12 and not any("cuda_syncs_per_run" in r for r in rows.values())
    assert rows["diffsamplers sample(), 2M, check_finite=False"]["host_reads_per_run"] == 0
    assert all(r["ms_per_step"]["1"] > 0 for r in rows.values())
    guided = {r["spec"]: r for r in overhead["results"]["guidance_rows"]}  # unguided, CFG, each guidance
    assert guided["1"]["ratio_vs_unguided"] == 1.0 and guided["2"]["ms_per_step"] > 0
    assert not any("cuda_syncs_per_run" in r for r in guided.values())
    assert overhead["settings"]["guidance"]["specs"][:2] == ["1", "2"]


def test_throughput_and_ays_measure_on_the_cpu(smoke):
    _, parts = smoke
    throughput = parts["throughput"]
    assert throughput["skipped"] == [{"what": "cifar model", "reason": "--smoke measures the digits model only"}]
    (row,) = throughput["results"]["rows"]
    assert row["model"] == "digits" and row["batch"] == 2 and row["ours_images_per_s"] > 0
    ays = parts["ays"]
    assert ays["status"] == "ok" and ays["settings"]["nfe"] == 3
    levels = ays["results"]["levels"]
    assert len(levels) == 4 and all(a > b > 0 for a, b in zip(levels, levels[1:]))
    assert ays["results"]["sweeps"] == 1 and ays["results"]["seconds"] > 0 and ays["results"]["log"]
    assert ays["results"]["cpu_run"]["compared"] is False


def test_particles_measure_batched_against_sequential_on_the_cpu(smoke):
    _, parts = smoke
    particles = parts["particles"]
    assert particles["status"] == "ok" and particles["settings"]["counts"] == [1, 2]
    for key, count in (("particles", "K"), ("candidates", "M")):
        rows = particles["results"][key]
        assert [r[count] for r in rows] == [1, 2]
        assert all(
            r["batched_s"] > 0 and r["speedup"] == pytest.approx(r["sequential_s"] / r["batched_s"]) for r in rows
        )


def test_masked_text_rows_on_the_cpu(smoke):
    _, parts = smoke
    masked = parts["masked"]
    assert masked["status"] == "ok" and [r["sampler"] for r in masked["results"]["rows"]] == [
        "first-hitting:k=64",
        "ancestral",
    ]
    assert all(r["seconds"] > 0 and r["nfe"] >= 1 for r in masked["results"]["rows"])


def test_a_part_past_its_budget_stops_and_keeps_what_it_measured(gpu_report):
    def slow(ctx):
        ctx.planned = ["first", "second"]
        ctx.results["first"] = 1.0
        ctx.finished.append("first")
        time.sleep(60)

    started = time.monotonic()
    record = gpu_report.run_part(gpu_report.Part("slow", "slow.json", slow, "sleeps"), "cpu", gpu_report.SMOKE, 1.0, {})
    assert time.monotonic() - started < 10
    assert record["status"] == "partial" and "time limit (1 s)" in record["reason"]
    assert record["results"] == {"first": 1.0}
    assert record["skipped"] == [{"what": "second", "reason": "stopped at its time limit (1 s)"}]


def test_a_failing_part_is_recorded(gpu_report):
    def broken(ctx):
        raise ValueError("boom")

    record = gpu_report.run_part(gpu_report.Part("b", "b.json", broken, "raises"), "cpu", gpu_report.SMOKE, 5.0, {})
    assert record["status"] == "failed" and record["reason"] == "ValueError: boom" and "boom" in record["traceback"]


def test_junit_summary(gpu_report):
    xml = (
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.a" name="test_bad" time="1.0"><failure message="assert 1 == 0">tb</failure>'
        "</testcase>"
        '<testcase classname="tests.b" name="test_err" time="0"><error message="fixture failed"/></testcase>'
        '<testcase classname="tests.b" name="test_skip" time="0"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_report.summarise_junit(xml)
    assert summary["counts"] == {"total": 4, "passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert not summary["all_passed"]
    assert [t["outcome"] for t in summary["tests"]] == ["passed", "failed", "error", "skipped"]
    assert summary["tests"][1] == {
        "test": "tests.a::test_bad",
        "outcome": "failed",
        "seconds": 1.0,
        "message": "assert 1 == 0",
    }


def test_without_diffusers_it_stops_with_a_clear_message(gpu_report, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # find_spec reports it as not installed
    assert gpu_report.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "missing Python packages, nothing was measured" in err and "diffusers: install diffusers" in err
    assert not (tmp_path / "gpu").exists()
