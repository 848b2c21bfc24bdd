"""
The errors of securemig: one hierarchy, each error carrying its wire code.

Every error securemig expects derives from :class:`MigrationError`, which
carries the :class:`ErrorCode` an ABORT reports for it, so the edge that
turns an exception into an ABORT reads ``error.code`` instead of testing
types.  Two branches keep apart who is at fault (as h11 does with its
Local/RemoteProtocolError):

- :class:`PeerViolation`: the peer broke the protocol (a frame, a record, a
  message out of order).  Raised only while processing the peer's bytes.
- :class:`LocalFault`: something on this side failed or refused (disk, TPM,
  hypervisor, journal); the peer did nothing wrong.

:class:`Refused` is a security check refusing the peer's evidence or key,
neither a violation of the framing nor a local fault.  :class:`ProtocolError`
is the general case where the code is chosen at the raise.

``reason`` is shown to operators and may be sent to the peer: never a secret.
"""

from __future__ import annotations

import enum
import errno
from typing import ClassVar


class ErrorCode(enum.IntEnum):
    """Stable error codes: carried in ABORT, printed to operators, journaled.

    Codes never change meaning.  A version-1 receiver refuses a code it
    does not know (ABORT would then lose its reason), so a new code needs a
    new protocol version; until then a failure is reported with the nearest
    existing code and the reason says exactly what failed.
    """

    MALFORMED = 1  #: a frame or field does not parse
    FRAME_TOO_LARGE = 2  #: a length over the bound for its frame type
    UNKNOWN_TYPE = 3  #: a frame type this version does not define
    UNEXPECTED_MESSAGE = 4  #: a valid message in a state that does not allow it
    UNSUPPORTED_VERSION = 5  #: HELLO with a protocol version we do not speak
    BAD_PARAMETER = 6  #: a field out of its allowed range (chunk size, names, ...)
    POLICY_REFUSED = 7  #: the destination's policy does not allow this migration
    VM_BUSY = 8  #: the VM is arriving, present, held in doubt, or being removed here
    INSUFFICIENT_SPACE = 9  #: not enough free space for the announced images
    STREAM_MISMATCH = 10  #: a stream's size or SHA-256 differs from what was announced
    TIMEOUT = 11  #: the peer stalled (idle) or the migration ran past its deadline
    DISK_FULL = 12  #: the disk filled while writing
    IO_ERROR = 13  #: any other local I/O failure
    CANCELLED = 14  #: an operator stopped the migration
    INTERNAL = 15  #: a bug; see the log of the side that sent it
    CONNECTION_LOST = 16  #: the connection ended before the migration did
    RESUME_FAILED = 17  #: the VM could not be resumed (after commit: at the destination)
    ATTESTATION_FAILED = 18  #: the peer's evidence failed a check (the reason names it)
    KEY_TRANSFER_FAILED = 19  #: the migration key or the wrapped vTPM key was refused
    RECORD_REFUSED = 20  #: a data channel record failed authentication, or the channel was cut
    LIVE_FAILED = 21  #: QEMU's live migration failed or did not complete (the reason says why)
    #: The destination's backend cannot run this VM (the reason names both
    #: backends); only ever sent to a source whose HELLO named its backend.
    BACKEND_MISMATCH = 22


class MigrationError(Exception):
    """Base of every error securemig expects: a stable code and a reason."""

    #: The code reported for this kind of error, unless the raise names one.
    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, reason: str, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: ErrorCode = code if code is not None else self.default_code

    def __str__(self) -> str:
        return self.reason


class ProtocolError(MigrationError):
    """An error whose code is chosen where it is raised: ``(code, reason)``.

    ``str()`` is ``CODE: reason``, the form operators see in logs."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason, code)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.reason}"


class PeerViolation(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalFault(MigrationError):
    """This side failed (disk, TPM, hypervisor, journal); not the peer's doing."""


class Refused(MigrationError):
    """A security check refused what the peer presented."""


def io_error(exc: OSError, doing: str) -> ProtocolError:
    """Classify a local OSError: a full disk has its own code."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = ErrorCode.DISK_FULL if full else ErrorCode.IO_ERROR
    return ProtocolError(code, f"{doing}: {exc.strerror or exc}")
