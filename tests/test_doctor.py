"""`fastrelay doctor` run for real: every item named, missing ones with what they disable and the fix,
every BPF program built and loaded with what the verifier said about it."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from fastrelay import netns
from fastrelay.doctor import (
    CLANG_FIX,
    DISABLE_ENV,
    FEATURES,
    REJECTED_FIX,
    TAIL_SHOWN,
    TAIL_WIDTH,
    kernel_path_status,
    scratch_netns,
)
from fastrelay.kernel import build, verifier
from fastrelay.quic.link import SOCKET_BUFFER, sysctl

pytestmark = pytest.mark.usefixtures("root")

ITEMS = ["kernel", "privileges", "BTF", "clang", "libbpf", "UDP buffers", "bpf_loop", "ring buffer",
         "bpf_crypto kfuncs", "tcx attach", "netem"]
OPTIONAL = {"netem"}  # doctor's exit status ignores it
BPF_FIELDS = {"source", "insns", "share", "variant", "log_tail"}
LIMIT_SHARE = r"\((\d+\.\d)% of the 1M limit\)"

# fr_fine loads; fr_heavy loads over the safety bound (the verifier walks each of its loop's
# iterations); the verifier rejects fr_broken (an unbounded index into a map value)
BROKEN = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fr_broken_map SEC(".maps");

SEC("tc")
int fr_fine(struct __sk_buff *skb)
{
	return 0;
}

SEC("tc")
int fr_heavy(struct __sk_buff *skb)
{
	__u32 x = skb->len;

	for (int i = 0; i < 40000; i++)
		x = x * 31 + i;
	return x & 1;
}

SEC("tc")
int fr_broken(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *v = bpf_map_lookup_elem(&fr_broken_map, &key);

	return v ? (int)v[skb->len] : 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


def doctor(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> tuple[int, str, int]:
    """Run `fastrelay doctor`; (exit status, stdout, pid). Asserts its scratch namespace is gone."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "fastrelay", "doctor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    out, err = proc.communicate(timeout=180)  # a rejection at the verifier's limit takes seconds per program
    assert "Traceback" not in err, err
    assert not netns.exists(f"fr-doctor-{proc.pid}")
    return proc.returncode, out, proc.pid


def by_name(out: str) -> dict[str, dict]:
    """The JSON checks by name: the fixed items first, then one per BPF program."""
    checks = json.loads(out)
    names = [c["name"] for c in checks]
    assert names[:len(ITEMS)] == ITEMS
    assert names[len(ITEMS):] and all(n.startswith("bpf ") for n in names[len(ITEMS):]), names
    assert len(set(names)) == len(names)
    return {c["name"]: c for c in checks}


def bpf_checks(checks: dict[str, dict]) -> list[dict]:
    return [c for name, c in checks.items() if name.startswith("bpf ")]


@pytest.fixture(scope="module")
def json_run(root: None) -> tuple[int, dict[str, dict]]:
    """`fastrelay doctor --json` over every program in bpf/, run once for the module."""
    rc, out, _ = doctor("--json")
    return rc, by_name(out)


@pytest.fixture(scope="module")
def text_run(root: None) -> tuple[int, str]:
    rc, out, _ = doctor()
    return rc, out


def test_every_item_is_named_with_what_it_disables_and_its_fix(json_run):
    rc, checks = json_run
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


def test_text_output_names_each_item_and_explains_missing_ones(text_run):
    _, out = text_run
    lines = out.splitlines()
    items = [line for line in lines if not line.startswith(" ")]
    names = [line.split(maxsplit=1)[1][:18].rstrip() for line in items]
    assert names[:len(ITEMS)] == ITEMS and all(n.startswith("bpf ") for n in names[len(ITEMS):])
    for i, line in enumerate(lines):
        if line.startswith("MISSING"):
            assert lines[i + 1].strip().startswith("disables: ") and len(lines[i + 1].strip()) > len("disables: ")
            assert lines[i + 2].strip().startswith("fix: ") and len(lines[i + 2].strip()) > len("fix: ")
        elif line.startswith("ok"):
            assert i + 1 == len(lines) or not lines[i + 1].startswith(" ")


def test_every_bpf_program_is_reported_loaded_or_with_what_went_wrong(json_run):
    """One check per program of every source in bpf/, each as the verifier saw it: the program
    names and numbers are verifier.measure_all()'s; whether a program passes is not assumed."""
    _, checks = json_run
    programs = bpf_checks(checks)
    assert {c["source"] for c in programs} == set(build.sources())
    variant = str(build.Variant(build.find_clang()[0]))
    for c in programs:
        assert c.keys() >= BPF_FIELDS, c
        assert c["disables"] in (FEATURES[c["source"]], f"nothing here yet; where rejected, {FEATURES[c['source']]}")
        if c["insns"] is not None:
            assert c["share"] == c["insns"] / verifier.LIMIT
            assert f"{c['insns']:,} insns ({c['share']:.1%} of the 1M limit)" in c["detail"].replace(" verified", "")
        if c["ok"]:  # loaded, within the safety bound
            assert c["insns"] <= verifier.BOUND and c["variant"] == variant and not c["log_tail"]
            assert c["detail"] == f"{c['insns']:,} insns verified ({c['share']:.1%} of the 1M limit)"
        elif c["detail"].startswith("accepted at"):  # loaded, but other kernel builds may not take it
            assert c["insns"] > verifier.BOUND and "over the 20% safety bound" in c["detail"]
        elif c["detail"].startswith("rejected (error "):
            assert c["log_tail"].strip() and c["fix"] == REJECTED_FIX and c["variant"] == variant
            assert c["detail"].split(" at ")[0].endswith("by the verifier")
        else:  # another engineer's half-made edit of bpf/ may not compile: clang's words, not a crash
            assert c["name"] == f"bpf {c['source']}" and c["detail"].startswith("not built (")
            assert c["log_tail"].strip() and c["fix"] == CLANG_FIX
    measured = {(m.source, m.program): m.insns for m in verifier.measure_all()}
    assert {(c["source"], _program(c)): c["insns"] for c in programs} == measured


def _program(check: dict) -> str:
    """The program a bpf check is about; "*" (as verifier.measure_all() says) for a source that did not build."""
    return "*" if check["detail"].startswith("not built") else check["name"].removeprefix("bpf ")


def test_text_and_json_report_the_programs_alike(json_run, text_run):
    _, checks = json_run
    lines = text_run[1].splitlines()
    for c in bpf_checks(checks):
        head = f"{'ok ' if c['ok'] else 'MISSING'} {c['name']:18} {c['detail']}"
        assert head in lines, head
        if not c["ok"] and c["log_tail"]:
            at = lines.index(head) + 3  # after disables and fix: the log's last lines
            shown = [line.strip().removeprefix("| ") for line in lines[at:at + TAIL_SHOWN]]
            assert shown == [line[:TAIL_WIDTH] + ("..." if len(line) > TAIL_WIDTH else "")
                             for line in c["log_tail"].splitlines()[-TAIL_SHOWN:]]


def test_a_rejected_program_is_missing_with_the_verifiers_last_lines(tmp_path, monkeypatch):
    """A temporary source: each of its programs is reported on its own, the rejected one with the
    verifier's last lines, the one over the bound as a warning (it loads: the path still runs)."""
    src = tmp_path / "fr_bad.bpf.c"
    src.write_text(BROKEN)
    env = {"FASTRELAY_CACHE": str(tmp_path / "cache")}  # the test's objects stay out of the real cache
    rc, out, _ = doctor("--json", "--source", str(src), env=env)
    checks = by_name(out)
    assert rc == 1
    assert [c["name"] for c in bpf_checks(checks)] == ["bpf fr_fine", "bpf fr_heavy", "bpf fr_broken"]
    assert checks["bpf fr_fine"]["ok"] and checks["bpf fr_fine"]["insns"] > 0
    heavy = checks["bpf fr_heavy"]
    assert not heavy["ok"] and verifier.BOUND < heavy["insns"] < verifier.LIMIT and not heavy["log_tail"]
    assert heavy["detail"] == (f"accepted at {heavy['insns']:,} insns ({heavy['share']:.1%} of the 1M limit), over the"
                               " 20% safety bound: may be rejected on other kernel builds")
    broken = checks["bpf fr_broken"]
    assert not broken["ok"] and broken["source"] == "fr_bad" and broken["fix"] == REJECTED_FIX
    assert re.fullmatch(rf"rejected \(error \d+\) by the verifier at [\d,]+ insns {LIMIT_SHARE}", broken["detail"])
    assert "R0 unbounded memory access" in broken["log_tail"]
    assert broken["disables"] == "what fr_bad.bpf.c runs"
    _, text, _ = doctor("--source", str(src), env=env)
    lines = text.splitlines()
    at = lines.index(f"MISSING bpf fr_broken      {broken['detail']}")
    assert lines[at + 1:at + 3] == [f"{'':27}disables: what fr_bad.bpf.c runs", f"{'':27}fix: {REJECTED_FIX}"]
    tail = lines[at + 3:]
    assert 0 < len(tail) <= TAIL_SHOWN and all(line.startswith(f"{'':27}| ") for line in tail)
    assert any("R0 unbounded memory access" in line for line in tail)
    monkeypatch.setenv("FASTRELAY_CACHE", env["FASTRELAY_CACHE"])
    assert kernel_path_status(src) == (False, f"fr_broken {broken['detail']}: what fr_bad.bpf.c runs is disabled")


def test_a_program_that_does_not_build_is_missing_with_clangs_words(tmp_path):
    src = tmp_path / "fr_typo.bpf.c"
    src.write_text(BROKEN.replace("return 0;", "return O;"))
    rc, out, _ = doctor("--json", "--source", str(src), env={"FASTRELAY_CACHE": str(tmp_path / "cache")})
    typo = by_name(out)["bpf fr_typo"]
    assert rc == 1
    assert typo == {**typo, "ok": False, "detail": "not built (clang failed on fr_typo.bpf.c)", "fix": CLANG_FIX,
                    "insns": None, "share": None}
    assert "use of undeclared identifier 'O'" in typo["log_tail"]


def test_kernel_path_status_says_what_doctor_says(json_run):
    _, checks = json_run
    ok, why = kernel_path_status("moq_fastpath")
    rejected = [c for c in bpf_checks(checks) if c["source"] == "moq_fastpath"
                and not c["ok"] and not c["detail"].startswith("accepted at")]  # over the bound still loads
    assert ok == (not rejected)
    if ok:
        assert why == ""
    else:
        first = rejected[0]
        what = "moq_fastpath.bpf.c" if _program(first) == "*" else _program(first)
        assert why == f"{what} {first['detail']}: {FEATURES['moq_fastpath']} is disabled"


def test_kernel_path_status_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert kernel_path_status("udp_fanout") == (False, f"disabled by {DISABLE_ENV}=1")


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
    programs = bpf_checks(checks)
    assert [c["name"] for c in programs] == [f"bpf {s}" for s in build.sources()]
    assert all(c == {**c, "ok": False, "detail": "not checked without clang", "fix": CLANG_FIX} for c in programs)


def test_without_capabilities_the_privileges_item_is_missing():
    rc, out, _ = doctor("--json", prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    checks = by_name(out)
    assert rc == 1
    priv = checks["privileges"]
    assert not priv["ok"] and "lacks CAP_BPF, CAP_NET_ADMIN" in priv["detail"] and "root" in priv["fix"]
    assert checks["netem"] == {**checks["netem"], "ok": False, "detail": "not checked without root",
                               "fix": "run `fastrelay doctor` as root"}
    assert "attach not tried without root" in checks["tcx attach"]["detail"]
    assert all(c == {**c, "ok": False, "detail": "not checked without root", "fix": "run `fastrelay doctor` as root"}
               for c in bpf_checks(checks))


def test_the_scratch_namespace_goes_even_when_a_check_fails():
    with pytest.raises(RuntimeError), scratch_netns() as name:
        assert netns.exists(name)
        raise RuntimeError("a check blew up")
    assert not netns.exists(name)


def test_udp_buffers_says_what_a_socket_gets_and_the_sysctl_ceilings(json_run):
    """As root a socket gets SOCKET_BUFFER past net.core.{r,w}mem_max; without CAP_NET_ADMIN at most
    those, and the item is missing (with the sysctl fix) when they are below SOCKET_BUFFER."""
    _, checks = json_run
    rmem, wmem = sysctl("net.core.rmem_max"), sysctl("net.core.wmem_max")
    mib = SOCKET_BUFFER >> 20
    assert checks["UDP buffers"] == {**checks["UDP buffers"], "ok": True, "detail": (
        f"sockets get {mib} MiB receive, {mib} MiB send (forced past the ceilings: CAP_NET_ADMIN); "
        f"net.core rmem_max {rmem / (1 << 20):g} MiB, wmem_max {wmem / (1 << 20):g} MiB")}
    res = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c",
                          "import json; from fastrelay.doctor import _udp_buffers_check as c; "
                          "print(json.dumps(c().as_dict()))"], capture_output=True, text=True, check=True)
    capped = json.loads(res.stdout)
    receive = min(rmem, SOCKET_BUFFER)
    assert capped["ok"] == (receive == min(wmem, SOCKET_BUFFER) == SOCKET_BUFFER)
    assert capped["detail"].startswith(f"sockets get {receive / (1 << 20):g} MiB receive")
    assert "(within the ceilings)" in capped["detail"] and "sysctl -w net.core.rmem_max=" in capped["fix"]
