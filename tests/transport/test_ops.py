"""The operator's view of secure migrations between real processes: the
data channel's port range (``--data-ports``), what the journals record of
the peer and of refusals, and job control (``securemig jobs``, ``abort``)."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from securemig.lab import processes
from tests.helpers import bundle_digests
from tests.transport.test_secure import SecureBase


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DataPortsTests(SecureBase):
    def test_data_channel_in_range(self) -> None:
        """The data channel listens on the one port --data-ports allows."""
        port = free_port()
        destination = self.start_destination("--tofu", "--data-ports", f"{port}-{port}")
        self.create_vm()
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 0, result.stderr)
        ports = re.findall(r"data channel of migration \w+ on port (\d+)", destination.log())
        self.assertEqual(ports, [str(port)])

    def test_range_exhausted(self) -> None:
        """Its one port taken: the migration fails with a sentence naming the
        range, and the VM stays at the source, intact and unlocked."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        destination = self.start_destination("--tofu", "--data-ports", f"{port}-{port}")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(
            bundle, before, result, f"all of {port}-{port} (--data-ports) are in use"
        )
        self.assertEqual(list((destination.state_dir / "staging").iterdir()), [])
        self.assertNoUnhandledError(destination)

    def test_bad_range_is_a_usage_error(self) -> None:
        from tests.app.test_service import twistd

        result = twistd(
            "--state-dir",
            str(self.base / "st"),
            "--listen",
            "tcp:0",
            "--identity",
            str(self.dst_id),
            "--data-ports",
            "9000-8000",
            log_file=self.base / "t.log",
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("--data-ports '9000-8000': ports are 1-65535", result.stderr + result.stdout)


def status(*where: str) -> Any:
    result = processes.securemig("status", *where, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
