"""Every command the README and docs/ show parses with the real argument parser: a renamed option or
command fails here, not in a user's shell. Commands run through ``ray_jobs/`` entry points are
checked as the ``deftx`` command they forward to."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deftx.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RAY_JOBS = {"pipeline.py": ["pipeline"], "experiment.py": ["experiment"], "sweep.py": ["sweep"],
            "sweep_subnetworks.py": ["sweep-subnetworks"]}


def _shell_lines(text: str) -> list[str]:
    """The lines of the fenced shell blocks, continuation lines joined, comments dropped."""
    out: list[str] = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _deftx_argv(line: str) -> list[str] | None:
    """The deftx arguments of a shell line, or None if it runs no deftx command."""
    for part in re.split(r"&&|;|\|", line):
        words = shlex.split(part.replace("$PWD", "/pwd"))
        for i, word in enumerate(words):
            if word.endswith("bin/deftx") or word == "deftx":
                return words[i + 1:]
            if word.startswith("ray_jobs/"):
                name = Path(word).name
                if name == "train_sft.py":
                    rest = words[i + 1:]
                    kind = rest[rest.index("--kind") + 1]
                    rest = rest[:rest.index("--kind")] + rest[rest.index("--kind") + 2:]
                    return [{"language": "train-lang", "task": "train-task"}[kind], *rest]
                return [*RAY_JOBS[name], *words[i + 1:]]
    return None


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in _shell_lines(path.read_text(encoding="utf-8")):
            argv = _deftx_argv(line)
            if argv:
                found.append((f"{path.relative_to(ROOT)}: {line[:80]}", argv))
    return found


COMMANDS = _commands()


def test_the_docs_show_the_main_commands():
    shown = {argv[0] for _, argv in COMMANDS}
    assert {"pipeline", "sweep", "registry", "predict", "experiment", "train-lang", "train-task", "evaluate",
            "train-subnetworks", "subnetworks-export", "sweep-subnetworks"} <= shown


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_command_in_the_docs_parses(where, argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `deftx {' '.join(argv)}` does not parse (exit {exc.code})")
