"""Read type layouts from BTF and check Python ctypes mirrors against them.

The C header is the single source of truth; Python keeps small ctypes mirrors for
readability and speed, and `check_layout` fails loudly, naming the field, whenever a
mirror disagrees with the compiled object's BTF.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .errors import LayoutError
from .libbpf import BtfType, lib

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_TYPE_TAG, KIND_ENUM64 = 18, 19
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class _Member(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _Array(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32), ("nelems", ctypes.c_uint32)]


class _Enum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    offset: int  # bytes
    bitfield: bool


class Btf:
    """A view of a libbpf `struct btf` (an object's, or the running kernel's)."""

    def __init__(self, handle: int, owned: bool = False) -> None:
        self._h = handle
        self._owned = owned

    @classmethod
    def vmlinux(cls) -> Btf:
        """The running kernel's BTF (/sys/kernel/btf/vmlinux)."""
        h = lib.btf__load_vmlinux_btf()
        if not h:
            raise LayoutError("kernel BTF unavailable (/sys/kernel/btf/vmlinux missing?)")
        return cls(h, owned=True)

    def close(self) -> None:
        if self._owned and self._h:
            lib.btf__free(self._h)
        self._h = 0

    def _type(self, type_id: int) -> BtfType:
        return lib.btf__type_by_id(self._h, type_id).contents

    @staticmethod
    def kind(t: BtfType) -> int:
        return (t.info >> 24) & 0x1F

    def name(self, type_id: int) -> str:
        return (lib.btf__name_by_offset(self._h, self._type(type_id).name_off) or b"").decode()

    def find(self, name: str, kind: int) -> int:
        tid = lib.btf__find_by_name_kind(self._h, name.encode(), kind)
        if tid < 0:
            raise LayoutError(f"type {name!r} not found in BTF")
        return tid

    def strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while self.kind(self._type(type_id)) in _MODIFIERS:
            type_id = self._type(type_id).size_type
        return type_id

    def size(self, type_id: int) -> int:
        return lib.btf__resolve_size(self._h, type_id)

    def members(self, type_id: int) -> list[Member]:
        tid = self.strip(type_id)
        t = self._type(tid)
        if self.kind(t) not in (KIND_STRUCT, KIND_UNION):
            raise LayoutError(f"BTF type {self.name(tid)!r} is not a struct")
        vlen, kflag = t.info & 0xFFFF, t.info >> 31
        base = ctypes.addressof(t) + ctypes.sizeof(BtfType)
        out = []
        for i in range(vlen):
            m = _Member.from_address(base + i * ctypes.sizeof(_Member))
            bits = m.offset & 0xFFFFFF if kflag else m.offset
            bitsize = m.offset >> 24 if kflag else 0
            name = (lib.btf__name_by_offset(self._h, m.name_off) or b"").decode()
            out.append(Member(name, m.type, bits // 8, bool(bitsize) or bits % 8 != 0))
        return out

    def array(self, type_id: int) -> tuple[int, int] | None:
        """(element type id, count) if type_id is an array, else None."""
        t = self._type(self.strip(type_id))
        if self.kind(t) != KIND_ARRAY:
            return None
        a = _Array.from_address(ctypes.addressof(t) + ctypes.sizeof(BtfType))
        return a.type, a.nelems

    def enum(self, name: str) -> dict[str, int]:
        """Enumerator values of `enum name`."""
        tid = self.find(name, KIND_ENUM)
        t = self._type(tid)
        base = ctypes.addressof(t) + ctypes.sizeof(BtfType)
        out = {}
        for i in range(t.info & 0xFFFF):
            e = _Enum.from_address(base + i * ctypes.sizeof(_Enum))
            out[(lib.btf__name_by_offset(self._h, e.name_off) or b"").decode()] = e.val
        return out

    def offsetof(self, struct: str, member: str) -> tuple[int, int]:
        """(byte offset, size) of a member of `struct struct`."""
        for m in self.members(self.find(struct, KIND_STRUCT)):
            if m.name == member:
                return m.offset, self.size(m.type_id)
        raise LayoutError(f"struct {struct} has no member {member!r}")


def _is_struct(ctype: type) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))


def _is_array(ctype: type) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, ctypes.Array)


def check_layout(btf: Btf, type_id: int, ctype: type, path: str) -> None:
    """Raise LayoutError naming the first field where `ctype` and BTF type `type_id` differ."""
    size = btf.size(type_id)
    if size != ctypes.sizeof(ctype):
        raise LayoutError(f"{path}: size {size} in BTF, {ctypes.sizeof(ctype)} in Python ({ctype.__name__})")
    if _is_struct(ctype):
        members = {m.name: m for m in btf.members(type_id)}
        mirrored = {name for name, *_ in ctype._fields_}
        for name in members.keys() - mirrored:
            if name:  # anonymous padding members have no name
                raise LayoutError(f"{path}.{name}: in BTF but missing from {ctype.__name__}")
        for name, ftype, *_ in ctype._fields_:
            if name not in members:
                raise LayoutError(f"{path}.{name}: in {ctype.__name__} but not in BTF")
            m = members[name]
            py_off = getattr(ctype, name).offset
            if m.bitfield:
                raise LayoutError(f"{path}.{name}: bitfields are not mirrored")
            if m.offset != py_off:
                raise LayoutError(f"{path}.{name}: offset {m.offset} in BTF, {py_off} in Python")
            check_layout(btf, m.type_id, ftype, f"{path}.{name}")
    elif _is_array(ctype):
        arr = btf.array(type_id)
        if arr is None:
            raise LayoutError(f"{path}: array in Python, not in BTF")
        elem, n = arr
        if n != ctype._length_:
            raise LayoutError(f"{path}: {n} elements in BTF, {ctype._length_} in Python")
        check_layout(btf, elem, ctype._type_, f"{path}[]")
    elif btf.array(type_id) is not None or btf.kind(btf._type(btf.strip(type_id))) in (KIND_STRUCT, KIND_UNION):
        raise LayoutError(f"{path}: aggregate in BTF, scalar {ctype.__name__} in Python")
