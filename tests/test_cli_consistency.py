"""One meaning per flag, the deprecated spellings, examples in every --help, `deftx config show`,
`deftx presets`, and files written with the user's umask."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys

import pytest
import torch
import yaml

from deftx.cli import EXAMPLES, _subparsers, build_parser, main
from deftx.config import load_pipeline_config, to_dict
from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning


def test_every_help_ends_with_an_example_that_parses(capsys):
    parser = build_parser()
    progs = []
    for p in _subparsers(parser):
        progs.append(p.prog)
        text = p.format_help().rstrip()
        assert text.splitlines()[-1].strip().startswith("example:") or "example: deftx" in text.split("\n\n")[-1], p.prog
        argv = shlex.split(EXAMPLES[p.prog])
        assert argv[0] == "deftx"
        args = build_parser().parse_args(argv[1:])      # the example is a valid command line
        assert args.func is not None
        expected = p.prog.split()[1:]
        assert argv[1:1 + len(expected)] == expected or p.prog == "deftx", p.prog
    assert "deprecated" not in capsys.readouterr().err   # examples use the current spellings
    assert set(progs) == set(EXAMPLES)                    # no example for a command that does not exist
    assert len(progs) >= 25


@pytest.mark.parametrize("old, new, dest, argv", [
    ("--out", "--output-dir", "out", ["train-lang", "--lang", "jav", "{flag}", "o"]),
    ("--out", "--output-dir", "out", ["registry", "get", "m@champion", "{flag}", "o"]),
    ("--lang", "--lang-sft", "lang", ["evaluate", "--task", "t", "{flag}", "o", "--languages", "jav"]),
    ("--lang", "--lang-sft", "lang", ["sft", "compose", "--task", "t", "{flag}", "o", "--output-dir", "x"]),
    ("--langs", "--languages", "langs", ["sweep", "--space", "s.yaml", "{flag}", "o"]),
    ("--samples", "--num-samples", "samples", ["sweep-subnetworks", "nusax", "--space", "s.yaml", "{flag}", "5"]),
])
def test_old_spellings_still_work_and_say_what_to_use(capsys, old, new, dest, argv):
    parser = build_parser()
    current = parser.parse_args([new if a == "{flag}" else a for a in argv])
    assert capsys.readouterr().err == ""
    deprecated = parser.parse_args([old if a == "{flag}" else a for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{old} is deprecated" in err[0] and f"use {new}" in err[0] and "0.4" in err[0]
    assert getattr(deprecated, dest) == getattr(current, dest) not in (None, "")


def test_a_required_renamed_option_is_still_required(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-lang", "--lang", "jav"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "deftx train-lang: error: the following arguments are required: --output-dir" in err


def test_lang_means_a_language_code_and_lang_sft_a_directory():
    """Across commands, --lang is a language code and a directory is always --lang-sft."""
    for p in _subparsers(build_parser()):
        for action in p._actions:
            if "--lang" in action.option_strings and action.help != "==SUPPRESS==":
                assert "code" in action.help, (p.prog, action.help)
            if "--lang-sft" in action.option_strings:
                assert "SFT director" in action.help, p.prog
            if "--out" in action.option_strings:
                assert action.help == "==SUPPRESS==", p.prog   # only as the deprecated spelling


def test_config_show_prints_the_merged_validated_config(capsys, tmp_path):
    assert main(["config", "show", "--preset", "demo", "--set", "seed=7", "--set",
                 "language_sft.selection.rank=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["seed"] == 7 and shown["language_sft"]["selection"]["rank"] == 8
    assert shown["language_sft"]["selection"]["energy"] is None      # the either-or rule was applied
    expected = to_dict(load_pipeline_config(preset="demo", overrides=["seed=7", "language_sft.selection.rank=8"]))
    assert yaml.safe_load(yaml.safe_dump(expected)) == shown
    # what it prints is a config file that loads to the same configuration
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(shown))
    assert to_dict(load_pipeline_config(config=str(tmp_path / "shown.yaml"))) == expected

    assert main(["config", "show", "--experiment", "nusax", "--preset", "tuned", "--json"]) == 0
    import json
    exp = json.loads(capsys.readouterr().out)
    assert exp["tuning"]["trials"] == 6 and exp["pipeline"]["source_language"] == "ind"

    assert main(["config", "show", "--preset", "demo", "--set", "language_sft.selection.density=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "density" in err[0]


def test_presets_lists_pipeline_and_experiment_presets(capsys):
    from importlib import resources

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    folder = resources.files("deftx.presets")
    for f in folder.iterdir():
        if f.name.endswith(".yaml"):
            assert f"  {f.name[:-5]} " in out
    for f in folder.joinpath("experiments").iterdir():
        dataset, _, name = f.name[:-5].partition("-")
        section = out.split(f"{dataset} experiment presets")[1].split("\n\n")[0]
        assert f"  {name} " in section, f.name


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                      (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    """Written in a child process, so the umask of the test process is untouched."""
    code = (
        "import os, sys, torch\n"
        f"os.umask({umask})\n"
        "from deftx.core.sft import SFTMetadata, SparseDelta, SparseFineTuning\n"
        "sft = SparseFineTuning({'w': SparseDelta((4,), torch.tensor([1]), torch.tensor([0.5]))}, {},"
        " SFTMetadata(kind='language', language='jav'))\n"
        "sft.save(sys.argv[1])\n")
    target = tmp_path / "sft"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, timeout=120,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    for f in target.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f.name


def test_in_process_save_follows_the_current_umask(tmp_path):
    sft = SparseFineTuning({"w": SparseDelta((4,), torch.tensor([1]), torch.tensor([0.5]))}, {},
                           SFTMetadata(kind="language", language="jav"))
    mask = os.umask(0o022)
    os.umask(mask)
    sft.save(tmp_path / "sft")
    assert stat.S_IMODE((tmp_path / "sft").stat().st_mode) == 0o777 & ~mask
