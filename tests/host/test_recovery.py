"""The source's recovery (:mod:`securemig.host.recovery`): a committed
departure whose copy here cannot be removed -- a libvirt domain whose
libvirtd is down -- is tried again backing off, not every round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.host.journal import Journal, driven, driving
from securemig.host.recovery import (
    RELEASE_FIRST_RETRY,
    RELEASE_LAST_RETRY,
    Backoff,
    settle_departures,
)
from securemig.hypervisor.bundle import Bundle, Manifest
from securemig.hypervisor.libvirt import DOMAIN_FILE, DomainRecord
from securemig.protocol.phases import Phase


class BackoffTests(SynchronousTestCase):
    """:class:`Backoff`: due at once, then after each failure twice as long
    as before, bounded; forgotten on success."""

    def test_doubles_up_to_the_bound_and_resets(self) -> None:
        now = [100.0]
        backoff = Backoff(clock=lambda: now[0])
        self.assertTrue(backoff.due("r"))
        delays = []
        for _ in range(10):
            delay = backoff.failed("r")
            delays.append(delay)
            self.assertFalse(backoff.due("r"))
            now[0] += delay - 0.01
            self.assertFalse(backoff.due("r"), delay)
            now[0] += 0.01
            self.assertTrue(backoff.due("r"), delay)
        self.assertEqual(delays[:3], [RELEASE_FIRST_RETRY, 2 * RELEASE_FIRST_RETRY, 4.0])
        self.assertEqual(max(delays), RELEASE_LAST_RETRY)
        self.assertEqual(delays[-1], RELEASE_LAST_RETRY)
        # Another record is not held back by this one.
        backoff.failed("r")
        self.assertTrue(backoff.due("other"))
        backoff.succeeded("r")
        self.assertTrue(backoff.due("r"))
        self.assertEqual(backoff.failed("r"), RELEASE_FIRST_RETRY)


#: A committed departure journaled by a ``securemig migrate`` that has
#: exited (recovery leaves a live one's records alone): done, never released.
_JOURNAL = """
import sys
from pathlib import Path
from securemig.host.journal import Journal, driven, driving
journal = Journal(Path(sys.argv[1]))
mid = journal.begin(role="source", vm="vm1", peer="127.0.0.1:1", variant="shared-storage",
                    protocol="secure", bundle=sys.argv[2])
journal.phase(mid, "committed")
journal.finish(mid, "done")
journal.set_peer_settled(mid)
print(mid)
"""


class ReleaseBackoffTests(TestCase):
    """A committed departure, done, whose copy here is a libvirt domain on
    a libvirtd that is down (its socket answers nobody): each settling
    round with the daemon's :class:`Backoff` tries the release only when it
    is due -- its failure logged once per try, not once per round."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        self.bundle = Bundle(base / "vms" / "vm1", Manifest(name="vm1", backend="libvirt"))
        self.bundle.path.mkdir(parents=True)
        self.bundle.save()
        record = DomainRecord(
            "vm1",
            "7b1c6e2a-3f1d-4d5e-9a6b-0c1d2e3f4a5b",
            "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
            f"qemu+unix:///system?socket={base / 'libvirt-sock'}",
        )
        (self.bundle.path / DOMAIN_FILE).write_bytes(record.to_json())
        path = base / "journal.sqlite"
        made = subprocess.run(
            [sys.executable, "-c", _JOURNAL, str(path), str(self.bundle.path)],
            capture_output=True,
            text=True,
            check=True,
        )
        self.local_id = made.stdout.strip()
        self.journal = Journal(path)
        self.addCleanup(self.journal.close)
        self.failures: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if "removing its copy here failed" in event.get("log_format", ""):
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def settle(self, backoff: Backoff) -> list[str]:
        did, _ = await settle_departures(self.journal, None, backoff=backoff)
        return did

    async def test_retried_only_when_due(self) -> None:
        now = [0.0]
        backoff = Backoff(clock=lambda: now[0])
        said = await self.settle(backoff)
        self.assertEqual(len(self.failures), 1)
        self.assertTrue(any(f"tried again in {RELEASE_FIRST_RETRY:g} s" in s for s in said), said)
        # Rounds before it is due: not tried, nothing logged or said.
        for _ in range(3):
            now[0] += RELEASE_FIRST_RETRY / 4
            self.assertEqual(await self.settle(backoff), [])
        self.assertEqual(len(self.failures), 1)
        now[0] += RELEASE_FIRST_RETRY
        said = await self.settle(backoff)
        self.assertEqual(len(self.failures), 2)
        self.assertTrue(any("tried again in 2 s" in s for s in said), said)
        # Still committed and not released: the copy is removed once libvirt answers.
        record = self.journal.get(self.local_id)
        assert record is not None
        self.assertTrue(record.reached(Phase.COMMITTED))
        self.assertFalse(record.reached(Phase.RELEASED))
        self.assertTrue(self.bundle.path.exists())


class DaemonOwnedTests(TestCase):
    """A departure journaled by this very process -- the daemon, driving a
    ``migrate --daemon`` -- committed and done but whose copy here could
    not be removed: once its session is over the daemon's own settling
    round tries the release again (backing off), not only after a restart;
    while its session is under way it is left alone."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        self.bundle = Bundle(base / "vms" / "vm1", Manifest(name="vm1", backend="libvirt"))
        self.bundle.path.mkdir(parents=True)
        self.bundle.save()
        record = DomainRecord(
            "vm1",
            "7b1c6e2a-3f1d-4d5e-9a6b-0c1d2e3f4a5b",
            "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
            f"qemu+unix:///system?socket={base / 'libvirt-sock'}",
        )
        (self.bundle.path / DOMAIN_FILE).write_bytes(record.to_json())
        self.journal = Journal(base / "journal.sqlite")
        self.addCleanup(self.journal.close)
        # Journaled in this process, as the daemon's migrate --daemon does.
        self.local_id = self.journal.begin(
            role="source",
            vm="vm1",
            peer="127.0.0.1:1",
            variant="shared-storage",
            protocol="secure",
            bundle=str(self.bundle.path),
        )
        self.journal.phase(self.local_id, "committed")
        self.journal.finish(self.local_id, "done")
        self.journal.set_peer_settled(self.local_id)

    async def test_released_once_not_driven(self) -> None:
        now = [0.0]
        backoff = Backoff(clock=lambda: now[0])
        driving(self.local_id)
        self.addCleanup(driven, self.local_id)
        # Its session still runs here: not recovery's.
        did, _ = await settle_departures(self.journal, None, backoff=backoff)
        self.assertEqual(did, [])
        self.assertFalse(backoff.due_at)
        driven(self.local_id)
        did, _ = await settle_departures(self.journal, None, backoff=backoff)
        self.assertTrue(any(f"tried again in {RELEASE_FIRST_RETRY:g} s" in s for s in did), did)
        # The daemon's backoff applies: not tried again before it is due.
        now[0] += RELEASE_FIRST_RETRY / 2
        did, _ = await settle_departures(self.journal, None, backoff=backoff)
        self.assertEqual(did, [])
        record = self.journal.get(self.local_id)
        assert record is not None
        self.assertTrue(record.reached(Phase.COMMITTED))
        self.assertFalse(record.reached(Phase.RELEASED))
        self.assertTrue(self.bundle.path.exists())
