"""Helpers for working with named network namespaces (``ip netns`` style)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_RUN_DIR = "/run/netns"


def _path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name``.

    Only the calling thread is switched; it is switched back to its previous
    namespace on exit, also when the body raises. Sockets created inside keep
    their namespace afterwards, and child processes forked inside start in it.
    ``None`` leaves the thread where it is.
    """
    if name is None:
        yield
        return
    origin = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.setns(target, os.CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            yield
        finally:
            os.setns(origin, os.CLONE_NEWNET)
    finally:
        os.close(origin)


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """Return ``argv`` prefixed so that it runs inside namespace ``name``."""
    return ["ip", "netns", "exec", name, *argv]


def exists(name: str) -> bool:
    """Tell whether the named network namespace exists."""
    return os.path.ismount(_path(name))
