"""Shared pytest fixtures."""

import os

import pytest


@pytest.fixture(scope="session")
def root() -> None:
    """Require root for tests that touch the kernel (namespaces, veths, BPF).

    Without root such tests are skipped, except on CI (``CI=true``) where they
    fail, so a misconfigured runner cannot silently skip them.
    """
    if os.geteuid() == 0:
        return
    reason = "needs root (network namespaces, veths, BPF)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
