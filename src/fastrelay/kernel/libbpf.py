"""Thin ctypes binding to libbpf.so.1 (1.x): only the calls fastrelay uses, typed once here."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform

log = logging.getLogger("fastrelay.libbpf")

c_int, c_char_p, c_void_p, c_size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
c_uint32, c_uint64 = ctypes.c_uint32, ctypes.c_uint64

# enum bpf_attach_type values that the 6.1 UAPI headers on this distribution lack
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
# enum bpf_tc_attach_point
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
BPF_STATS_RUN_TIME = 0
BPF_ANY = 0
BPF_NOEXIST = 1


class BpfTcHook(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", c_uint32)]


class BpfTcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class BtfType(ctypes.Structure):
    """struct btf_type (UAPI): name_off, info, size-or-type."""

    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_type", c_uint32)]


PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__btf": (c_void_p, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__set_log_buf": (c_int, [c_void_p, c_void_p, c_size_t]),
    "bpf_program__set_log_level": (c_int, [c_void_p, c_uint32]),
    "bpf_program__set_autoload": (c_int, [c_void_p, ctypes.c_bool]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__btf_key_type_id": (c_uint32, [c_void_p]),
    "bpf_map__btf_value_type_id": (c_uint32, [c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_tc_hook_create": (c_int, [ctypes.POINTER(BpfTcHook)]),
    "bpf_tc_attach": (c_int, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    "bpf_tc_detach": (c_int, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    "bpf_tc_query": (c_int, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    "bpf_enable_stats": (c_int, [c_int]),
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(BpfTestRunOpts)]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_prog_get_next_id": (c_int, [c_uint32, ctypes.POINTER(c_uint32)]),
    "bpf_map_get_next_id": (c_int, [c_uint32, ctypes.POINTER(c_uint32)]),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "btf__load_vmlinux_btf": (c_void_p, []),
    "btf__free": (None, [c_void_p]),
    "btf__type_by_id": (ctypes.POINTER(BtfType), [c_void_p, c_uint32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
    "btf__resolve_size": (ctypes.c_int64, [c_void_p, c_uint32]),
}


class _Lib:
    """Resolved libbpf functions as attributes (lib.bpf_map__fd(...))."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self._dll = ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise ImportError(
                f"libbpf not found ({exc}): install libbpf1 (run `make demo` or scripts/setup)"
            ) from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._dll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        self.version = f"{self.libbpf_major_version()}.{self.libbpf_minor_version()}"


lib = _Lib()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]


def _print(level: int, fmt: bytes, args: int) -> int:
    """Route libbpf's messages into logging (warn=0, info=1, debug=2)."""
    if platform.machine() == "x86_64":  # va_list is a pointer-sized array type there
        buf = ctypes.create_string_buffer(2048)
        _libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
    else:
        text = fmt.decode(errors="replace").rstrip()
    log.log({0: logging.WARNING, 1: logging.INFO}.get(level, logging.DEBUG), "%s", text)
    return 0


_print_cb = PRINT_FN(_print)
lib.libbpf_set_print(_print_cb)


def check(ret: int, what: str) -> int:
    """Raise OSError for a negative libbpf return (libbpf 1.x returns -errno)."""
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """Raise OSError when a libbpf constructor returned NULL (errno says why)."""
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ptr
