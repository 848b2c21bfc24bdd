"""The libvirt backend (work in progress)."""

from __future__ import annotations

from types import ModuleType

from securemig.protocol.errors import ErrorCode, LocalFault

#: What to install when libvirt-python is missing.
PYTHON_PACKAGE = "libvirt-python"
DEV_PACKAGE = "libvirt-dev"


class LibvirtError(LocalFault, RuntimeError):
    """libvirt could not do what was asked; the message says what and why."""

    default_code = ErrorCode.RESUME_FAILED


def require_libvirt() -> ModuleType:
    """The ``libvirt`` module, or an error naming what to install."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(
            f"the Python module libvirt is missing: install {PYTHON_PACKAGE} "
            f"(pip install 'securemig[libvirt]', built against the Debian package {DEV_PACKAGE})"
        ) from None
    return libvirt
