"""The interop tests' shared fixture: their child processes, stopped at each test's end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import Run


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.stop_all()
