"""The test session's network (tests/loopback.py): loopback only, and, when the session left the
host network itself, every pytest-xdist worker can still run a command on that host network (what
tests/test_listeners.py needs to look at a user's machine from outside)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import loopback
import pytest


def test_the_session_sees_only_the_loopback_interface():
    if os.environ.get("DEFTX_TEST_NETWORK") == "host" or not loopback.only_loopback_interfaces():
        pytest.skip("the session runs on the host network")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]


def test_a_worker_reaches_the_host_network_whenever_the_session_left_it_itself():
    """The process that isolated the session (pytest, or the xdist controller) publishes its host
    namespace; this process, a worker or the session itself, must then be able to use it."""
    left_itself = loopback.HOST_NETNS_VAR in os.environ
    assert loopback.host_network_available() == (left_itself or not loopback.only_loopback_interfaces())
    if not left_itself:
        pytest.skip("the session started isolated (e.g. under unshare --net): no host network to reach")
    names = subprocess.run([sys.executable, "-c", "import socket; print([n for _, n in socket.if_nameindex()])"],
                           capture_output=True, text=True, check=True, **loopback.on_host_network()).stdout
    assert names.strip() != "['lo']", names
