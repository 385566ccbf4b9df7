"""The README cannot rot: its Python examples run as written, its first commands are the ones CI runs, it stays a
front door (at most 200 lines), and every relative link of the README and of ``docs/*.md`` points to a file that
exists (and, for a ``#fragment`` into a Markdown file, to a heading or an ``id`` there)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
MAX_LINES = 200

#: A fenced code block: its language and its body.
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
#: A Markdown link or image: ``[text](target)`` / ``![alt](target "title")``.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
HTML_ID = re.compile(r"""<a\s[^>]*\b(?:id|name)=["']([^"']+)["']""")


def _blocks(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code spans (neither holds links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors: set[str] = set(HTML_ID.findall(text))
    seen: dict[str, int] = {}
    for heading in HEADING.findall(text):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


README_TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = _blocks(README_TEXT, "python")
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door():
    lines = README_TEXT.splitlines()
    assert len(lines) <= MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {MAX_LINES}, move the rest to docs/"
    )
    assert len(PYTHON_BLOCKS) >= 2, "the README should show a diffusers drop-in and a sample() example"


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"python-block-{i + 1}" for i in range(len(PYTHON_BLOCKS))])
def test_python_example_runs_as_written(code):
    """Each ```python block runs on its own, in a fresh namespace: it must import every name it uses."""
    exec(compile(code, "README.md (python block)", "exec"), {"__name__": "__readme__"})


def _ci_commands() -> list[list[str]]:
    """The commands of ``.ci/run``, tokenised, without comments and shell set-up."""
    commands = []
    for line in CI.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#!") else ""
        if line:
            commands.append(shlex.split(line))
    return commands


def _pip_install_arguments(tokens: list[str]) -> list[str] | None:
    """What ``[python -m] pip install [-q] [--upgrade] …`` installs, or None for another command."""
    if "pip" not in tokens or "install" not in tokens[tokens.index("pip") :]:
        return None
    rest = tokens[tokens.index("install", tokens.index("pip")) + 1 :]
    return [t for t in rest if t not in ("-q", "--quiet", "-U", "--upgrade")]


def test_first_commands_are_the_ones_ci_runs():
    before = README_TEXT[: README_TEXT.index("```")].strip().splitlines()
    assert all(line.startswith("# ") for line in before), "the two commands must open the README (after its title)"
    commands = [line.strip() for line in _blocks(README_TEXT)[0].splitlines() if line.strip()]
    assert len(commands) == 2, f"the first code block must hold exactly two commands, got {commands}"
    first, second = ([shlex.split(part) for part in line.split("&&")] for line in commands)

    ci = _ci_commands()
    installs = [args for args in map(_pip_install_arguments, ci) if args and args != ["pip"]]
    first_install = next(args for args in installs if args[0].startswith("torch=="))
    extras = next(args for args in installs if args[:1] == ["-e"] and args != first_install)
    test_command = next((c for c in ci if c[0] == "pytest"), None)
    assert test_command is not None, ".ci/run should run the tests with pytest"
    runs_main_job = any(
        "diffsamplers" in c and c[c.index("diffsamplers") + 1 : c.index("diffsamplers") + 2] == ["sample"] for c in ci
    )
    assert runs_main_job, ".ci/run should run the README's main job, `diffsamplers sample`"

    assert first == [["pip", "install", *first_install], ["diffsamplers", "sample"]], commands[0]
    assert second == [["pip", "install", *extras], test_command], commands[1]
    assert re.search(r"^diffsamplers\s*=", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M), (
        "pyproject.toml must install the `diffsamplers` command"
    )


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text(encoding="utf-8"))) if not re.match(r"[a-z][\w+.-]*:", t)]


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in _links(path):
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no file {os.path.relpath(resolved, ROOT)})")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading or id #{fragment} in {resolved.name})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)
