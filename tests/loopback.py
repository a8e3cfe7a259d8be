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
    if only_loopback_interfaces():
        return "loopback only (already isolated)"
    if os.geteuid() != 0:
        return "host network (not root: services bind 127.0.0.1, but torch's rendezvous listens on all interfaces)"
    global _host_netns_fd
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(host)
        return f"host network (unshare failed: {os.strerror(ctypes.get_errno())})"
    _host_netns_fd = host
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
