"""Helpers for tests that start processes or watch this one."""

import socket


def free_port():
    """A TCP port on the loopback that nothing listens on now (for paddle.distributed.launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes():
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
