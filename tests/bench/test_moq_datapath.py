"""`fastrelay bench moq-datapath`: the MoQT relay's data paths side by side in the lab (real relay,
publisher and subscriber processes, BPF delay probes)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("root")

KEYS = {"datapath", "fanout", "objects_per_s", "packets_per_s", "delay_p50_us", "delay_p99_us", "cpu_us_per_packet",
        "lost"}


def test_a_short_run_reports_every_data_path_with_the_issue_keys(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq-datapath", "--fanouts", "2", "--seconds",
                          "1", "--datapaths", "kernel,userspace,kernel-pass-acks", "--json", "--plots", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    cases = {c["datapath"]: c for c in out["cases"]}
    assert set(cases) == {"kernel", "userspace", "kernel-pass-acks"}
    for c in cases.values():
        assert set(c) >= KEYS and c["fanout"] == 2 and c["lost"] == 0, c
        assert c["packets_per_s"] > 0 and 0 < c["delay_p50_us"] <= c["delay_p99_us"] and c["cpu_us_per_packet"] > 0
    # the kernel paths carried the media, the userspace path did not
    assert cases["kernel"]["kernel_packet_share"] > 0.5 and cases["kernel-pass-acks"]["kernel_packet_share"] > 0.5
    assert cases["userspace"]["kernel_packet_share"] == 0
    assert out["capacity"]["moq_kernel"] > 0 and out["capacity"]["udp_fanout_kernel"] > 0
    assert {p.name for p in tmp_path.iterdir()} == {"moq_datapath_delay_cdf.png", "moq_datapath_cpu.png"}


def test_an_unknown_data_path_is_refused_with_one_line():
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq-datapath", "--datapaths", "kernel,xdp"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "fastrelay: error: unknown data path xdp (choose from kernel, userspace, kernel-pass-acks)"]
