"""Run the test session in a loopback-only network namespace (what `unshare --net` with `lo` up
does for a command, done here for the pytest process itself), so that every server the tests start
(Ray, torch's rendezvous store, gloo, MLflow) is reachable from 127.0.0.1 alone.

torch's TCPStore listens on the wildcard address whatever MASTER_ADDR says, and Ray Train sets up
torch.distributed through it; inside the namespace the wildcard is the loopback interface only.
Needs root (CAP_SYS_ADMIN), as on the development machines and CI; elsewhere the session runs on the
host network and says so. ``DEFTX_TEST_NETWORK=host`` opts out.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1

# the network namespace the session started in (kept open by isolate()), for the tests that must
# look at what a user sees on the machine's real interfaces
_host_netns_fd: int | None = None
# how a pytest-xdist worker, started inside the controller's namespace, finds that host namespace:
# the /proc path of the descriptor the controller keeps open
HOST_NETNS_VAR = "DEFTX_TEST_HOST_NETNS"


def _bring_up(interface: bytes = b"lo") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", interface, 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", interface, flags | IFF_UP, b""))


def only_loopback_interfaces() -> bool:
    names = [name for _, name in socket.if_nameindex()]
    return names == ["lo"]


def isolate() -> str:
    """Move this process (and every child it starts afterwards) to a new network namespace with
    only ``lo``, up. Returns a one-line description of the network the session uses."""
    if os.environ.get("DEFTX_TEST_NETWORK") == "host":
        return "host network (DEFTX_TEST_NETWORK=host)"
    global _host_netns_fd
    if only_loopback_interfaces():
        inherited = os.environ.get(HOST_NETNS_VAR)
        if inherited and _host_netns_fd is None:
            try:
                _host_netns_fd = os.open(inherited, os.O_RDONLY)
            except OSError:
                return "loopback only (already isolated; the host namespace is not reachable)"
            return "loopback only (the namespace of the pytest-xdist controller)"
        return "loopback only (already isolated)"
    if os.geteuid() != 0:
        return "host network (not root: services bind 127.0.0.1, but torch's rendezvous listens on all interfaces)"
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(host)
        return f"host network (unshare failed: {os.strerror(ctypes.get_errno())})"
    _host_netns_fd = host
    os.environ[HOST_NETNS_VAR] = f"/proc/{os.getpid()}/fd/{host}"   # for the workers this process starts
    _bring_up()
    return "loopback only (private network namespace)"


def host_network_available() -> bool:
    """Whether commands can be run on the network the session started on (see ``on_host_network``)."""
    return _host_netns_fd is not None or not only_loopback_interfaces()


def on_host_network() -> dict:
    """``subprocess`` keyword arguments that run the child in the network namespace the test
    session started in (the machine's real interfaces); none if the session never left it."""
    fd = _host_netns_fd
    if fd is None:
        return {}

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns to the host network namespace failed")

    return {"preexec_fn": enter, "pass_fds": (fd,)}
