"""Helpers of the kernel data path's lab tests: the MoQT relay's BPF state read from outside
its process (programs, links, typed map entries)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastrelay.kernel import abi
from fastrelay.netns import exec_argv

# ---- the MoQT relay's BPF state, from outside its process ---------------------------------------

def _libbpf():
    """libbpf, loaded on first use: the in-memory protocol tests share this conftest and must
    not need it."""
    from fastrelay.kernel.libbpf import lib

    return lib


@dataclass(frozen=True)
class TcxLink:
    prog_id: int
    ifindex: int
    direction: str  # "ingress" / "egress"


def _bpftool_ids(kind: str, ids: set[int]) -> dict[str, int]:
    """{name: id} of those of `ids` that bpftool lists as `kind` ("prog" or "map")."""
    shown = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
    return {x["name"]: x["id"] for x in json.loads(shown) if x["id"] in ids and "name" in x}


@dataclass
class BpfHeld:
    """The BPF objects one process holds open: program and map ids, and its tcx links."""

    programs: set[int] = field(default_factory=set)
    maps: set[int] = field(default_factory=set)
    tcx: list[TcxLink] = field(default_factory=list)

    def program_ids(self) -> dict[str, int]:
        return _bpftool_ids("prog", self.programs)

    def map_ids(self) -> dict[str, int]:
        return _bpftool_ids("map", self.maps)


def bpf_held(pid: int) -> BpfHeld:
    """What /proc/PID/fdinfo says process `pid` holds (ids are global: other relays, other
    tests' programs of the same names do not count)."""
    held = BpfHeld()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(re.findall(r"^(\w+):\s+(.*)$", f.read(), re.M))
        except OSError:
            continue  # closed meanwhile
        if info.get("link_type") == "tcx":
            direction = re.search(r"\((\w+)\)", info["attach_type"])[1]
            held.tcx.append(TcxLink(int(info["prog_id"]), int(info["ifindex"]), direction))
        elif "prog_id" in info:
            held.programs.add(int(info["prog_id"]))
        elif "map_id" in info:
            held.maps.add(int(info["map_id"]))
    return held


def still_loaded(held: BpfHeld) -> dict[str, set[int]]:
    """Which of `held`'s programs and maps the kernel still has (empty sets: all freed)."""
    lib = _libbpf()

    def alive(get_fd, ids: set[int]) -> set[int]:
        out = set()
        for i in ids:
            fd = get_fd(i)
            if fd >= 0:
                os.close(fd)
                out.add(i)
        return out

    return {"programs": alive(lib.bpf_prog_get_fd_by_id, held.programs),
            "maps": alive(lib.bpf_map_get_fd_by_id, held.maps)}


def clsact_filters(netns: str) -> list[dict]:
    """The clsact filters in namespace `netns`, as bpftool lists them (devname, kind, id).
    (bpftool 7.1 lists no tcx links here: bpf_held() finds those in the owner's fdinfo.)"""
    out = subprocess.run(exec_argv(netns, ["bpftool", "-j", "net", "show"]), capture_output=True, text=True,
                         check=True).stdout
    return [f for entry in json.loads(out) for f in entry.get("tc", [])]


def _moq_map_types() -> dict[str, tuple[type, type]]:
    u32 = ctypes.c_uint32
    return {"fr_moq_up": (abi.MoqCid, abi.MoqUpconn), "fr_moq_alias": (abi.MoqAliasKey, abi.MoqAliasVal),
            "fr_moq_ustream": (abi.MoqStreamKey, abi.MoqUstream), "fr_moq_tracks": (u32, abi.MoqTrack),
            "fr_moq_dsub": (abi.MoqDsubKey, abi.MoqDsub), "fr_moq_conns": (u32, abi.MoqConn),
            "fr_moq_state": (u32, abi.MoqState), "fr_moq_dcid": (abi.MoqCid, abi.MoqSlot),
            "fr_moq_hcid": (abi.MoqCid, abi.MoqSlot), "fr_moq_dstream": (abi.MoqStreamKey, abi.MoqDstream)}


class RelayMaps:
    """The MoQT fast path's maps of one relay process, read by id from outside it (the layouts
    are the relay's own ctypes, checked against BTF when it loaded them)."""

    def __init__(self, pid: int) -> None:
        self.ids = bpf_held(pid).map_ids()
        self.types = _moq_map_types()
        missing = self.types.keys() - self.ids.keys()
        assert not missing, f"process {pid} holds no map {sorted(missing)}"

    def _fd(self, name: str) -> int:
        fd = _libbpf().bpf_map_get_fd_by_id(self.ids[name])
        assert fd >= 0, f"map {name} (id {self.ids[name]}) is gone: {os.strerror(-fd)}"
        return fd

    def lookup(self, name: str, key: ctypes._CData) -> ctypes.Structure | None:
        """The value under `key` in map `name`, None if there is none."""
        fd = self._fd(name)
        try:
            value = self.types[name][1]()
            ret = _libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
            if ret == -errno.ENOENT:
                return None
            if ret != 0:
                raise OSError(-ret, f"lookup in {name}")
            return value
        finally:
            os.close(fd)

    def entries(self, name: str) -> Iterator[tuple[object, object]]:
        """(key, value) of every entry of map `name` (every index of an array)."""
        lib = _libbpf()
        key_type, value_type = self.types[name]
        fd = self._fd(name)
        try:
            prev, key = None, key_type()
            while lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                           ctypes.byref(key)) == 0:
                value = value_type()
                ret = lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
                if ret == 0:
                    yield key, value
                elif ret != -errno.ENOENT:  # deleted between the two calls is fine
                    raise OSError(-ret, f"lookup in {name}")
                prev, key = key, key_type()
        finally:
            os.close(fd)

    def connections(self) -> dict[str, set[int]]:
        """The subscriber slots each per-connection map has an entry for (array maps: a
        non-zero entry). A connection that left must be in none of them."""
        def nonzero(value: ctypes.Structure) -> bool:
            return any(bytes(value))

        def slot(key: ctypes.c_uint32) -> int:
            return key.value

        return {
            "conns": {slot(k) for k, v in self.entries("fr_moq_conns") if v.gen},
            "state": {slot(k) for k, v in self.entries("fr_moq_state") if nonzero(v)},
            "dcid": {v.slot for _, v in self.entries("fr_moq_dcid")},
            "hcid": {v.slot for _, v in self.entries("fr_moq_hcid")},  # whose ACK-only packets are absorbed
            "dsub": {k.conn for k, _ in self.entries("fr_moq_dsub")},
            "dstream": {k.conn for k, _ in self.entries("fr_moq_dstream")},
            # the kernel's fan-out sets, as the ingress program reads them
            "tracks": {v.conns[i] for _, v in self.entries("fr_moq_tracks") for i in range(v.count)},
        }

    def publishers(self) -> dict[str, int]:
        """How many entries the per-publisher maps hold."""
        return {name: sum(1 for _ in self.entries(name)) for name in ("fr_moq_up", "fr_moq_alias", "fr_moq_ustream")}

    def kernel_packets(self, slot: int) -> int:
        """Packets the kernel sent on connection `slot` (its fr_moq_state counter)."""
        return self.lookup("fr_moq_state", ctypes.c_uint32(slot)).packets
