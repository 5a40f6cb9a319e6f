"""Every BPF program verifies far below the verifier's limit, under every build variant.

The verifier's cost of a program moves with the kernel build and with clang's code
generation; a program near the 1M limit on one machine is rejected on the next. Each
program is held to verifier.BOUND (20 % of the limit) compiled by the clang scripts/setup
installs and by its fallback, at -mcpu v2 and v3, and v4 where compiler and kernel take it.
"""

import os

import pytest

from fastrelay.kernel import build, verifier
from fastrelay.kernel.features import kernel_version

ALL_PROGRAMS = {
    "lab_dropper": {"fr_lab_drop"},
    "lab_probe": {"fr_probe_tx", "fr_probe_rx"},
    "moq_fastpath": {"fr_moq_ingress", "fr_moq_egress", "fr_moq_take", "fr_moq_recover"},
    "udp_fanout": {"fr_udp_fanout"},
}


# clang 14, the fallback, has no -mcpu=v4
VARIANTS = [build.Variant(build.PRIMARY_CLANG, cpu) for cpu in ("v2", "v3", "v4")] + \
    [build.Variant(build.FALLBACK_CLANG, cpu) for cpu in ("v2", "v3")]


def _available(variant: build.Variant) -> None:
    """Skip a variant this kernel or compiler cannot have; a compiler scripts/setup should have
    installed fails the test under CI."""
    if variant in build.variants():
        return
    found = build.clang_version(variant.clang)
    if found is None:
        reason = f"{variant.clang} not installed (scripts/setup installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    pytest.skip(f"{variant}: -mcpu=v4 needs clang >= 18 and Linux >= 6.6")


def test_the_variants_cover_both_compilers_and_every_isa_level_the_kernel_takes():
    found = {(v.clang, v.cpu) for v in build.variants(kernel=(6, 18))}
    if build.clang_version(build.PRIMARY_CLANG):
        assert {(build.PRIMARY_CLANG, cpu) for cpu in ("v2", "v3", "v4")} <= found
    assert not any(cpu == "v4" for _, cpu in {(v.clang, v.cpu) for v in build.variants(kernel=(6, 5))})
    if build.clang_version(build.FALLBACK_CLANG):
        assert (build.FALLBACK_CLANG, "v4") not in found  # clang 14 has no v4
        assert {(build.FALLBACK_CLANG, "v2"), (build.FALLBACK_CLANG, "v3")} <= found


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_program_verifies_within_the_bound(root, variant):
    _available(variant)
    costs = verifier.measure_all(variant)
    seen: dict[str, set[str]] = {}
    for c in costs:
        seen.setdefault(c.source, set()).add(c.program)
    assert seen == ALL_PROGRAMS, "a program was added or renamed: list it here"
    over = [f"{c.program} ({c.source}): {c.insns} processed insns under {c.variant} "
            f"{'rejected: ' + c.error if not c.ok else 'over the bound'} (bound {verifier.BOUND})\n{c.log_tail}"
            for c in costs if not c.ok or c.insns is None or c.insns > verifier.BOUND]
    assert not over, "\n".join(over)


def test_a_rejected_program_reports_its_count_and_the_verifiers_last_lines(root, tmp_path):
    src = tmp_path / "too_big.bpf.c"
    # a loop the verifier walks iteration by iteration: past its 1M processed instructions
    src.write_text('''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("tc")
int fr_too_big(struct __sk_buff *skb)
{
	volatile __u64 x = 0;
	for (__u32 i = 0; i < 400000; i++)
		x += i;
	return 0;
}
''')
    (cost,) = verifier.measure(str(src))
    assert not cost.ok and cost.program == "fr_too_big"
    assert cost.insns is not None and cost.insns > 1_000_000 // 2
    assert "processed" in cost.log_tail or "too large" in cost.log_tail


def test_the_default_variant_is_the_one_the_relays_load(root):
    assert kernel_version() >= (5, 1)  # -mcpu=v3 needs it
    costs = verifier.measure("lab_dropper")
    assert [c.program for c in costs] == ["fr_lab_drop"] and costs[0].ok and 0 < costs[0].insns < verifier.BOUND
    assert costs[0].variant.endswith(f"-mcpu={build.DEFAULT_CPU}")


def test_build_verifier_lists_every_program_under_every_variant(root):
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fastrelay", "build", "--verifier", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {(r["program"], r["variant"]) for r in rows} == {
        (p, str(v)) for v in build.variants() for progs in ALL_PROGRAMS.values() for p in progs}
    assert all(r["ok"] and r["insns"] <= verifier.BOUND for r in rows)
