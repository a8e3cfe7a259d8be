"""The layering of the package, checked on its import graph (read from the source by
tests/import_graph.py: `python tests/import_graph.py` prints it) and in fresh interpreters:

* no import cycles;
* deftx.core imports only deftx.core and deftx.errors, and importing it loads no Ray, MLflow,
  DeepSpeed, transformers or matplotlib; huggingface_hub only inside deftx.core.hub's functions
  (``SparseFineTuning.from_pretrained`` / ``push_to_hub``), so importing the core does not load it;
* deftx.config never loads torch;
* deftx.training loads no Ray or MLflow, and DeepSpeed and torch.distributed are imported only
  under deftx.training.distributed;
* Ray is imported only by the Ray adapters (deftx.jobs.ray, deftx.ray_env, and Ray Tune only by
  deftx.workflows.sweeps.tune);
* MLflow and matplotlib are imported only under deftx.tracking, and importing the plots changes no
  matplotlib state;
* workflows (pipeline, experiments, sweeps) are imported only by the CLI and each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from import_graph import build

HEAVY = ("ray", "mlflow", "deepspeed", "transformers", "matplotlib")


@pytest.fixture(scope="module")
def graph():
    return build()


def _loaded_after_importing(package: str) -> set[str]:
    """Top-level modules in sys.modules after importing every module of ``package`` in a fresh
    interpreter."""
    code = ("import importlib, pkgutil, sys\n"
            f"import {package} as p\n"
            "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(' '.join(sorted({k.split('.')[0] for k in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def test_the_package_has_no_import_cycles(graph):
    assert graph.cycles() == []


def test_core_depends_on_nothing_above_it(graph):
    core = [m for m in graph.modules if m.startswith("deftx.core")]
    assert len(core) >= 8
    for module in core:
        outside = {t for t in graph.edges.get(module, ()) if not t.startswith("deftx.core") and
                   t not in ("deftx", "deftx.errors")}
        assert outside == set(), f"{module} imports {sorted(outside)}"
        assert graph.external[module] <= {"torch", "safetensors", "__future__", "collections", "dataclasses",
                                          "typing", "contextlib", "ctypes", "datetime", "errno", "hashlib",
                                          "json", "math", "os", "pathlib", "re", "shutil", "tempfile", "weakref",
                                          *(("huggingface_hub",) if module == "deftx.core.hub" else ())}, \
            f"{module} imports {sorted(graph.external[module])}"
        if module == "deftx.core.hub":
            assert {t for m, t in graph.local_external if m == module} == {"huggingface_hub"}
    assert _loaded_after_importing("deftx.core").isdisjoint((*HEAVY, "huggingface_hub"))


def test_config_never_loads_torch():
    loaded = _loaded_after_importing("deftx.config")
    assert "torch" not in loaded and loaded.isdisjoint(HEAVY)


def test_training_loads_no_ray_or_mlflow_and_only_its_distributed_part_imports_deepspeed(graph):
    loaded = _loaded_after_importing("deftx.training")
    assert loaded.isdisjoint({"ray", "mlflow", "matplotlib"})
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        uses = {m for m in imported if m.split(".")[0] == "deepspeed" or m.startswith("torch.distributed")}
        if uses and not name.startswith("deftx.training.distributed"):
            assert name == "deftx.ray_env" and uses <= {"torch.distributed"}, f"{name} imports {sorted(uses)}"


def test_ray_is_imported_only_by_the_ray_adapters(graph):
    adapters = {"deftx.jobs.ray", "deftx.ray_env", "deftx.workflows.sweeps.tune"}
    users = {m for m, ext in graph.external.items() if "ray" in ext}
    assert users <= adapters, sorted(users - adapters)


def test_workflows_are_imported_only_by_the_command_line_and_other_workflows(graph):
    for module, targets in graph.edges.items():
        into = {t for t in targets if t.startswith("deftx.workflows")}
        if into:
            assert module.startswith("deftx.workflows") or module == "deftx.cli", f"{module} imports {sorted(into)}"


def test_mlflow_and_matplotlib_are_imported_only_by_tracking(graph):
    for module, external in graph.external.items():
        used = external & {"mlflow", "matplotlib"}
        if used:
            assert module.startswith("deftx.tracking"), f"{module} imports {sorted(used)}"


def test_importing_the_plots_changes_no_matplotlib_state():
    # the raw rcParams entry: reading rcParams['backend'] would itself resolve the backend via pyplot
    code = ("import matplotlib; before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
            "import deftx.tracking.plots\n"
            "import sys; print(dict.__getitem__(matplotlib.rcParams, 'backend') == before,"
            " 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["True", "False"]
