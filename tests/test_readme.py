"""The README quotes what its first command prints: the table under "What the main job does" is the
results file of a recorded run of that command (benchmarks/results/demo/), and that run used the
demo preset as it is now, so changing the preset without re-running and re-quoting fails here."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "demo"


def _readme_table() -> dict[str, tuple[str, str]]:
    """{row label: (task + lang SFT, task SFT only)} of the first results table in the README's
    "What the main job does" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What the main job does", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and re.fullmatch(r"\d+\.\d", cells[2]):
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def test_the_readme_quotes_the_recorded_run_of_command_one():
    results = json.loads((RECORD / "results.json").read_text(encoding="utf-8"))
    expected = {f"{r['language']} ({r['name']})": (f"{100 * r['macro_f1']:.1f}", f"{100 * r['task_only_macro_f1']:.1f}")
                for r in results["rows"]}
    targets = [r for r in results["rows"] if r["role"] == "target"]
    expected["average of targets"] = (f"{100 * sum(r['macro_f1'] for r in targets) / len(targets):.1f}",
                                      f"{100 * sum(r['task_only_macro_f1'] for r in targets) / len(targets):.1f}")
    assert _readme_table() == expected
    printed = (RECORD / "results.md").read_text(encoding="utf-8")
    for label, (composed, alone) in expected.items():
        assert f"{label} |" in printed and f"| {composed} | {alone} |" in printed


def _as_recorded(current: dict, recorded: dict) -> dict:
    """``current`` without the settings added since the record that are at their off default (None):
    such a setting changes nothing, as the job cache keys also say (deftx/jobs/cache.py)."""
    out = {}
    for key, value in current.items():
        if key not in recorded and value is None:
            continue
        out[key] = _as_recorded(value, recorded[key]) if isinstance(value, dict) and isinstance(
            recorded.get(key), dict) else value
    return out


def test_the_recorded_run_used_the_current_demo_preset():
    from deftx.config import load_pipeline_config

    provenance = json.loads((RECORD / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["command"].endswith("deftx pipeline --preset demo")
    assert provenance["config"] == _as_recorded(asdict(load_pipeline_config(preset="demo")), provenance["config"])
    minutes = f"{provenance['wall_seconds'] / 60:.0f} min"
    assert minutes in (ROOT / "README.md").read_text(encoding="utf-8").split("```", 1)[0]
