"""`fastrelay doctor` run for real: every item named, missing ones with what they disable and the fix."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from fastrelay import netns
from fastrelay.doctor import scratch_netns

pytestmark = pytest.mark.usefixtures("root")

ITEMS = ["kernel", "privileges", "BTF", "clang", "libbpf", "bpf_loop", "ring buffer", "bpf_crypto kfuncs",
         "tcx attach", "netem"]
OPTIONAL = {"netem"}  # doctor's exit status ignores it


def doctor(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> tuple[int, str, int]:
    """Run `fastrelay doctor`; (exit status, stdout, pid). Asserts its scratch namespace is gone."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "fastrelay", "doctor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert not netns.exists(f"fr-doctor-{proc.pid}")
    return proc.returncode, out, proc.pid


def by_name(out: str) -> dict[str, dict]:
    checks = json.loads(out)
    assert [c["name"] for c in checks] == ITEMS
    return {c["name"]: c for c in checks}


def test_every_item_is_named_with_what_it_disables_and_its_fix():
    rc, out, _ = doctor("--json")
    checks = by_name(out)
    assert checks["kernel"]["detail"] == platform.release()
    assert checks["privileges"] == {**checks["privileges"], "ok": True, "detail": "root"}
    clang = subprocess.run([checks["clang"]["detail"].split(":")[0], "--version"], capture_output=True, text=True)
    assert checks["clang"]["ok"] and clang.stdout.splitlines()[0] in checks["clang"]["detail"]
    assert re.fullmatch(r"1\.\d+", checks["libbpf"]["detail"])
    for c in checks.values():
        assert c["disables"] and c["fix"], c  # said for every item, shown when it is missing
    # as root with clang, tcx and netem are tried for real in the scratch namespace
    if checks["tcx attach"]["ok"]:
        assert checks["tcx attach"]["detail"] == "bpf_link on TC ingress works"
    assert (checks["netem"]["detail"] == "available") == checks["netem"]["ok"]
    assert not checks["netem"]["detail"].startswith("not checked")
    assert rc == (0 if all(c["ok"] for n, c in checks.items() if n not in OPTIONAL) else 1)


def test_text_output_names_each_item_and_explains_missing_ones():
    _, out, _ = doctor()
    lines = out.splitlines()
    items = [line for line in lines if not line.startswith(" ")]
    assert [line.split(maxsplit=1)[1][:18].rstrip() for line in items] == ITEMS
    for i, line in enumerate(lines):
        if line.startswith("MISSING"):
            assert lines[i + 1].strip().startswith("disables: ") and len(lines[i + 1].strip()) > len("disables: ")
            assert lines[i + 2].strip().startswith("fix: ") and len(lines[i + 2].strip()) > len("fix: ")
        elif line.startswith("ok"):
            assert i + 1 == len(lines) or not lines[i + 1].startswith(" ")


def test_missing_clang_is_reported_with_the_setup_fix(tmp_path):
    for tool in ("ip", "tc"):  # everything doctor runs but clang
        os.symlink(subprocess.run(["which", tool], capture_output=True, text=True, check=True).stdout.strip(),
                   tmp_path / tool)
    rc, out, _ = doctor("--json", env={"PATH": str(tmp_path)})
    checks = by_name(out)
    assert rc == 1
    assert not checks["clang"]["ok"] and "clang not found" in checks["clang"]["detail"]
    assert "make demo" in checks["clang"]["fix"] and "BPF program" in checks["clang"]["disables"]
    # the kernel's tcx support is still reported, from BTF, without building a program
    assert "attach not tried without clang" in checks["tcx attach"]["detail"]
    assert checks["privileges"]["ok"] and checks["libbpf"]["ok"]


def test_without_capabilities_the_privileges_item_is_missing():
    rc, out, _ = doctor("--json", prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    checks = by_name(out)
    assert rc == 1
    priv = checks["privileges"]
    assert not priv["ok"] and "lacks CAP_BPF, CAP_NET_ADMIN" in priv["detail"] and "root" in priv["fix"]
    assert checks["netem"] == {**checks["netem"], "ok": False, "detail": "not checked without root",
                               "fix": "run `fastrelay doctor` as root"}
    assert "attach not tried without root" in checks["tcx attach"]["detail"]


def test_the_scratch_namespace_goes_even_when_a_check_fails():
    with pytest.raises(RuntimeError), scratch_netns() as name:
        assert netns.exists(name)
        raise RuntimeError("a check blew up")
    assert not netns.exists(name)
