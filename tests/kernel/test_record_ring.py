"""RecordRing: records of several types and lengths from one ring, written by a real program.

A small syscall program (run through BPF_PROG_TEST_RUN) writes records the way the MoQT fast
path does: each type its own struct, the one ending in an array only as far as its count.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from fastrelay.kernel.build import build
from fastrelay.kernel.libbpf import BpfTestRunOpts, check, lib
from fastrelay.kernel.objects import BpfObject, RecordsLayout

pytestmark = pytest.mark.usefixtures("root")

SOURCE = r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";

enum t_kind { T_SMALL = 1, T_LIST = 2, T_ALIEN = 9 };
struct t_small { __u8 kind; __u8 pad[3]; __u32 value; };
struct t_list { __u8 kind; __u8 count; __u16 pad; __u32 value; __u64 items[8]; };
struct t_args { __u32 kind; __u32 count; __u32 value; };

enum t_kind *t_kind_btf __attribute__((unused));
struct t_small *t_small_btf __attribute__((unused));
struct t_list *t_list_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
} t_ring SEC(".maps");

SEC("syscall")
int t_emit(struct t_args *a)
{
	struct t_list rec = {};
	__u32 n = a->count > 8 ? 8 : a->count;

	rec.kind = a->kind;
	rec.count = n;
	rec.value = a->value;
	for (int i = 0; i < 8; i++)
		rec.items[i] = i < n ? a->value * 100 + i : 0xdead;   /* past `count`: never read */
	if (a->kind == T_SMALL)
		return bpf_ringbuf_output(&t_ring, &rec, 8, 0);
	return bpf_ringbuf_output(&t_ring, &rec, 8 + 8 * n, 0);
}
'''


class Small(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("value", ctypes.c_uint32)]


class List(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint8), ("count", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("value", ctypes.c_uint32), ("items", ctypes.c_uint64 * 8)]


class Args(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("count", ctypes.c_uint32), ("value", ctypes.c_uint32)]


@pytest.fixture
def rig(tmp_path: Path):
    src = tmp_path / "t_records.bpf.c"
    src.write_text(SOURCE)
    layout = {"t_ring": RecordsLayout("t_kind", {"T_SMALL": (Small, "t_small"), "T_LIST": (List, "t_list")})}
    with BpfObject(build(src), layout) as obj:
        fd = obj.program("t_emit").fd

        def emit(kind: int, value: int, count: int = 0) -> None:
            args = Args(kind, count, value)
            opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), ctx_in=ctypes.addressof(args),
                                  ctx_size_in=ctypes.sizeof(args))
            check(lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts)), "t_emit")
            assert ctypes.c_int32(opts.retval).value == 0

        ring = obj.records("t_ring")
        yield emit, ring
        ring.close()


def test_records_come_back_in_order_typed_and_only_as_long_as_their_content(rig):
    emit, ring = rig
    emit(1, 7)
    emit(2, 3, count=2)
    emit(2, 4, count=0)
    emit(2, 5, count=8)
    got = ring.consume()
    assert [type(r) for r in got] == [Small, List, List, List]
    assert got[0].value == 7
    assert (got[1].count, list(got[1].items[:2]), list(got[1].items[2:])) == (2, [300, 301], [0] * 6)
    assert got[2].count == 0 and list(got[2].items) == [0] * 8
    assert list(got[3].items) == [500 + i for i in range(8)]
    assert ring.consume() == [] and ring.foreign_records == 0


def test_an_unknown_kind_is_skipped_and_counted_and_the_budget_holds(rig):
    emit, ring = rig
    emit(1, 1)
    emit(9, 2)          # a kind this reader was not given
    for v in range(3, 8):
        emit(1, v)
    first = ring.consume(budget=3)
    assert [r.value for r in first] == [1, 3, 4] and ring.foreign_records == 1
    assert [r.value for r in ring.consume()] == [5, 6, 7]
