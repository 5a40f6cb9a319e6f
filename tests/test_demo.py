"""`make demo` with the kernel data path made unavailable: one line per section says why, each
section runs the userspace path, every subscriber's video decodes, nothing prints None or a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fastrelay.demo import section
from fastrelay.doctor import DISABLE_ENV

UNAVAILABLE = f"kernel data path unavailable: disabled by {DISABLE_ENV}=1; running the userspace path only"


@pytest.mark.usefixtures("root")
def test_without_the_kernel_path_every_section_runs_the_userspace_path(tmp_path):
    """The whole demo, for real (namespace labs, relays, ffmpeg, BPF delay probes): about 30 s."""
    proc = subprocess.run([sys.executable, "-m", "fastrelay.demo"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, DISABLE_ENV: "1"}, timeout=240)
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr, proc.stderr
    assert proc.returncode == 0, out
    assert not re.search(r"\bNone\b", out) and "section failed" not in out and "lab: cannot build" not in out
    sections = out.split("\n== ")[1:]
    assert [s.split(".", 1)[0] for s in sections] == ["1", "1b", "2", "3"]
    for s in sections:  # the reason, once, right under the title
        assert s.splitlines()[1] == UNAVAILABLE
    assert out.count("kernel data path unavailable") == 4
    moq, moq_paths, delivery, compare = sections
    assert "0 subscribers on the kernel path, 4 on the userspace path" in moq
    received = re.findall(r"^subscriber (\d) \(userspace\): (\d+) objects, \d+ lost, \d+ gaps, ended \S+, "
                          r"video decodes: yes \((\d+) frames", moq, re.M)
    assert [r[0] for r in received] == ["0", "1", "2", "3"]
    assert all(int(objects) > 0 and int(frames) > 0 for _, objects, frames in received)
    assert all((tmp_path / "demo-output" / f"moq_sub{i}.h264").stat().st_size > 0 for i in range(4))
    rows = [line.split() for line in moq_paths.splitlines()[3:] if line.strip()]
    assert [r[:2] for r in rows] == [["userspace", "8"]] and float(rows[0][2]) > 0  # packets/s delivered
    assert delivery.splitlines()[2:] == ["userspace: 4 subscribers received [5000, 5000, 5000, 5000] of 5000, "
                                         "byte-exact: yes"]
    assert "(userspace data path only, at saturation)" in compare
    copies = [line.split() for line in compare.splitlines() if re.match(r"\s+\d+\s+\d+", line)]
    assert [c[0] for c in copies] == ["4", "16"] and all(float(c[1]) > 0 for c in copies)


def test_a_failing_section_is_one_line_and_the_demo_goes_on(capsys):
    def broken() -> bool:
        raise RuntimeError("relay did not start:\nsome log line\nfastrelay: error: port in use")

    assert section("9. broken", broken) is False
    assert section("10. fine", lambda: True) is True
    assert capsys.readouterr().out == ("\n== 9. broken\nsection failed: relay did not start: ... fastrelay: error: "
                                       "port in use\n\n== 10. fine\n")
