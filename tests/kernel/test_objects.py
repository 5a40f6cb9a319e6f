"""Loading objects: verifier errors, BTF layout checks, typed map access."""

import ctypes

import pytest

from fastrelay.kernel import abi
from fastrelay.kernel.build import BPF_DIR, build
from fastrelay.kernel.errors import LayoutError, LoadError
from fastrelay.kernel.objects import LAYOUTS, BpfObject, Constants, MapLayout, RecordsLayout, RingLayout

pytestmark = pytest.mark.usefixtures("root")

BAD_PROGRAM = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc")
int fr_test_oob(struct __sk_buff *skb)
{
	unsigned char *data = (void *)(long)skb->data;
	return data[100];	/* no bounds check against data_end */
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_verifier_rejection_carries_the_log_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRELAY_CACHE", str(tmp_path))
    src = tmp_path / "oob.bpf.c"
    src.write_text(BAD_PROGRAM)
    with pytest.raises(LoadError) as exc:
        BpfObject(build(src))
    assert "fr_test_oob" in str(exc.value)
    assert "invalid access to packet" in exc.value.log
    assert "verifier log" in str(exc.value)


def test_open_error_for_a_non_object(tmp_path):
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(OSError):
        BpfObject(junk)


def test_maps_round_trip_with_checked_layouts():
    with BpfObject.load("udp_fanout") as obj:
        cfg = obj.map("fr_fanout_cfg", ctypes.c_uint32, abi.FanoutConfig)
        cfg.update(0, abi.FanoutConfig(port=1234, family=2, max_len=1500))
        got = cfg.lookup(0)
        assert (got.port, got.family, got.max_len) == (1234, 2, 1500)
        sets = obj.map("fr_fanout_sets", ctypes.c_uint32, abi.FanoutSet)
        s = abi.FanoutSet(count=1)
        s.subs[0].id = 77
        sets.update(1, s)
        assert sets.lookup(1).subs[0].id == 77
        stats = obj.map("fr_fanout_stats", ctypes.c_uint32, ctypes.c_uint64)
        assert stats.percpu and stats.sum_counters() == [0] * stats.max_entries
        assert obj.enum("fr_fanout_counter")["FR_FC_MAX"] == stats.max_entries


def test_hash_map_iterate_and_delete():
    with BpfObject.load("lab_probe") as obj:
        slots = obj.map("fr_probe_slots", abi.ProbeMac, ctypes.c_uint32)
        for i in range(3):
            key = abi.ProbeMac()
            key.addr[:] = bytes([2, 0, 0, 0, 0, i])
            slots.update(key, ctypes.c_uint32(i))
        keys = list(slots.keys())
        assert sorted(k.addr[5] for k in keys) == [0, 1, 2]
        assert slots.delete(keys[0]) and not slots.delete(keys[0])
        assert slots.lookup(keys[0]) is None
        assert len(list(slots.keys())) == 2


class SwappedSub(ctypes.Structure):
    _fields_ = [(n, t) for n, t in abi.FanoutSub._fields_]
    _fields_[0], _fields_[1] = ("ifindex", ctypes.c_uint32), ("id", ctypes.c_uint32)


class ShortConfig(ctypes.Structure):
    _fields_ = [f for f in abi.FanoutConfig._fields_ if f[0] != "max_len"]


class WidePortConfig(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint32) if f[0] == "port" else f for f in abi.FanoutConfig._fields_]


class SwappedSet(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("subs", SwappedSub * abi.FR_MAX_SUBSCRIBERS)]


@pytest.mark.parametrize("mirror,name,message", [
    (ShortConfig, "fr_fanout_cfg", "size"),
    (WidePortConfig, "fr_fanout_cfg", "size"),
    (SwappedSet, "fr_fanout_sets", "subs[].ifindex: offset 4 in BTF, 0 in Python"),
])
def test_layout_mismatch_names_the_field(mirror, name, message):
    with BpfObject.load("udp_fanout") as obj, pytest.raises(LayoutError, match=message.replace("[", r"\[")):
        obj.map(name, ctypes.c_uint32, mirror)


def test_layout_mismatch_missing_member_is_named():
    class Renamed(ctypes.Structure):
        _fields_ = [("sub", ctypes.c_uint32), ("bytes", ctypes.c_uint32)]

    with BpfObject.load("udp_fanout") as obj, pytest.raises(LayoutError, match="sub_id"):
        obj.struct("fr_fanout_event", Renamed)


def test_every_map_of_a_declared_program_has_a_mirror_that_matches():
    programs = sorted(p.name.removesuffix(".bpf.c") for p in BPF_DIR.glob("*.bpf.c"))
    assert {"udp_fanout", "lab_probe", "lab_dropper", "moq_fastpath"} <= LAYOUTS.keys() <= set(programs)
    for program in LAYOUTS:
        with BpfObject.load(program) as obj:  # loading checks every declared layout
            maps = [name for name, layout in LAYOUTS[program].items() if not isinstance(layout, Constants)]
            assert sorted(obj.map_names()) == sorted(maps), program
            for name, layout in LAYOUTS[program].items():
                if isinstance(layout, MapLayout):
                    assert obj.map(name).value_type is layout.value


def test_a_declared_mismatch_fails_at_load_naming_the_field(monkeypatch):
    monkeypatch.setitem(LAYOUTS, "udp_fanout", {**LAYOUTS["udp_fanout"],
                                                "fr_fanout_sets": MapLayout(ctypes.c_uint32, SwappedSet)})
    with pytest.raises(LayoutError, match=r"fr_fanout_sets\.value\.subs\[\]\.ifindex: offset 4 in BTF, 0 in Python"):
        BpfObject.load("udp_fanout")


def test_a_ring_record_mismatch_fails_at_load():
    class Renamed(ctypes.Structure):
        _fields_ = [("sub", ctypes.c_uint32), ("bytes", ctypes.c_uint32)]

    with pytest.raises(LayoutError, match="sub_id"):
        BpfObject(build("udp_fanout"), {"fr_fanout_events": RingLayout(Renamed, "fr_fanout_event")})


def test_a_size_python_copies_that_drifted_from_the_header_fails_at_load(monkeypatch):
    limits = LAYOUTS["moq_fastpath"][abi.FR_MOQ_LIMITS]
    monkeypatch.setitem(LAYOUTS, "moq_fastpath", {**LAYOUTS["moq_fastpath"], abi.FR_MOQ_LIMITS: Constants(
        {**limits.values, "FR_MOQ_MAX_FRAMES": 8})})
    with pytest.raises(LayoutError, match=r"fr_moq_limits\.FR_MOQ_MAX_FRAMES is 16 in the object, 8 in Python"):
        BpfObject.load("moq_fastpath")


def test_a_record_type_of_a_multi_record_ring_is_checked_at_load(monkeypatch):
    class Short(ctypes.Structure):
        _fields_ = [("kind", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("local_pn", ctypes.c_uint16)]

    ring = LAYOUTS["moq_fastpath"]["fr_moq_events"]
    broken = RecordsLayout(ring.kinds, {**ring.records, "FR_MOQ_REC_RENUMBERED": (Short, "fr_moq_renumbered")})
    monkeypatch.setitem(LAYOUTS, "moq_fastpath", {**LAYOUTS["moq_fastpath"], "fr_moq_events": broken})
    with pytest.raises(LayoutError, match="fr_moq_renumbered"):
        BpfObject.load("moq_fastpath")


def test_an_undeclared_map_needs_its_mirrors():
    with BpfObject(build("lab_dropper")) as obj:  # no layouts declared
        with pytest.raises(LayoutError, match="no MapLayout declared for fr_drop_cfg"):
            obj.map("fr_drop_cfg")
        assert obj.map("fr_drop_cfg", ctypes.c_uint32, abi.DropConfig).value_type is abi.DropConfig


def test_a_loaded_object_keeps_what_each_program_cost_the_verifier(root):
    with BpfObject.load("moq_fastpath") as obj:
        assert set(obj.verified_insns) == {"fr_moq_ingress", "fr_moq_egress", "fr_moq_take", "fr_moq_recover"}
        assert all(0 < n < 200_000 for n in obj.verified_insns.values())
