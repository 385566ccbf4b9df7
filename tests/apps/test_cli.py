"""The ``diffsamplers`` command line and the benchmark script run end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsamplers.apps.arguments import CommandParser, output_file, run_command, set_command
from diffsamplers.apps.cli import build_parser, main
from diffsamplers.apps.fid_job import main as fid_main
from diffsamplers.apps.recipes import describe_schedules, describe_solvers
from diffsamplers.apps.registry import describe_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_compare(tmp_path_factory):
    """`diffsamplers compare` as the README runs it (default NFEs, methods and samples)."""
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
            elif name == "diffsamplers best (shipped)" and nfe not in report["best_shipped"]:
                assert err is None  # no recipe shipped at this NFE (50)
            else:
                assert err is not None and math.isfinite(err) and err > 0, (name, nfe, err)
    # The shipped best recipe beats every diffusers scheduler at every NFE it is shipped for.
    assert set(report["best_shipped"]) == {"5", "6", "8", "10", "15", "20"}
    for nfe in report["best_shipped"]:
        theirs = [e[nfe] for n, e in by_name.items() if n.startswith("diffusers") and e[nfe] is not None]
        assert by_name["diffsamplers best (shipped)"][nfe] < min(theirs)
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


def one_line_error(argv, capsys) -> str:
    """Run the command line; it must fail with exit status 2 and exactly one line on stderr, which is returned."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--nfe", "0"], "diffsamplers compare: error: --nfe must be a positive integer, got 0"),
        (["compare", "--nfe", "5", "--methods", "nonexistent"], "--methods: no method matches 'nonexistent'"),
    ],
)
def test_compare_bad_arguments(argv, message, capsys):
    assert message in one_line_error([*argv, "--quiet"], capsys)


# Each: the arguments, then what the one line must say (the flag and the value among it).
BAD_ARGUMENTS = {
    "no command": ([], ["diffsamplers: error: missing command", "compare, sample, eval, fid, schedule"]),
    "schedule alone": (["schedule"], ["diffsamplers schedule: error: missing command", "ays, optimize, show"]),
    "per-class": (["sample", "--per-class", "-1"], ["--per-class must be a positive integer, got -1"]),
    "per-class text": (["sample", "--per-class", "many"], ["--per-class must be a positive integer, got many"]),
    "steps": (["sample", "--steps", "0"], ["--steps must be a positive integer, got 0"]),
    "outlier": (
        ["schedule", "optimize", "--model", "gmm", "--outlier", "0.5", "--output", "x.safetensors"],
        ["--outlier must be 0 (off) or a finite number > 1, got 0.5"],
    ),
    "seed": (["sample", "--seed", "-1"], ["--seed must be an integer in 0..", "got -1"]),
    "seed text": (["compare", "--seed", "abc"], ["--seed must be an integer in 0..", "got abc"]),
    "compare samples": (["compare", "--num-samples", "0"], ["--num-samples must be a positive integer, got 0"]),
    "eval samples": (["eval", "--num-samples", "1"], ["--num-samples must be an integer >= 2, got 1"]),
    "eval nfe": (["eval", "--nfe", "5", "x"], ["--nfe must be a positive integer, got x"]),
    "fid samples": (["fid", "--num-samples", "1", "--output", "r"], ["--num-samples must be an integer >= 2, got 1"]),
    "fid batch": (["fid", "--batch-size", "0", "--output", "r"], ["--batch-size must be a positive integer, got 0"]),
    "optimize nfe": (["schedule", "optimize", "--nfe", "1", "--output", "s.safetensors"], ["--nfe must be", "got 1"]),
    "ays steps": (["schedule", "ays", "--steps", "-4"], ["--steps must be a positive integer, got -4"]),
    "guidance nan": (
        ["sample", "--guidance", "nan"],
        ["--guidance: guidance spec 'nan'", "finite number > 0, got nan"],
    ),
    "guidance inf": (["eval", "--guidance", "inf"], ["--guidance: guidance spec 'inf'", "finite number > 0, got inf"]),
    "eval guidance unknown": (["eval", "--guidance", "3+nope"], ["--guidance: unknown guidance 'nope' in '3+nope'"]),
    "guidance zero": (["sample", "--guidance", "0"], ["--guidance: guidance spec '0'", "finite number > 0, got 0"]),
    "guidance unknown": (["sample", "--guidance", "2+nope"], ["--guidance: unknown guidance 'nope' in '2+nope'"]),
    "guidance negative": (["fid", "--guidance", "-2", "--output", "r"], ["--guidance must be", "got -2"]),
    "classes": (["sample", "--classes", "a,b"], ["--classes must be comma-separated integer class labels, got a,b"]),
    "device string": (["sample", "--device", "gpu0"], ["--device must be a torch device", "got gpu0"]),
    "device index": (["fid", "--device", "cuda:99", "--output", "r"], ["--device: cuda:99 is not available"]),
    "device meta": (["sample", "--device", "meta"], ["--device: meta is not a device to sample on"]),
    "solver": (["sample", "--solver", "dpm++9m"], ["--solver: unknown solver 'dpm++9m'", "dpm++2m"]),
    "schedule": (["fid", "--schedule", "lin", "--output", "r"], ["--schedule: unknown schedule 'lin'", "karras"]),
    "diffusers solver": (
        ["schedule", "optimize", "--solver", "diffusers:DDIMScheduler", "--output", "s.safetensors"],
        ["--solver: 'diffusers:DDIMScheduler' is a diffusers scheduler"],
    ),
    "fid output missing": (["fid"], ["diffsamplers fid: error: the following arguments are required: --output"]),
    "optimize output missing": (["schedule", "optimize"], ["required: --output"]),
    "optimize output extension": (
        ["schedule", "optimize", "--out", "s.pt"],
        ["--output: s.pt has the extension '.pt': a learned schedule needs .safetensors"],
    ),
    "image extension": (["sample", "--output", "grid.xyz"], ["--output: grid.xyz has the extension '.xyz'", ".png"]),
    "no image extension": (["sample", "--output", "grid"], ["--output: grid has no file extension", ".png"]),
    "plot extension": (
        ["compare", "--plot", "c.txt"],
        ["--plot: c.txt has the extension '.txt': a plot needs", ".svg"],
    ),
    "unknown command": (["smaple"], ["invalid choice: 'smaple'"]),
    "unknown option": (["sample", "--steps", "3", "--guidnace", "2"], ["unrecognized arguments: --guidnace 2"]),
    "library ValueError": (["schedule", "ays", "--model", "sd99"], ["schedule ays: error: ", "'sd99'"]),
    "library FileNotFoundError": (
        ["schedule", "show", "nowhere.safetensors"],
        ["diffsamplers schedule show: error: no such file: nowhere.safetensors"],
    ),
}


@pytest.mark.parametrize("argv, expected", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_fail_in_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs land here (none is written)
    line = one_line_error(argv, capsys)
    for text in expected:
        assert text in line
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys, tmp_path):
    line = one_line_error(["sample", "--device", "cuda", "--output", str(tmp_path / "g.png")], capsys)
    assert line == (
        "diffsamplers sample: error: --device: cuda is not available on this machine "
        "(torch.cuda.is_available() is False); use --device cpu"
    )


@pytest.mark.parametrize("command", [["sample"], ["fid"], ["schedule", "optimize"], ["schedule", "show", "s"]])
def test_a_folder_is_not_an_output_file(command, capsys, tmp_path):
    flag = "--plot" if command[-1] == "s" else "--output"
    target = tmp_path / "a file"
    target.write_text("")
    if command == ["fid"]:  # fid's --output is a folder: a file is refused
        assert one_line_error([*command, flag, str(target)], capsys).endswith(
            f"--output: {target} is a file, not a folder"
        )
        return
    assert f"{flag}: {tmp_path} is a folder; give a file name" in one_line_error(
        [*command, flag, str(tmp_path)], capsys
    )


@pytest.mark.parametrize(
    "command, flag",
    [
        (["compare"], "--plot"),
        (["compare"], "--json"),
        (["eval"], "--plot"),
        (["sample"], "--output"),
        (["fid"], "--output"),
        (["fid", "--output", "r", "--save-stats"], None),
        (["schedule", "optimize", "--checkpoint"], None),
    ],
)
def test_outputs_are_checked_before_any_computation(command, flag, capsys, tmp_path):
    """An output under a file cannot be written: refused at once, naming the flag and the path."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    name = "s.safetensors" if "optimize" in command else "x.png"
    argv = [*command, *([flag] if flag else []), str(blocker / "sub" / name)]
    line = one_line_error(argv, capsys)
    assert f"cannot create the folder {blocker / 'sub'}" in line and line.endswith(f": {blocker} is a file")
    assert f"{flag or command[-1]}: " in line


def test_output_folders_are_created_before_the_command_runs(tmp_path):
    parser = CommandParser(prog="job")
    parser.add_argument("--plot", type=output_file({".png"}, "a plot"))
    seen = []
    set_command(parser, lambda args: seen.append(Path(args.plot).parent.is_dir()) or 0, outputs=("plot",))
    assert run_command(parser, ["--plot", str(tmp_path / "new" / "deeper" / "p.png")]) == 0
    assert seen == [True]


def test_unconditional_model_takes_no_guidance_or_classes(capsys, tmp_path):
    out = str(tmp_path / "g.png")
    line = one_line_error(["sample", "--model", "gmm", "--guidance", "3", "--output", out], capsys)
    assert line == "diffsamplers sample: error: --guidance: model 'gmm' is unconditional; it takes only 1, got 3"
    line = one_line_error(["sample", "--model", "gmm", "--classes", "1", "--output", out], capsys)
    assert line == "diffsamplers sample: error: --classes: model 'gmm' is unconditional; it takes no class labels"


def test_eval_fid_script_reports_in_one_line(capsys, tmp_path):
    assert fid_main(["--steps", "0", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith("error: --steps must be a positive integer, got 0")


@pytest.mark.parametrize("argv, dest", [(["fid"], "out"), (["schedule", "optimize"], "output")])
def test_out_is_a_deprecated_alias_of_output(argv, dest, capsys, tmp_path):
    path = str(tmp_path / "x.safetensors")
    parser = build_parser()
    assert getattr(parser.parse_args([*argv, "--output", path]), dest) == path
    assert capsys.readouterr().err == ""
    assert getattr(parser.parse_args([*argv, "--out", path]), dest) == path
    assert capsys.readouterr().err.splitlines() == [
        f"diffsamplers {' '.join(argv)}: warning: --out is deprecated, use --output"
    ]
    assert main([*argv, "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--output " in help_text and "--out " not in help_text and "--out," not in help_text


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "argv, defaults",
    [
        (
            ["sample"],
            [
                "(default: dpm++2m)",
                "default: the model's — linspace, or flow:shift=S",
                "(default: samples.png)",
                "(default: 8)",
            ],
        ),
        (["fid"], ["(default: digits)", "(default: 1000)", "(default: fd-digits)", "(default: 1.0)"]),
        (["schedule", "optimize"], ["(default: gmm)", "(default: dpm++2m)", "(default: 8192)"]),
        (["compare"], ["(default: [5, 6, 8, 10, 15, 20, 50])", "(default: 64)"]),
    ],
)
def test_help_shows_defaults_and_the_specs(argv, defaults, capsys):
    assert main([*argv, "--help"]) == 0
    out = _flat(capsys.readouterr().out)
    for text in defaults:
        assert text in out
    if argv != ["compare"]:
        assert _flat(describe_models()) in out and _flat(describe_solvers()) in out
    if argv in (["sample"], ["fid"]):
        assert _flat(describe_schedules()) in out


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
            "--guidance-batch",
            "2",
            "--guidance-steps",
            "3",
            "--guidance-repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a loaded 2-core machine: OpenMP spin-waits cost 10× here
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    # the guidance rows: unguided, CFG and every registered guidance, measured or skipped with a reason
    from diffsamplers.apps.recipes import GUIDANCES

    guided = {r["spec"]: r for r in data["guidance_rows"]}
    assert guided["1"]["ratio_vs_unguided"] == 1.0 and guided["2"]["ratio_vs_cfg"] == 1.0
    assert all(r["ms_per_step"] > 0 and r["steps"] == 3 and r["batch"] == 2 for r in guided.values())
    covered = {spec for spec in guided} | {s["spec"] for s in data["guidance_skipped"]}
    assert all(any(name in spec for spec in covered) for name in GUIDANCES)
    assert all(s["reason"] for s in data["guidance_skipped"])
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


def test_sample_with_particle_and_candidate_guidance(capsys, tmp_path):
    """``sample --guidance fk-steering:…`` end to end on the digits model (2 steps); the samples per class must be a
    multiple of the particles per group (a group is one class), the solver stochastic; SVDD has no such groups."""
    out = tmp_path / "fk.png"
    fk = "fk-steering:k=2,reward=digits-class:3"
    argv = ["sample", "--model", "digits", "--steps", "2", "--classes", "3,5", "--output", str(out)]
    assert main([*argv, "--solver", "ddim-eta1", "--guidance", fk, "--per-class", "2"]) == 0
    assert out.stat().st_size > 0
    assert f"wrote {out}: 4 samples from digits with ddim-eta1" in capsys.readouterr().out
    line = one_line_error([*argv, "--solver", "ddim-eta1", "--guidance", fk, "--per-class", "3"], capsys)
    assert line == (
        f"diffsamplers sample: error: --per-class 3 is not a multiple of the 2 particles per group of --guidance "
        f"'{fk}': a group's particles are consecutive samples of one class; use --per-class 4"
    )
    line = one_line_error([*argv, "--solver", "ddim", "--guidance", fk, "--per-class", "2"], capsys)
    assert "needs a stochastic sampler" in line and "ddim takes no random step" in line
    svdd = "svdd:m=2,reward=pixel-mass:-1"
    assert main([*argv, "--solver", "euler-maruyama", "--guidance", svdd, "--per-class", "3"]) == 0
    assert "6 samples from digits with euler-maruyama" in capsys.readouterr().out
    # FK correctors' CFG needs no classifier-free scale beside it: its unconditional expert is the null label
    assert main([*argv, "--solver", "sde-dpm++2m", "--guidance", "fkc:k=2,cfg=3", "--per-class", "2"]) == 0
    assert "4 samples from digits with sde-dpm++2m" in capsys.readouterr().out


def test_sampler_chunks_keep_particle_groups_whole():
    """make_sampler's chunks are rounded down to whole groups: batch_size=3 with K = 2 runs chunks of 2, each with its
    own per-sample streams, and gives what one batch gives."""
    from diffsamplers.apps.registry import load_model
    from diffsamplers.apps.samplers import make_sampler, particle_group_size
    from diffsamplers.guidance import FKSteering
    from diffsamplers.guidance.rewards import PixelMass

    bundle = load_model("gmm-cond")
    fk = FKSteering(PixelMass(), 2, 10.0)
    assert particle_group_size([fk]) == 2 and particle_group_size([]) == 1
    runs = [
        make_sampler(bundle, "ddim-eta1", 3, guidance_scale=2.0, classes=[1, 1, 4, 4], batch_size=b, guidance=[fk])
        for b in (3, 4)
    ]
    chunked, whole = (run(range(4)) for run in runs)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], torch.tensor([1, 1, 4, 4]))
    assert [r.index for r in fk.history] == [0, 1, 2]  # the last call: one chunk of 4


def test_class_balanced_labels_keep_a_group_in_one_class():
    """Without explicit classes (eval, fid), group g of K consecutive samples takes class g mod 10: a group never
    mixes classes; without a particle method the labels cycle per sample."""
    from diffsamplers.apps.registry import load_model
    from diffsamplers.apps.samplers import make_sampler
    from diffsamplers.guidance import FKSteering
    from diffsamplers.guidance.rewards import PixelMass

    bundle = load_model("gmm-cond")
    _, grouped = make_sampler(bundle, "ddim-eta1", 2, guidance=[FKSteering(PixelMass(), 2, 1.0)])(range(6))
    _, plain = make_sampler(bundle, "ddim-eta1", 2)(range(6))
    n = bundle.num_classes
    assert grouped.tolist() == [(i // 2) % n for i in range(6)]
    assert plain.tolist() == [i % n for i in range(6)]
