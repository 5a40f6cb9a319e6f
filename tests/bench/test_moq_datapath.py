"""`fastrelay bench moq-datapath`: the MoQT relay's data paths side by side in the lab (real relay,
publisher and subscriber processes, BPF delay probes), and the peers' relays at the same load."""

import json
import subprocess
import sys

import pytest

from fastrelay.bench.moq_datapath import Case, notes

pytestmark = pytest.mark.usefixtures("root")

KEYS = {"datapath", "fanout", "objects_per_s", "packets_per_s", "delay_p50_us", "delay_p99_us", "cpu_us_per_packet",
        "lost", "records_per_packet", "wakeups_per_s", "bpf_ns_per_packet", "cpu_us_per_upstream_packet"}


def _bench(*args: str, timeout: float) -> dict:
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq-datapath", *args, "--json"],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_short_run_reports_every_data_path_with_the_issue_keys(tmp_path):
    out = _bench("--fanouts", "2", "--seconds", "1", "--datapaths", "kernel,userspace,kernel-pass-acks", "--plots",
                 str(tmp_path), timeout=300)
    cases = {c["datapath"]: c for c in out["cases"]}
    assert set(cases) == {"kernel", "userspace", "kernel-pass-acks"} and out["failed"] == []
    for c in cases.values():
        assert set(c) >= KEYS and c["fanout"] == 2 and c["lost"] == 0, c
        assert c["packets_per_s"] > 0 and 0 < c["delay_p50_us"] <= c["delay_p99_us"] and c["cpu_us_per_packet"] > 0
        # the relay's event loop woke up, its publisher-facing interface received the upstream packets
        assert c["wakeups_per_s"] > 0 and c["upstream_packets_per_s"] > 0 and c["cpu_us_per_upstream_packet"] > 0, c
    # the kernel paths carried the media, read ring records and ran their programs; the userspace path did not
    for kernel in ("kernel", "kernel-pass-acks"):
        assert cases[kernel]["kernel_packet_share"] > 0.5, cases[kernel]
        assert cases[kernel]["records_per_packet"] > 0 and cases[kernel]["bpf_ns_per_packet"] > 0, cases[kernel]
    u = cases["userspace"]
    assert u["kernel_packet_share"] == 0 and u["records_per_packet"] is None and u["bpf_ns_per_packet"] is None
    assert out["capacity"]["moq_kernel"] > 0 and out["capacity"]["udp_fanout_kernel"] > 0
    assert {p.name for p in tmp_path.iterdir()} == {"moq_datapath_delay_cdf.png", "moq_datapath_cpu.png"}


def test_a_peer_relay_runs_in_the_lab_at_the_same_load():
    out = _bench("--quick", "--fanouts", "1", "--seconds", "1", "--datapaths", "aiomoqt", timeout=120)
    assert out["failed"] == [] and len(out["cases"]) == 1
    c = out["cases"][0]
    assert set(c) >= KEYS and c["datapath"] == "aiomoqt" and c["fanout"] == 1, c
    assert c["objects_per_s"] > 0 and c["packets_per_s"] > 0 and c["upstream_packets_per_s"] > 0, c
    assert c["cpu_us_per_packet"] > 0 and c["cpu_us_per_upstream_packet"] > 0 and c["wakeups_per_s"] > 0, c
    # standard crypto: the probes cannot see the tag, and there is no kernel path
    assert c["delay_p50_us"] is None and c["delay_p99_us"] is None, c
    assert c["records_per_packet"] is None and c["bpf_ns_per_packet"] is None and c["kernel_packet_share"] == 0


def _case(datapath: str, cpu: float, **kw) -> Case:
    base = dict(objects_per_s=200, packets_per_s=200, delay_p50_us=50, delay_p99_us=100, cpu_us_per_packet=cpu,
                lost=0, rate=200, kernel_packet_share=0.0, records_per_packet=None, wakeups_per_s=100,
                nonvoluntary_switches_per_s=10, bpf_ns_per_packet=None, cpu_us_per_upstream_packet=2 * cpu,
                upstream_packets_per_s=200)
    return Case(datapath, 1, **{**base, **kw})


def test_the_notes_print_each_measured_ratio_next_to_its_target():
    cases = [_case("kernel", 100, delay_p50_us=5, records_per_packet=0.5, bpf_ns_per_packet=1500),
             _case("userspace", 400, delay_p50_us=500, delay_p99_us=1000),
             _case("aiomoqt", 500, delay_p50_us=None, delay_p99_us=None),
             _case("moq-dev", 300, objects_per_s=7, delay_p50_us=None, delay_p99_us=None, lost=700)]
    line = notes(cases, [])[0]
    for part in ("delay p50 kernel/userspace 0.01 (target <= 0.1)", "delay p99 kernel/userspace 0.10 (target <= 0.1)",
                 "relay CPU per packet kernel/userspace 0.25 (target <= 0.125)",
                 "relay CPU per upstream packet kernel/userspace 0.25 (target <= 0.5)",
                 "ring records per delivered packet (kernel) 0.50 (target <= 0.05",
                 "BPF run time per copy (kernel) 1.50 us (target <= 2)",
                 "relay CPU per packet aiomoqt/kernel 5.00 (target >= 3)",
                 "relay CPU per packet moq-dev/kernel 3.00 (target > 1)"):
        assert part in line, line
    text = "\n".join(notes(cases, [{"datapath": "aiomoqt", "fanout": 8, "error": "boom"}]))
    assert "moq-dev fan-out 1: delivered 7 of 200 objects/s offered, lost 700: moq-dev's relay takes one stream" in text
    assert "aiomoqt fan-out 8: failed (boom)" in text and "delay n/a" in text


def test_an_unknown_data_path_is_refused_with_one_line():
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq-datapath", "--datapaths", "kernel,xdp"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "fastrelay: error: unknown data path xdp (choose from kernel, userspace, kernel-aioquic-recovery,"
        " kernel-pass-acks, aiomoqt, moq-dev)"]
