"""Errors raised by the kernel toolkit; each carries a message a user can act on."""


class KernelError(Exception):
    """Base class for fastrelay.kernel failures."""


class BuildError(KernelError):
    """clang failed or is missing; the message holds clang's own output."""


class LoadError(KernelError):
    """libbpf could not open or load an object; for verifier rejections, `log` is the verifier's tail."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n--- verifier log (tail) ---\n{log}" if log else message)
        self.log = log


class LayoutError(KernelError):
    """A Python mirror of a C struct disagrees with the object's BTF."""


class AttachError(KernelError):
    """Attaching a program to a TC hook failed."""


class PermissionDenied(KernelError):
    """The caller lacks root / CAP_BPF + CAP_NET_ADMIN."""
