"""Reusing another experiment's finished units: copied (hard-linked where the file system allows)
into this experiment's layout, where each unit's own key check then decides whether it is used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from deftx.jobs.spec import Log


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def adopt(source: Path, target: Path, log: Log) -> None:
    """Copy ``source`` (a finished unit of another experiment) to ``target`` if ``target`` does not
    exist; hard links where the file system allows. The unit's own digest check then decides
    whether it is used."""
    if target.exists() or not source.is_dir():
        return

    tmp = target.with_name(f".{target.name}.adopt")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp, copy_function=link_or_copy)
    tmp.replace(target)
    log(f"adopted {source} as {target}")


def adopt_scores(other: Path, target: Path, pipeline: dict[str, Any], log: Log) -> None:
    """Link the cached scores of the experiment in ``other`` if it evaluated on the same data
    (scores are keyed by the digests of the models they score)."""
    source = other / "scores"
    try:
        theirs = json.loads((other / "experiment.json").read_text(encoding="utf-8"))["pipeline"]
    except (OSError, ValueError, KeyError):
        return
    same = ("model", "data", "task", "max_eval_examples", "eval_batch_size")
    if not source.is_dir() or any(theirs.get(k) != pipeline.get(k) for k in same):
        log(f"not reusing the scores of {other}: different evaluation settings")
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        if not (target / path.name).exists():
            link_or_copy(path, target / path.name)
