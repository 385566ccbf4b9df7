"""Command-line plumbing shared by ``diffsamplers`` and the scripts.

* :class:`CommandParser` — an ``ArgumentParser`` whose usage errors are one line, ``prog: error: --flag …``
  (exit 2), and whose help shows every default;
* checked argument types — :func:`integer`, :func:`finite_float`, :func:`positive_float`, :func:`guidance_scale`,
  :func:`class_labels`, :func:`device`, :func:`spec` (a spec parser of :mod:`~diffsamplers.apps.recipes`),
  :func:`output_file` and :func:`output_folder`: a bad value fails while the arguments are parsed, naming the flag
  and the value;
* :func:`run_command` — parse, create the folders of the outputs, run the command; ``ValueError``,
  ``TypeError`` and ``OSError`` of the library (bad input found later) become ``prog: error: message`` (exit 2).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_SOLVER",
    "USER_ERRORS",
    "CommandParser",
    "HelpFormatter",
    "add_commands",
    "add_output",
    "add_sampler_arguments",
    "class_labels",
    "device",
    "finite_float",
    "guidance_scale",
    "help_text",
    "integer",
    "output_file",
    "output_folder",
    "parse_class_labels",
    "plot_suffixes",
    "positive_float",
    "run_command",
    "seed",
    "set_command",
    "spec",
]

#: Errors that report bad input: shown as one line, exit status 2.
USER_ERRORS = (ValueError, TypeError, OSError)

#: Largest seed: per-sample seeds are taken modulo 2**63 (:func:`diffsamplers.metrics.shards.sample_seed`).
MAX_SEED = 2**63 - 1

_ARGUMENT = re.compile(r"argument (?P<flag>[^:]+): (?P<text>.*)", re.S)

#: The solver of ``--solver`` when none is given (a masked model then takes the first-hitting sampler).
DEFAULT_SOLVER = "dpm++2m"


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def flag_message(message: str) -> str:
    """argparse's ``argument --flag: must be …`` as ``--flag must be …`` (other messages: ``--flag: …``)."""
    match = _ARGUMENT.fullmatch(message)
    if match is None:
        return one_line(message)
    text = match["text"]
    return one_line(f"{match['flag']}{' ' if text.startswith('must ') else ': '}{text}")


class HelpFormatter(argparse.HelpFormatter):
    """Help with ``(default: …)`` after every option that has a default, and spec lists not broken at hyphens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == argparse.SUPPRESS
        if hidden or not action.option_strings or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(one_line(text), width, break_on_hyphens=False, break_long_words=False)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with one-line usage errors (exit 2) and :class:`HelpFormatter` (sub-commands too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {flag_message(message)}\n")


def help_text(text: str) -> str:
    """``text`` safe for argparse's %-formatting of help strings."""
    return text.replace("%", "%%")


# -- commands ---------------------------------------------------------------------------------------


def set_command(
    parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int], outputs: Sequence[str] = ()
) -> None:
    """``parser`` runs ``func``; ``outputs`` are the destinations of the paths it writes (their folders are
    created before it runs)."""
    parser.set_defaults(func=func, command_prog=parser.prog, outputs=tuple(outputs))


def add_commands(parser: argparse.ArgumentParser, dest: str) -> Any:
    """Sub-commands of ``parser``; running ``parser`` without one says which there are (one line, exit 2)."""
    commands = parser.add_subparsers(dest=dest, title="commands")

    def missing(_args: argparse.Namespace) -> int:
        names = ", ".join(commands.choices)
        raise ValueError(f"missing command: choose one of {names} (see {parser.prog} --help)")

    set_command(parser, missing)
    return commands


class _Output(argparse.Action):
    """Stores the path; a deprecated alias (not in ``option_strings``, so not in help or messages) still parses,
    with a warning."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None and option_string not in self.option_strings:
            print(
                f"{parser.prog}: warning: {option_string} is deprecated, use {self.option_strings[0]}", file=sys.stderr
            )
        setattr(namespace, self.dest, values)


def add_output(
    parser: argparse.ArgumentParser, help: str, *, dest: str = "output", alias: str | None = None, **kwargs: Any
) -> argparse.Action:
    """``--output`` (and a hidden, deprecated ``alias`` such as ``--out``) storing into ``dest``."""
    names = ["--output", *([alias] if alias else [])]
    action = parser.add_argument(*names, action=_Output, dest=dest, help=help, **kwargs)
    action.option_strings = ["--output"]  # the parser still knows the alias; help, usage and errors do not
    return action


def _create_folders(args: argparse.Namespace) -> None:
    for dest in getattr(args, "outputs", ()):
        value = getattr(args, dest, None)
        if value:
            Path(value).parent.mkdir(parents=True, exist_ok=True)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, create the output folders, run the command; the exit status (2: bad input, one line)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, already printed on one line (2)
        return done.code if isinstance(done.code, int) else 2
    try:
        _create_folders(args)
        return int(args.func(args))
    except USER_ERRORS as err:
        print(f"{args.command_prog}: error: {one_line(err)}", file=sys.stderr)
        return 2


# -- argument types ---------------------------------------------------------------------------------


def _typed(name: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
    check.__name__ = name  # argparse names the type in some messages
    return check


def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An int in [minimum, maximum]: ``--flag must be a positive integer, got -1``."""
    if maximum is not None:
        wanted = f"an integer in {minimum}..{maximum}"
    else:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return _typed("integer", check)


#: A seed: 0 … 2**63 − 1.
seed = integer(0, MAX_SEED)


def _number(text: str, accept: Callable[[float], bool], wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def finite_float(text: str) -> float:
    """A finite number: ``--flag must be a finite number, got nan``."""
    return _number(text, lambda _value: True, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0: ``--flag must be a finite number > 0, got 0``."""
    return _number(text, lambda value: value > 0, "a finite number > 0")


def outlier_factor(text: str) -> float | None:
    """An outlier factor of a schedule search: 0 (off: ``None``, the plain RMS) or a finite number > 1."""
    value = _number(text, lambda value: value == 0 or value > 1, "0 (off) or a finite number > 1")
    return value or None


def guidance_scale(text: str) -> float:
    """A classifier-free guidance scale: finite and > 0 (1 = no guidance; 0 would ignore the condition)."""
    return _number(text, lambda value: value > 0, "a finite number > 0 (1 = no guidance)")


def parse_class_labels(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def class_labels(text: str) -> str:
    """Comma-separated integer class labels (checked against the model once it is loaded)."""
    try:
        labels = parse_class_labels(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integer class labels, got {text}") from None
    return ",".join(map(str, labels))


def _device_problem(name: str) -> str | None:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"must be a torch device such as cpu, cuda, cuda:1 or mps, got {name}"
    if dev.type == "cpu":
        return None
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        return f"{name} is not a device to sample on; use cpu or an accelerator (cuda, mps, xpu)"
    if not is_available():
        return f"{name} is not available on this machine ({backend.__name__}.is_available() is False); use --device cpu"
    count = getattr(getattr(torch, dev.type, None), "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        return f"{name} is not available on this machine: it has {count} {dev.type} device(s)"
    return None


def device(text: str) -> str:
    """A torch device string that exists here (``cuda`` only where CUDA is available)."""
    problem = _device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def spec(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """A spec checked by ``parse`` (e.g. :func:`~diffsamplers.apps.recipes.parse_solver`); the spec is kept."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return _typed("spec", check)


def plot_suffixes() -> frozenset[str]:
    """File extensions matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase

    return frozenset(f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes())


def _writable_folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create the folder {folder}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing}"
    return None


#: Extensions named first in messages.
_COMMON_SUFFIXES = (".png", ".jpg", ".webp", ".pdf", ".svg", ".json", ".npz", ".safetensors")


def _known(suffixes: Collection[str]) -> list[str]:
    """``suffixes``, the common ones first."""
    return [s for s in _COMMON_SUFFIXES if s in suffixes] + sorted(set(suffixes) - set(_COMMON_SUFFIXES))


def _suffix_problem(path: Path, suffixes: Collection[str], what: str) -> str | None:
    if path.suffix.lower() in suffixes:
        return None
    known = _known(suffixes)
    listed = ", ".join(known[:5]) + (", …" if len(known) > 5 else "")
    found = f"the extension {path.suffix!r}" if path.suffix else "no file extension"
    return f"{path} has {found}: {what} needs {'one of ' if len(known) > 1 else ''}{listed}"


def output_file(
    suffixes: Collection[str] | Callable[[], Collection[str]] | None = None, what: str = "the file"
) -> Callable[[str], str]:
    """A file to write: not a folder, with one of ``suffixes`` (a set, or a function giving it), in a folder
    that exists or can be created."""

    def check(text: str) -> str:
        path = Path(text)
        allowed = suffixes() if callable(suffixes) else suffixes
        if path.is_dir():
            example = path / f"output{_known(allowed)[0] if allowed else ''}"
            problem: str | None = f"{path} is a folder; give a file name, e.g. {example}"
        else:
            problem = (_suffix_problem(path, allowed, what) if allowed else None) or _writable_folder_problem(
                path.parent
            )
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    return _typed("output_file", check)


def output_folder(text: str) -> str:
    """A folder to write into: an existing folder, or a path where one can be created."""
    path = Path(text)
    problem = f"{path} is a file, not a folder" if path.exists() and not path.is_dir() else None
    problem = problem or _writable_folder_problem(path)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


# -- argument groups --------------------------------------------------------------------------------


def add_sampler_arguments(
    parser: argparse.ArgumentParser,
    *,
    guidance: float | None,
    guidance_help: str,
    classes_help: str,
    guidance_specs: bool = False,
) -> None:
    """What makes a sampler: ``--model``, ``--solver``, ``--steps``, ``--schedule``, ``--guidance``, ``--classes``,
    ``--seed`` and ``--device`` (specs checked by the registry's and the recipe parser's own functions).
    ``guidance_specs``: ``--guidance`` takes guidance specs (:func:`~diffsamplers.apps.recipes.parse_guidance`),
    else a classifier-free scale only."""
    from .recipes import (
        describe_guidances,
        describe_schedules,
        describe_solvers,
        parse_guidance,
        parse_schedule,
        parse_solver,
    )
    from .registry import describe_models

    parser.add_argument("--model", default="digits", help=help_text(f"model: {describe_models()}"))
    parser.add_argument(
        "--solver",
        default=DEFAULT_SOLVER,
        type=spec(parse_solver),
        help=help_text(f"solver spec: {describe_solvers()}"),
    )
    parser.add_argument("--steps", type=integer(), default=20, help="sampling steps")
    parser.add_argument(
        "--schedule",
        default=None,
        type=spec(parse_schedule),
        help=help_text(
            f"schedule spec: {describe_schedules()}; default: the model's — linspace, or flow:shift=S (its "
            "scheduler config's shift) for a flow-matching model"
        ),
    )
    if guidance_specs:
        parser.add_argument(
            "--guidance",
            type=spec(parse_guidance),
            default=guidance,
            help=help_text(f"{guidance_help}; {describe_guidances()}"),
        )
    else:
        parser.add_argument("--guidance", type=guidance_scale, default=guidance, help=guidance_help)
    parser.add_argument("--classes", type=class_labels, default=None, help=classes_help)
    parser.add_argument("--seed", type=seed, default=0, help="base seed (every sample index has its own seed)")
    parser.add_argument("--device", type=device, default=None, help="torch device, e.g. cpu or cuda:0")


def add_refine_validation_arguments(parser: argparse.ArgumentParser, validation: int, validation_help: str) -> None:
    """The DC ratio refinement's validation options, shared by the scripts that refine
    (:func:`~diffsamplers.tuning.dc_search.search_dc_ratios`): ``--refine-validation`` (noises), ``--refine-patience``
    and ``--refine-unvalidated``."""
    from ..tuning.dc_search import REFINE_PATIENCE

    parser.add_argument("--refine-validation", type=int, default=validation, help=validation_help)
    parser.add_argument(
        "--refine-patience",
        type=int,
        default=REFINE_PATIENCE,
        help="stop after this many iterations without a lower validation loss (0: never)",
    )
    parser.add_argument(
        "--refine-unvalidated",
        action="store_true",
        help="keep the best iterate on the search noises themselves (overfits them)",
    )
