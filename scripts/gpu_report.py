"""Every GPU figure the project still lacks, measured in one prepared run of at most 8 minutes, written as JSON.

Parts, in this order, each with its own time budget inside one global deadline (default 480 s):

* ``step_overhead`` → ``step_overhead.json`` (60 s): ms per step and, on CUDA, synchronising calls per 25-step
  run of our ``sample()`` loop (DPM-Solver++ 2M/3M, UniPC, DC-Solver) and of our schedulers vs diffusers'
  DPMSolverMultistep, UniPCMultistep and EulerDiscrete schedulers — ``scripts/bench_step_overhead.py``, batch 1
  and 16, 15 repeats; then its guidance rows (``guidance_rows``): ms per step of every registered guidance and
  classifier-free guidance against unguided sampling on the digits model (DPM-Solver++ 2M, 25 steps, batch 64,
  5 repeats), host reads and CUDA synchronisations per run.
* ``gpu_tests`` → ``gpu_tests.json`` (60 s): ``pytest -m gpu`` on the test files that carry the marker; the
  outcome of every test and the counts (without CUDA, pytest skips them all and the part is marked skipped).
* ``throughput`` → ``throughput.json`` (150 s): images/s of our loop vs diffusers' pipeline loop at batch 64, 256
  and 1024, digits model and a CIFAR-sized random ``UNet2DModel`` — ``scripts/bench_throughput.py``.
* ``particles`` → ``particles.json`` (40 s): FK steering with K particles per sample in one batch against K
  sequential runs, and SVDD with M candidates drawn and valued in one call against M calls, K = M ∈ {1, 2, 4, 8},
  digits model, DDIM η = 1, 20 steps — ``scripts/bench_particles.py`` (target: ≥ 0.8·K at K = 8).
* ``masked`` → ``masked_text.json`` (40 s): ``diffsamplers eval --model text``'s first-hitting and ancestral (T =
  1024) rows on the device, float64 and float32 categorical sampling, 64 samples.
* ``ays`` → ``ays_digits.json`` (100 s): an Align Your Steps optimisation on the digits model
  (:func:`diffsamplers.apps.schedule_job.optimize_for_model`, DPM-Solver++ 2M, NFE 10, 512 KLUB samples, at most
  6 sweeps: the settings of ``docs/ays/digits_dpm++2m_nfe10_512samples.safetensors``, learned on a CPU), its
  seconds, per-sweep log and learned levels, compared with that CPU run.
* ``report.json``: status, reason, budget and wall time of every part; rewritten after each part.

A part that reaches its budget is interrupted (SIGALRM) and the throughput part skips a batch predicted not to fit;
what was measured is kept, what was not is listed under ``skipped`` with the reason. A part's file is written as
soon as it ends. Every file records the versions (torch, diffusers, diffsamplers), the device, the date, the
command and the wall time. Exit status: 0, or 1 when a part raised, 2 when a required package is missing.

    python scripts/gpu_report.py --out docs/gpu                       # on a GPU
    python scripts/gpu_report.py --smoke --device cpu --out /tmp/gpu  # tiny sizes: on a CPU, under a minute
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

#: Modules every part imports, with what to install when one is missing (checked before anything runs).
REQUIRED = {
    "torch": "torch",
    "diffusers": "diffusers>=0.42 (on the GPU machine: the diffusers wheel that travels with the run)",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
}

TOTAL_BUDGET_S = 480.0
#: Seconds per part; together they leave 30 s of the total for start-up (imports, CUDA initialisation).
BUDGETS_S = {
    "step_overhead": 60.0,
    "gpu_tests": 60.0,
    "throughput": 150.0,
    "particles": 40.0,
    "masked": 40.0,
    "ays": 100.0,
}
#: Kept back from the global deadline for writing the files.
RESERVE_S = 5.0
#: The CPU run the ``ays`` part repeats on the device (same settings, same seed).
CPU_AYS_RUN = ROOT / "docs" / "ays" / "digits_dpm++2m_nfe10_512samples.safetensors"
THROUGHPUT_MODELS = ("digits", "cifar")


@dataclass(frozen=True)
class Sizes:
    """What each part measures: the full GPU run (:data:`FULL`) or the CPU smoke run (:data:`SMOKE`)."""

    overhead_batches: tuple[int, ...] = (1, 16)
    overhead_repeats: int = 15
    guidance_batch: int = 64
    guidance_steps: int = 25
    guidance_repeats: int = 5
    throughput_models: tuple[str, ...] = THROUGHPUT_MODELS
    throughput_batches: tuple[int, ...] = (64, 256, 1024)
    throughput_repeats: int = 3
    particle_counts: tuple[int, ...] = (1, 2, 4, 8)
    particle_steps: int = 20
    particle_repeats: int = 3
    masked_samples: int = 64
    masked_methods: tuple[tuple[str, str, int, str], ...] = (
        ("first-hitting", "first-hitting", 0, "float64"),
        ("first-hitting", "first-hitting", 0, "float32"),
        ("ancestral, T = 1024", "ancestral", 1024, "float64"),
        ("ancestral, T = 1024", "ancestral", 1024, "float32"),
    )
    ays_nfe: int = 10
    ays_samples: int = 512
    ays_sweeps: int = 6
    ays_metric_samples: int = 256
    ays_reference_steps: int = 1000


FULL = Sizes()
SMOKE = Sizes(
    overhead_batches=(1,),
    overhead_repeats=1,
    guidance_batch=2,
    guidance_steps=3,
    guidance_repeats=1,
    throughput_models=("digits",),
    throughput_batches=(2,),
    throughput_repeats=1,
    particle_counts=(1, 2),
    particle_steps=2,
    particle_repeats=1,
    masked_samples=2,
    masked_methods=(("first-hitting", "first-hitting:k=64", 0, "float64"), ("ancestral", "ancestral", 2, "float64")),
    ays_nfe=3,
    ays_samples=16,
    ays_sweeps=1,
    ays_metric_samples=4,
    ays_reference_steps=20,
)


class PartTimeout(BaseException):
    """A part reached its time limit (a BaseException, so that no ``except Exception`` in library code eats it)."""


class PartSkipped(Exception):
    """A part cannot run here (the message says why)."""


def require(module: str, install: str) -> None:
    """Skip the part when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise PartSkipped(f"needs the Python package {install} ({module} is not installed)")


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (POSIX ``setitimer``; no limit elsewhere)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise PartTimeout(f"stopped at its time limit ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    """What a part gets: where and how much to measure, its deadline, and the record it fills in as it goes (so
    that an interrupted part keeps what it measured)."""

    device: str
    sizes: Sizes
    deadline: float  # time.monotonic() value
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def left(self) -> float:
        """Seconds until the part's deadline."""
        return self.deadline - time.monotonic()

    def skip(self, what: str, reason: str) -> None:
        """Record that ``what`` was not measured, and why."""
        self.skipped.append({"what": what, "reason": reason})
        print(f"  skipped {what}: {reason}", flush=True)

    def skip_unfinished(self, reason: str) -> None:
        """Mark every planned unit that neither finished nor was skipped already as skipped for ``reason``."""
        accounted = set(self.finished) | {s["what"] for s in self.skipped}
        for unit in self.planned:
            if unit not in accounted:
                self.skip(unit, reason)


@dataclass(frozen=True)
class Part:
    """One measurement: ``run`` fills in a :class:`Context`; the record goes to ``file``."""

    name: str
    file: str
    run: Callable[[Context], None]
    description: str


# -- the parts -----------------------------------------------------------------------------------------------


def step_overhead(ctx: Context) -> None:
    """``scripts/bench_step_overhead.py`` on the device: every loop's ms/step, host reads and CUDA syncs per run."""
    import bench_step_overhead as bench

    batches = list(ctx.sizes.overhead_batches)
    ctx.settings.update(
        steps=bench.STEPS,
        batches=batches,
        repeats=ctx.sizes.overhead_repeats,
        latents="(B, 4, 64, 64)",
        dtype="float16" if ctx.device == "cuda" else "float32",
        baselines=[bench.BASELINE, bench.UNIPC_BASELINE],
        guidance={
            "model": "digits",
            "solver": "dpm++2m",
            "steps": ctx.sizes.guidance_steps,
            "batch": ctx.sizes.guidance_batch,
            "repeats": ctx.sizes.guidance_repeats,
            "specs": bench.guidance_specs(),
        },
    )
    loops, guidance = "timings, host reads and CUDA syncs of every loop", "guidance rows (cost against unguided)"
    ctx.planned = [loops, guidance]
    ctx.results["rows"] = bench.measure_device(ctx.device, batches, ctx.sizes.overhead_repeats)
    ctx.finished.append(loops)
    if ctx.device != "cuda":
        ctx.skip(
            "CUDA synchronisations per run (cuda_syncs_per_run)",
            f"needs a CUDA device (--device {ctx.device}); host reads per run are counted on every device",
        )
    rows, skipped = bench.measure_guidance(
        ctx.device, ctx.sizes.guidance_batch, ctx.sizes.guidance_steps, ctx.sizes.guidance_repeats
    )
    ctx.results["guidance_rows"] = rows
    for item in skipped:
        ctx.skip(f"guidance {item['spec']}", item["reason"])
    ctx.finished.append(guidance)


def gpu_test_files() -> list[str]:
    """The test files that carry ``pytest.mark.gpu`` (relative to the repository root)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


def summarise_junit(xml_text: str) -> dict[str, Any]:
    """The counts and every test's outcome (passed, failed, error, skipped), seconds and message from pytest's
    JUnit XML report."""
    tests = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, element.get("message") or (element.text or "").strip()
                break
        test = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome}
        test["seconds"] = float(case.get("time") or 0.0)
        if message:
            test["message"] = message[:1000]
        tests.append(test)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": {"total": len(tests), **counts}, "all_passed": counts["passed"] == len(tests) > 0, "tests": tests}


def gpu_tests(ctx: Context) -> None:
    """``pytest -m gpu`` in a subprocess on the files that carry the marker; per-test outcomes and counts.

    Without ``--device cuda`` the subprocess sees no CUDA device, so pytest skips every test and the part is
    recorded as skipped (with what pytest collected)."""
    require("pytest", "pytest")
    files = gpu_test_files()
    if not files:
        raise PartSkipped("no test file carries pytest.mark.gpu")
    ctx.planned = ["pytest -m gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        args = ["-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rA", *files]
        ctx.settings.update(command=shlex.join(["python", *args]), files=files)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if ctx.device != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""
        try:
            proc = subprocess.run(
                [sys.executable, *args, f"--junitxml={junit}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(ctx.left() - 2.0, 1.0),
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            ctx.results["output_tail"] = out[-3000:]
            raise PartTimeout(f"pytest did not finish within {e.timeout:.0f} s") from None
        ctx.results.update(returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-3000:])
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report (exit status {proc.returncode}): {proc.stderr[-500:]}")
        ctx.results.update(summarise_junit(junit.read_text()))
    ctx.finished += ctx.planned
    counts = ctx.results["counts"]
    print(f"  pytest -m gpu: {counts}", flush=True)
    if ctx.device != "cuda":
        raise PartSkipped(
            f"needs a CUDA device (--device {ctx.device}); pytest collected {counts['total']} gpu-marked tests "
            f"and skipped {counts['skipped']}"
        )


def throughput(ctx: Context) -> None:
    """``scripts/bench_throughput.py`` per (model, batch); a batch predicted not to fit in the time left is skipped."""
    import bench_throughput as bench
    import torch

    device = torch.device(ctx.device)
    sizes = ctx.sizes
    ctx.settings.update(
        steps=bench.STEPS,
        solver="DPM-Solver++ 2M, diffusers' linspace grid",
        models=list(sizes.throughput_models),
        batches=list(sizes.throughput_batches),
        repeats=sizes.throughput_repeats,
        dtype=str(bench.dtype_for(device)).removeprefix("torch."),
    )
    for name in THROUGHPUT_MODELS:
        if name not in sizes.throughput_models:
            ctx.skip(f"{name} model", "--smoke measures the digits model only")
    ctx.planned = [f"{name} batch {b}" for name in sizes.throughput_models for b in sizes.throughput_batches]
    rows = ctx.results.setdefault("rows", [])
    bench.print_header()
    for name in sizes.throughput_models:
        unet = bench.load_unet(name, device)
        last: tuple[int, float] | None = None  # (batch, seconds) of the model's last measured batch
        for batch in sizes.throughput_batches:
            unit = f"{name} batch {batch}"
            predicted = last[1] * batch / last[0] if last else 0.0
            if predicted > ctx.left():
                ctx.skip(unit, f"predicted to take {predicted:.0f} s with {ctx.left():.0f} s of the budget left")
                continue
            started = time.monotonic()
            rows.append(bench.throughput_row(name, unet, batch, device, sizes.throughput_repeats))
            last = (batch, time.monotonic() - started)
            ctx.finished.append(unit)
        del unet
        free_device_memory()


def particles(ctx: Context) -> None:
    """``scripts/bench_particles.py`` on the device: K particles in one batch vs K runs, M candidates in one call vs
    M calls (the target on a GPU: ≥ 0.8·K speed-up at K = 8)."""
    import bench_particles as bench

    sizes = ctx.sizes
    ctx.settings.update(
        counts=list(sizes.particle_counts), steps=sizes.particle_steps, repeats=sizes.particle_repeats, groups=1
    )
    unit = "particles and candidates, batched vs sequential"
    ctx.planned = [unit]
    report = bench.measure(ctx.device, list(sizes.particle_counts), 1, sizes.particle_steps, sizes.particle_repeats)
    ctx.results.update(particles=report["particles"], candidates=report["candidates"])
    print(bench.format_table(report), flush=True)
    ctx.finished.append(unit)


def masked(ctx: Context) -> None:
    """``diffsamplers eval --model text`` on the device: first-hitting vs ancestral sampling of the bundled text model,
    wall time and quality, float64 vs float32 categorical sampling (docs/masked.md's table)."""
    import torch

    from diffsamplers.apps.registry import load_model
    from diffsamplers.apps.text_jobs import format_text_table, run_text_eval

    sizes = ctx.sizes
    ctx.settings.update(samples=sizes.masked_samples, methods=[list(m) for m in sizes.masked_methods])
    unit = "first-hitting vs ancestral on the text model"
    ctx.planned = [unit]
    bundle = load_model("text", torch.device(ctx.device), masked_ok=True)
    report = run_text_eval(bundle, sizes.masked_samples, methods=list(sizes.masked_methods))
    ctx.results.update(rows=report["rows"], held_out=report["held_out"])
    print(format_text_table(report), flush=True)
    ctx.finished.append(unit)


def ays(ctx: Context) -> None:
    """Align Your Steps on the digits model on the device: seconds, per-sweep log, learned levels."""
    require("sklearn", "scikit-learn (the digits data)")
    from diffsamplers.apps.schedule_job import StoppingRule, optimize_for_model
    from diffsamplers.tuning.ays_optimizer import AYSSettings

    sizes = ctx.sizes
    # refine_sweeps only matters with refinements; 10 is the CPU run's value, so that the settings compare equal.
    settings = AYSSettings(
        num_steps=sizes.ays_nfe,
        refinements=0,
        num_samples=sizes.ays_samples,
        max_sweeps=sizes.ays_sweeps,
        refine_sweeps=10,
        patience=3,
    )
    rule = StoppingRule("dpm++2m", metric_samples=sizes.ays_metric_samples, reference_steps=sizes.ays_reference_steps)
    ctx.settings.update(model="digits", nfe=sizes.ays_nfe, ays=asdict(settings), stopping_rule=asdict(rule))
    ctx.planned = ["AYS optimisation"]
    log = ctx.results.setdefault("log", [])
    started = time.monotonic()

    def record(line: str) -> None:
        log.append({"seconds": round(time.monotonic() - started, 2), "line": line})
        print(f"  [{log[-1]['seconds']:7.1f} s] {line}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits_dpm++2m.safetensors"
        learned = optimize_for_model(
            "digits", sizes.ays_nfe, out, settings, rule, resume=False, device=ctx.device, log=record
        )
    meta = learned.metadata
    ctx.results.update(
        seconds=round(time.monotonic() - started, 2),
        optimiser_seconds=meta["seconds"],
        sweeps=len(meta["klub_history"]) - 1,
        model_evaluations=meta["model_evaluations_this_run"],
        klub_history=meta["klub_history"],
        metric_history=meta["metric_history"],
        levels=learned.levels(sizes.ays_nfe).tolist(),
    )
    ctx.results["cpu_run"] = compare_with_cpu_run(learned.levels(sizes.ays_nfe), meta, settings, rule)
    ctx.finished += ctx.planned


def compare_with_cpu_run(levels: Any, meta: dict[str, Any], settings: Any, rule: Any) -> dict[str, Any]:
    """The CPU run of :data:`CPU_AYS_RUN` next to this one, when both used the same settings."""
    import numpy as np

    from diffsamplers.schedules.learned import LearnedSchedule

    name = str(CPU_AYS_RUN.relative_to(ROOT))
    if not CPU_AYS_RUN.is_file():
        return {"file": name, "compared": False, "reason": "file not found"}
    cpu = LearnedSchedule.load(CPU_AYS_RUN)
    same = (
        cpu.metadata.get("settings") == asdict(settings)
        and cpu.metadata.get("solver") == rule.solver
        and cpu.metadata.get("metric_samples") == rule.metric_samples
    )
    if not same:
        return {"file": name, "compared": False, "reason": "other settings (e.g. --smoke)"}
    cpu_levels = cpu.levels(settings.num_steps)
    return {
        "file": name,
        "compared": True,
        "cpu_optimiser_seconds": cpu.metadata["seconds"],
        "speedup": cpu.metadata["seconds"] / max(meta["seconds"], 1e-9),
        "cpu_levels": cpu_levels.tolist(),
        "max_abs_log_level_ratio": float(np.max(np.abs(np.log(np.asarray(levels) / cpu_levels)))),
    }


PARTS = (
    Part(
        "step_overhead",
        "step_overhead.json",
        step_overhead,
        "ms/step, host reads and CUDA synchronisations per 25-step run: our sample() loop and schedulers vs diffusers'",
    ),
    Part("gpu_tests", "gpu_tests.json", gpu_tests, "pytest -m gpu: outcome of every gpu-marked test"),
    Part(
        "throughput",
        "throughput.json",
        throughput,
        "images/s, our loop vs diffusers' pipeline loop: digits model and a CIFAR-sized random UNet2DModel",
    ),
    Part(
        "particles",
        "particles.json",
        particles,
        "FK steering's K particles in one batch vs K runs, SVDD's M candidates in one call vs M calls (digits model)",
    ),
    Part(
        "masked",
        "masked_text.json",
        masked,
        "first-hitting vs ancestral sampling of the bundled text model: seconds, 5-gram bits/char, entropy",
    ),
    Part("ays", "ays_digits.json", ays, "Align Your Steps optimisation on the digits model: time and levels"),
)


# -- running and recording -----------------------------------------------------------------------------------


def free_device_memory() -> None:
    """Drop what the last part left behind (Python garbage, cached CUDA blocks)."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def environment(device: str, smoke: bool) -> dict[str, Any]:
    """Versions, device, date and the exact command, recorded in every file."""
    import diffusers
    import torch

    import diffsamplers

    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "diffsamplers": diffsamplers.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "smoke": smoke,
    }
    if device == "cuda":
        meta.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        )
    return meta


def run_part(part: Part, device: str, sizes: Sizes, budget_s: float, meta: dict[str, Any]) -> dict:
    """Run ``part`` within ``budget_s`` seconds; its record (status ``ok``, ``partial``, ``skipped`` or ``failed``,
    with the reason when not ``ok``), whatever happened."""
    started = time.monotonic()
    ctx = Context(device, sizes, started + budget_s)
    record: dict[str, Any] = {"part": part.name, "description": part.description, "budget_s": round(budget_s, 1)}
    status, reason = "ok", None
    print(f"\n== {part.name} (budget {budget_s:.0f} s)", flush=True)
    if budget_s < 1.0:
        status, reason = "skipped", "the global deadline was reached before it started"
    else:
        try:
            with time_limit(budget_s):
                part.run(ctx)
            if ctx.skipped:
                status, reason = "partial", "; ".join(f"{s['what']}: {s['reason']}" for s in ctx.skipped)
        except PartSkipped as e:
            status, reason = "skipped", str(e)
        except PartTimeout as e:
            reason = f"{e}; what was measured before is kept"
            ctx.skip_unfinished(str(e))
            status = "partial" if any(ctx.results.values()) else "skipped"
        except Exception as e:  # a crash of one part must not lose the others
            status, reason = "failed", f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc()[-4000:]
            ctx.skip_unfinished(f"not measured: {reason}")
        finally:
            free_device_memory()
    if reason:
        print(f"  {status}: {reason}", flush=True)
    record.update(status=status, reason=reason, wall_s=round(time.monotonic() - started, 2), meta=meta)
    record.update(settings=ctx.settings, results=ctx.results, skipped=ctx.skipped)
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (numpy and torch scalars and arrays as lists or numbers)."""

    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=plain) + "\n")
    tmp.replace(path)


def missing_modules() -> list[str]:
    """The :data:`REQUIRED` modules that are not installed."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu", help="folder for the JSON files")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, on a CPU in < 1 min")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=[p.name for p in PARTS])
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="global deadline, seconds")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help=f"override a part's budget (defaults: {', '.join(f'{k}={v:.0f}' for k, v in BUDGETS_S.items())})",
    )
    args = parser.parse_args(argv)
    budgets = dict(BUDGETS_S)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            parser.error(f"--budget takes PART=SECONDS with PART one of {', '.join(budgets)}, got {item!r}")
        budgets[name] = float(seconds)
    args.budgets = budgets
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts and write their files and ``report.json``; the exit status (see the docstring)."""
    started = time.monotonic()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(
            "gpu_report.py: missing Python packages, nothing was measured:\n"
            + "".join(f"  {name}: install {REQUIRED[name]}\n" for name in missing),
            file=sys.stderr,
        )
        return 2
    for path in (str(SCRIPTS), str(ROOT)):  # the benchmark scripts, and this working tree's diffsamplers first
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_report.py: no CUDA device here; pass --device cpu (with --smoke to check the script)")
            return 2
        if device.index is not None:
            torch.cuda.set_device(device)
    # Imported before any part starts, so that no time limit lands in the middle of an import.
    import bench_step_overhead  # noqa: F401
    import bench_throughput  # noqa: F401

    import diffsamplers.apps.schedule_job  # noqa: F401

    meta = environment(device.type, args.smoke)
    sizes = SMOKE if args.smoke else FULL
    deadline = started + args.total_budget
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, Any]] = {
        p.name: {"file": p.file, "status": "pending" if p.name in args.parts else "not selected (--parts)"}
        for p in PARTS
    }
    for part in PARTS:
        if part.name not in args.parts:
            continue
        budget = min(args.budgets[part.name], deadline - time.monotonic() - RESERVE_S)
        record = run_part(part, device.type, sizes, max(budget, 0.0), meta)
        write_json(args.out / part.file, record)
        summary[part.name] = {"file": part.file, **{k: record[k] for k in ("status", "reason", "budget_s", "wall_s")}}
        report = {"meta": meta, "total_budget_s": args.total_budget, "parts": summary}
        write_json(args.out / "report.json", {**report, "wall_s": round(time.monotonic() - started, 2)})
    wall = time.monotonic() - started
    print(f"\n{'part':<15}{'status':<10}{'seconds':>9}  reason")
    for name, s in summary.items():
        print(f"{name:<15}{s['status']:<10}{s.get('wall_s', 0.0):>9.1f}  {s.get('reason') or ''}")
    print(f"wall time {wall:.1f} s; files in {args.out}")
    return 1 if any(s["status"] == "failed" for s in summary.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
