"""The public API listed in ``deftx/__init__.py``: every name resolves, ``import deftx`` stays light,
and the docstring's example runs (on tiny SFTs laid out where the README's main job leaves them)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

from helpers import LABELS, make_sft

import deftx


def test_every_public_name_resolves():
    for name in deftx.__all__:
        assert getattr(deftx, name) is not None, name
    assert set(deftx.__all__) <= set(dir(deftx))


def test_importing_deftx_loads_neither_torch_nor_ray():
    code = "import sys, deftx; print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docstring_example_runs(base_dir, tmp_path, monkeypatch, capsys):
    from deftx.models import load_classifier, load_masked_lm

    for kind, model, name in (("task", load_classifier(str(base_dir), LABELS, seed=0), "task-nusax_senti"),
                              ("language", load_masked_lm(str(base_dir))[0], "lang-jav")):
        sft = make_sft(model, kind, seed=3)
        sft.metadata = dataclasses.replace(sft.metadata, base_model=str(base_dir), tokenizer=str(base_dir))
        sft.save(tmp_path / "runs" / "demo" / "sfts" / name)
    example = re.search(r"score a\nsentence::\n\n(.*?)\n\n``tests/", deftx.__doc__, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "deftx-example", "exec"), {})
    assert capsys.readouterr().out.strip() in LABELS
