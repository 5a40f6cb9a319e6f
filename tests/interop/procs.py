"""The child processes of an interop test: started with their output in files, waited on by
what they print, all stopped at the test's end (the `run` fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from labtools import wait_until

START_TIMEOUT = 10.0  # a program's "ready" line


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("DRAFT", "MOQT_DRAFT"):  # aiomoqt's relay reads these; the tests pin --draft instead
        env.pop(name, None)
    return env


class Proc:
    """A child process whose stdout/stderr go to files under the test's tmp_path."""

    def __init__(self, name: str, argv: list[str], tmp_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_env())

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.out_path, self.err_path) if p.exists())

    def wait_for(self, pattern: str, logs: Callable[[], str], timeout: float = START_TIMEOUT) -> None:
        """Wait until `pattern` (regex) appears in the output; fail (with `logs()`) on timeout or
        as soon as the process exits without it."""
        rx = re.compile(pattern)

        def seen() -> bool:
            exited = self.proc.poll() is not None  # before reading: what it printed before exiting counts
            if rx.search(self.output()):
                return True
            assert not exited, f"{self.name} exited without printing {pattern!r}\n{logs()}"
            return False

        wait_until(seen, timeout, lambda: f"{pattern!r} from {self.name}\n{logs()}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def last_json(self, timeout: float) -> dict:
        """The last JSON object it printed on stdout, once it exited."""
        self.proc.wait(timeout)
        lines = [line for line in self.out_path.read_text().splitlines() if line.startswith("{")]
        assert lines, self.tail()
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)

    def tail(self, lines: int = 25) -> str:
        text = self.output().splitlines()
        return f"--- {self.name} (rc={self.proc.poll()}): {' '.join(self.argv[1:])}\n" + "\n".join(text[-lines:])


class Run:
    """Children of one test; all are stopped at the end, whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.tmp_path)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)
