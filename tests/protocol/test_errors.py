"""Errors (:mod:`securemig.protocol.errors`): the code an operating-system
error is given."""

from __future__ import annotations

import errno

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol.errors import ErrorCode, io_error


class IoErrorTests(SynchronousTestCase):
    def test_io_error_codes(self) -> None:
        """ENOSPC is DISK_FULL; other errors are IO_ERROR."""
        full = io_error(OSError(errno.ENOSPC, "No space left on device"), "writing")
        other = io_error(OSError(errno.EIO, "Input/output error"), "writing")
        self.assertEqual((full.code, other.code), (ErrorCode.DISK_FULL, ErrorCode.IO_ERROR))
