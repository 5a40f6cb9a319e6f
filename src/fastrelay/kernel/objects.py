"""Open and load BPF objects through libbpf; typed, BTF-checked map access."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from . import abi, build, privileges
from .btf import KIND_STRUCT, Btf, check_layout
from .errors import LayoutError, LoadError
from .libbpf import BPF_ANY, BpfTestRunOpts, check, check_ptr, lib
from .ringbuf import RecordRing, RingBuffer
from .stats import prog_verified_insns

log = logging.getLogger("fastrelay.kernel")

BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH = 5, 6, 10
BPF_MAP_TYPE_RINGBUF = 27
_PERCPU = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
VERIFIER_LOG_SIZE = 4 << 20
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class MapLayout:
    """The ctypes mirrors of a map's key and value."""

    key: type
    value: type


@dataclass(frozen=True)
class RingLayout:
    """The ctypes mirror of a ring buffer's records, and the BTF struct it mirrors."""

    record: type[ctypes.Structure]
    struct: str


@dataclass(frozen=True)
class RecordsLayout:
    """A ring buffer of several record types: `kinds` (an enum in BTF) names each record's first
    byte; `records` maps a member of it to the ctypes mirror and the BTF struct it mirrors."""

    kinds: str
    records: Mapping[str, tuple[type[ctypes.Structure], str]]


@dataclass(frozen=True)
class PrivateMap:
    """A map only the programs use (per-CPU scratch space): no mirror, no access from Python."""


@dataclass(frozen=True)
class Constants:
    """Sizes Python's mirrors are built with, checked against an enum of the object's BTF (a
    #define would not reach BTF; the header declares them as enum members for this)."""

    values: Mapping[str, int]


type Layouts = Mapping[str, MapLayout | RingLayout | RecordsLayout | PrivateMap | Constants]

_u32 = ctypes.c_uint32
# Which mirror goes with which map, per program in bpf/; every entry is checked when the object loads.
LAYOUTS: dict[str, Layouts] = {
    "udp_fanout": {
        "fr_fanout_cfg": MapLayout(_u32, abi.FanoutConfig),
        "fr_fanout_sets": MapLayout(_u32, abi.FanoutSet),
        "fr_fanout_active": MapLayout(_u32, _u32),
        "fr_fanout_local": MapLayout(abi.Addr, ctypes.c_uint8),
        "fr_fanout_sync_inner": MapLayout(_u32, _u32),
        "fr_fanout_sync": MapLayout(_u32, _u32),  # value: the inner map's fd
        "fr_fanout_stats": MapLayout(_u32, ctypes.c_uint64),
        "fr_fanout_events": RingLayout(abi.FanoutEvent, "fr_fanout_event"),
    },
    "lab_probe": {
        "fr_tag_magic": Constants({"FR_TAG_MAGIC": abi.FR_TAG_MAGIC}),
        "fr_probe_cfg": MapLayout(_u32, abi.ProbeConfig),
        "fr_probe_ts": MapLayout(_u32, abi.ProbeTs),
        "fr_probe_slots": MapLayout(abi.ProbeMac, _u32),
        "fr_probe_hist": MapLayout(_u32, abi.ProbeHist),
        "fr_probe_scratch": PrivateMap(),
    },
    "lab_dropper": {
        "fr_drop_cfg": MapLayout(_u32, abi.DropConfig),
        "fr_drop_stats": MapLayout(_u32, ctypes.c_uint64),
    },
    "moq_fastpath": {
        "fr_moq_cfg": MapLayout(_u32, abi.MoqConfig),
        "fr_moq_up": MapLayout(abi.MoqCid, abi.MoqUpconn),
        "fr_moq_alias": MapLayout(abi.MoqAliasKey, abi.MoqAliasVal),
        "fr_moq_ustream": MapLayout(abi.MoqStreamKey, abi.MoqUstream),
        "fr_moq_tracks": MapLayout(_u32, abi.MoqTrack),
        "fr_moq_dsub": MapLayout(abi.MoqDsubKey, abi.MoqDsub),
        "fr_moq_conns": MapLayout(_u32, abi.MoqConn),
        "fr_moq_state": MapLayout(_u32, abi.MoqState),
        "fr_moq_dcid": MapLayout(abi.MoqCid, abi.MoqSlot),
        "fr_moq_hcid": MapLayout(abi.MoqCid, abi.MoqSlot),
        "fr_moq_dstream": MapLayout(abi.MoqStreamKey, abi.MoqDstream),
        "fr_moq_stats": MapLayout(_u32, ctypes.c_uint64),
        "fr_moq_events": RecordsLayout("fr_moq_record_kind", {
            "FR_MOQ_REC_SENT": (abi.MoqSent, "fr_moq_sent"),
            "FR_MOQ_REC_RENUMBERED": (abi.MoqRenumbered, "fr_moq_renumbered"),
            "FR_MOQ_REC_HANDOVER": (abi.MoqHandover, "fr_moq_handover"),
            "FR_MOQ_REC_ACK": (abi.MoqAck, "fr_moq_ack"),
            "FR_MOQ_REC_LOST": (abi.MoqLost, "fr_moq_lost"),
            "FR_MOQ_REC_TIMER": (abi.MoqTimer, "fr_moq_timer"),
        }),
        "fr_moq_scratch": PrivateMap(),
        "fr_moq_rec": MapLayout(_u32, abi.MoqRecovery),
        "fr_moq_rec_sent": MapLayout(_u32, abi.MoqSentTable),
        "fr_moq_rec_io": MapLayout(_u32, abi.MoqRecoverArgs),
        "fr_moq_rec_timer": PrivateMap(),
        abi.FR_MOQ_LIMITS: Constants({name: getattr(abi, name) for name in (
            "FR_MOQ_CID_LEN", "FR_MOQ_MAX_FRAMES", "FR_MOQ_MAX_ACK_RANGES", "FR_MOQ_MAX_SUBS", "FR_MOQ_MAX_CONNS",
            "FR_MOQ_MAX_TRACK_IDS", "FR_MOQ_MAX_RECOVERY_CONNS", "FR_MOQ_SENT_SLOTS", "FR_MOQ_RTT_SAMPLES",
            "FR_MOQ_LR_MAX_RANGES", "FR_MOQ_PKT_FRAMES", "FR_MOQ_USER_ACK_EVERY")}),
    },
}


class Program:
    """A loaded program: name and fd (owned by its BpfObject)."""

    def __init__(self, handle: int) -> None:
        self._h = handle
        self.name: str = lib.bpf_program__name(handle).decode()

    @property
    def fd(self) -> int:
        return lib.bpf_program__fd(self._h)

    def test_run(self, packet: bytes, repeat: int = 1) -> tuple[int, bytes]:
        """Run the program `repeat` times on `packet` (BPF_PROG_TEST_RUN, in the kernel; each run
        sees what the previous one left): (last return code as signed int, packet as the program
        left it). Redirects are not carried out."""
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        data_in = ctypes.create_string_buffer(packet, len(packet))
        data_out = ctypes.create_string_buffer(len(packet) + 512)
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), data_in=ctypes.addressof(data_in),
                              data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                              data_size_out=len(data_out), repeat=repeat)
        check(lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"test run of {self.name}")
        return ctypes.c_int32(opts.retval).value, data_out.raw[:opts.data_size_out]


class Map[K, V]:
    """A map whose key/value ctypes were checked against BTF. Per-CPU lookups return one value per CPU."""

    def __init__(self, handle: int, key: type, value: type) -> None:
        self.name: str = lib.bpf_map__name(handle).decode()
        self.fd: int = lib.bpf_map__fd(handle)
        self.key_type = key
        self.value_type = value
        self.max_entries: int = lib.bpf_map__max_entries(handle)
        self.percpu = lib.bpf_map__type(handle) in _PERCPU
        if self.percpu:
            self.ncpus = check(lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
            stride = (ctypes.sizeof(value) + 7) & ~7
            self._slot = stride
            self._buf_type = ctypes.c_char * (stride * self.ncpus)
        self._mm: mmap.mmap | None = None
        self._view: ctypes.Array | None = None

    def view(self) -> ctypes.Array:
        """An array map made with BPF_F_MMAPABLE, mapped: its entries read in place, without a
        syscall (what the programs change shows at once). Lives until close()."""
        if self._view is None:
            size = ctypes.sizeof(self.value_type)
            if size % 8:
                raise LayoutError(f"{self.name}: mapped values must be a multiple of 8 bytes, not {size}")
            length = -(-size * self.max_entries // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._view = (self.value_type * self.max_entries).from_buffer(self._mm)
        return self._view

    def close(self) -> None:
        """Unmap the view (the map can go away once nothing else holds it)."""
        self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds an entry of the view: unmapped when that goes
            self._mm = None

    def _key(self, key: K | int) -> ctypes._CData:
        return key if isinstance(key, ctypes._SimpleCData | ctypes.Structure) else self.key_type(key)

    def lookup(self, key: K | int) -> V | list[V] | None:
        """The value (a list of per-CPU values for per-CPU maps), or None if absent."""
        k = self._key(key)
        buf = self._buf_type() if self.percpu else self.value_type()
        ret = lib.bpf_map_lookup_elem(self.fd, ctypes.byref(k), ctypes.byref(buf))
        if ret == -errno.ENOENT:
            return None
        check(ret, f"lookup in {self.name}")
        if self.percpu:
            return [self.value_type.from_buffer_copy(buf, i * self._slot) for i in range(self.ncpus)]
        return buf

    def update(self, key: K | int, value: V, flags: int = BPF_ANY) -> None:
        """Insert or replace (per-CPU maps: the same value on every CPU)."""
        k = self._key(key)
        if self.percpu:
            buf = self._buf_type()
            for i in range(self.ncpus):
                ctypes.memmove(ctypes.addressof(buf) + i * self._slot, ctypes.byref(value), ctypes.sizeof(value))
            value = buf
        check(lib.bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(value), flags), f"update {self.name}")

    def delete(self, key: K | int) -> bool:
        """Delete a key; False if it was absent."""
        ret = lib.bpf_map_delete_elem(self.fd, ctypes.byref(self._key(key)))
        if ret == -errno.ENOENT:
            return False
        check(ret, f"delete from {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        prev, nxt = None, self.key_type()
        while True:
            ret = lib.bpf_map_get_next_key(self.fd, ctypes.byref(prev) if prev is not None else None, ctypes.byref(nxt))
            if ret == -errno.ENOENT:
                return
            check(ret, f"iterate {self.name}")
            yield nxt
            prev, nxt = nxt, self.key_type()

    def sum_counters(self) -> list[int]:
        """For a per-CPU array of u64 counters: each counter summed over CPUs."""
        return [sum(v.value for v in self.lookup(i)) for i in range(self.max_entries)]


class BpfObject:
    """A compiled BPF object, opened and loaded (verified) into the kernel, its declared map
    layouts checked against its BTF.

    >>> with BpfObject.load("udp_fanout") as obj: prog = obj.program("fr_udp_fanout")
    """

    def __init__(self, path: str | Path, layouts: Layouts | None = None) -> None:
        """Load the object at `path` and check `layouts` (map name -> mirrors); LayoutError
        (naming the map and field) if one disagrees, and nothing stays loaded."""
        self._obj = 0
        self.layouts: Layouts = dict(layouts or {})
        privileges.require()
        self.path = Path(path)
        self._obj = check_ptr(lib.bpf_object__open_file(str(self.path).encode(), None), f"open {self.path}")
        self._logs: dict[str, ctypes.Array] = {}
        prog = None
        while prog := lib.bpf_object__next_program(self._obj, prog):
            buf = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
            lib.bpf_program__set_log_buf(prog, buf, len(buf))
            self._logs[lib.bpf_program__name(prog).decode()] = buf
        ret = lib.bpf_object__load(self._obj)
        if ret < 0:
            failed = [(name, buf.value.decode(errors="replace")) for name, buf in self._logs.items() if buf.value]
            lib.bpf_object__close(self._obj)
            self._obj = 0
            name, text = failed[-1] if failed else ("?", "")
            tail = "\n".join(text.rstrip().splitlines()[-LOG_TAIL_LINES:])
            raise LoadError(f"kernel rejected {self.path.name} (program {name}): error {-ret}", tail)
        self._logs.clear()  # the buffers are only needed for a failed load
        # what each program cost the verifier here (kernel >= 5.16), for doctor and the logs
        self.verified_insns: dict[str, int] = {}
        while prog := lib.bpf_object__next_program(self._obj, prog):
            fd = lib.bpf_program__fd(prog)
            if fd >= 0:
                self.verified_insns[lib.bpf_program__name(prog).decode()] = prog_verified_insns(fd)
        log.debug("%s loaded: %s", self.path.name,
                  ", ".join(f"{name} {n} insns verified" for name, n in self.verified_insns.items()))
        self.btf = Btf(lib.bpf_object__btf(self._obj))
        self._checked: set[tuple[str, type, type]] = set()
        try:
            for name, layout in self.layouts.items():
                if isinstance(layout, RingLayout):
                    self._ring_handle(name, layout.record, layout.struct)
                elif isinstance(layout, RecordsLayout):
                    self._record_kinds(name, layout)
                elif isinstance(layout, Constants):
                    self._check_constants(name, layout)
                elif isinstance(layout, MapLayout):
                    self.map(name, layout.key, layout.value)
                else:
                    self._map_handle(name)  # a private map must at least exist
        except LayoutError as exc:
            self.close()
            raise LayoutError(f"{self.path.name}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(cls, program: str) -> BpfObject:
        """Build (cached) and load bpf/<program>.bpf.c, checking the layouts LAYOUTS declares for it."""
        return cls(build.build(program), LAYOUTS.get(program))

    def program(self, name: str) -> Program:
        return Program(check_ptr(lib.bpf_object__find_program_by_name(self._obj, name.encode()), f"program {name}"))

    def _map_handle(self, name: str) -> int:
        return check_ptr(lib.bpf_object__find_map_by_name(self._obj, name.encode()), f"map {name}")

    def _declared(self, name: str, kind: type) -> MapLayout | RingLayout:
        layout = self.layouts.get(name)
        if not isinstance(layout, kind):
            raise LayoutError(f"{self.path.name}: no {kind.__name__} declared for {name}; pass the mirrors")
        return layout

    def map[K, V](self, name: str, key: type[K] | None = None, value: type[V] | None = None) -> Map[K, V]:
        """A map with its key/value layouts checked against BTF (LayoutError names the field);
        sizes are checked even for maps without BTF types (map-in-map values). Without `key`
        and `value`, the declared mirrors (already checked at load)."""
        if key is None or value is None:
            layout = self._declared(name, MapLayout)
            key, value = key or layout.key, value or layout.value
        h = self._map_handle(name)
        if (name, key, value) not in self._checked:
            for what, tid, size, ctype in (
                ("key", lib.bpf_map__btf_key_type_id(h), lib.bpf_map__key_size(h), key),
                ("value", lib.bpf_map__btf_value_type_id(h), lib.bpf_map__value_size(h), value),
            ):
                if tid:
                    check_layout(self.btf, tid, ctype, f"{name}.{what}")
                if ctypes.sizeof(ctype) != size:
                    raise LayoutError(f"{name}.{what}: {size} bytes in the map, {ctypes.sizeof(ctype)} in Python")
            self._checked.add((name, key, value))
        return Map(h, key, value)

    def map_names(self) -> list[str]:
        """Names of the object's own maps (not libbpf's internal .bss/.data/.rodata ones)."""
        names, h = [], None
        while h := lib.bpf_object__next_map(self._obj, h):
            name = lib.bpf_map__name(h).decode()
            if "." not in name:
                names.append(name)
        return names

    def map_fd(self, name: str) -> int:
        """fd of a map (e.g. to store it in a map-in-map)."""
        return lib.bpf_map__fd(self._map_handle(name))

    def _ring_handle(self, name: str, record: type[ctypes.Structure], btf_struct: str) -> int:
        self.struct(btf_struct, record)
        h = self._map_handle(name)
        if lib.bpf_map__type(h) != BPF_MAP_TYPE_RINGBUF:
            raise LayoutError(f"{name} is not a ring buffer")
        return h

    def _record_kinds(self, name: str, layout: RecordsLayout) -> dict[int, type[ctypes.Structure]]:
        """{first byte: mirror} of a ring of several record types, every mirror checked."""
        values = self.enum(layout.kinds)
        kinds = {}
        for member, (record, struct) in layout.records.items():
            if member not in values:
                raise LayoutError(f"{name}: {layout.kinds} has no {member}")
            self.struct(struct, record)
            kinds[values[member]] = record
        if lib.bpf_map__type(self._map_handle(name)) != BPF_MAP_TYPE_RINGBUF:
            raise LayoutError(f"{name} is not a ring buffer")
        return kinds

    def _check_constants(self, enum: str, layout: Constants) -> None:
        values = self.enum(enum)
        for member, value in layout.values.items():
            if values.get(member) != value:
                raise LayoutError(f"{enum}.{member} is {values.get(member)} in the object, {value} in Python")

    def records(self, name: str) -> RecordRing:
        """A reader for ring buffer `name` of several record types (its RecordsLayout)."""
        layout = self.layouts.get(name)
        if not isinstance(layout, RecordsLayout):
            raise LayoutError(f"{self.path.name}: no RecordsLayout declared for {name}")
        kinds = self._record_kinds(name, layout)
        h = self._map_handle(name)
        return RecordRing(lib.bpf_map__fd(h), lib.bpf_map__max_entries(h), kinds)

    def ringbuf(self, name: str, record: type[ctypes.Structure] | None = None,
                btf_struct: str | None = None) -> RingBuffer:
        """A reader for ring-buffer map `name` whose records are `struct btf_struct` (checked);
        without them, the declared record mirror."""
        if record is None or btf_struct is None:
            layout = self._declared(name, RingLayout)
            record, btf_struct = record or layout.record, btf_struct or layout.struct
        h = self._ring_handle(name, record, btf_struct)
        return RingBuffer(lib.bpf_map__fd(h), lib.bpf_map__max_entries(h), record)

    def struct(self, name: str, ctype: type) -> type:
        """Check `ctype` against `struct name` in this object's BTF and return it."""
        check_layout(self.btf, self.btf.find(name, KIND_STRUCT), ctype, f"struct {name}")
        return ctype

    def enum(self, name: str) -> dict[str, int]:
        return self.btf.enum(name)

    def close(self) -> None:
        """Unload: programs and maps go away once no link or fd still holds them."""
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
