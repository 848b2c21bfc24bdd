"""
``securemig demo --backend libvirt`` (:mod:`securemig.lab.demo_libvirt`) as
an operator runs it: two real libvirtds, the adopted Linux guest with its
encrypted vTPM migrated there and back, then refused by a destination whose
PCR 7 was extended; every process it started ended.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from securemig.lab import processes

#: What the demo checks, each of which must hold.
CHECKS = {
    "secret_unreadable_after_adoption",
    "runs_at_destination_same_memory_and_pcr16",
    "defined_at_destination_only",
    "secret_never_readable",
    "back_at_source",
    "refused_no_secret_at_destination_domain_runs_at_source",
}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class LibvirtDemoTests(SynchronousTestCase):
    """The demo's path, end to end, as a process."""

    def test_demo_runs_and_every_check_holds(self) -> None:
        """Exit 0 and every check true (the migration there and back, the
        secret unreadable on both hosts, the refusal with no secret at the
        destination and the domain running on at the source); the refusal
        names the PCR; three migrations reported, the last refused; no
        libvirtd the demo started is left running."""
        done = processes.securemig("demo", "--backend", "libvirt", "--json")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        result = json.loads(done.stdout)
        self.assertEqual(result["checks"], dict.fromkeys(CHECKS, True), done.stderr[-3000:])
        self.assertEqual([m["outcome"] for m in result["migrations"]], ["done", "done"])
        self.assertIn("refused: ", done.stderr)
        self.assertIn("PCRs sha256:7 of dest-b differ", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        pids = result["libvirtd_pids"]
        self.assertEqual(sorted(pids), ["dest-b", "source-a"])
        self.assertEqual([pid for pid in pids.values() if _alive(pid)], [])

    def test_live_demo(self) -> None:
        """``--live``: the same checks hold with the live migration there
        and back, and the same refusal."""
        done = processes.securemig("demo", "--backend", "libvirt", "--live", "--json")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        result = json.loads(done.stdout)
        self.assertEqual(result["checks"], dict.fromkeys(CHECKS, True), done.stderr[-3000:])
        self.assertEqual([m["mode"] for m in result["migrations"]], ["live", "live"])
        self.assertIn("PCRs sha256:7 of dest-b differ", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
