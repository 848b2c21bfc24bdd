"""The daemon's logs as an operator collects them (issue 24): one flat
JSON object per line, journald priorities, the migration id on every line
of a migration, no Python reprs, a start-up line that says how it runs."""

from __future__ import annotations

import json
import re

from securemig.lab import processes
from tests.support.bundles import bundle_digests
from tests.support.secure import SecureBase

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}


class LogTests(SecureBase):
    def secure_migration(self, *daemon: str) -> tuple[processes.Destination, dict[str, object]]:
        destination = self.start_destination("--tofu", *daemon)
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        self.assertTrue(before)
        destination.stop()
        return destination, json.loads(result.stdout)

    def test_json_lines_of_a_migration(self) -> None:
        destination, summary = self.secure_migration("--log-format", "json")
        mid = summary["migration_id"]
        lines = [json.loads(line) for line in destination.log().splitlines()]
        self.assertGreater(len(lines), 5)
        for line in lines:
            # Flat: no nested objects, no Twisted internals.
            self.assertFalse(any(isinstance(v, dict | list) for v in line.values()), line)
            self.assertRegex(line["time"], ISO_UTC)
            self.assertIn(line["level"], LEVELS)
            self.assertTrue(line["logger"])
            self.assertTrue(line["message"])
            self.assertNotIn("unpersistable", json.dumps(line))
            self.assertNotIn("IPv4Address(", line["message"])
            self.assertNotIn(" object at 0x", line["message"])
        start = [x for x in lines if "starting: backend" in x["message"]]
        self.assertEqual(len(start), 1, lines)
        for said in (
            "backend image",
            "TRUST ON FIRST USE",
            "listening: secure tcp:0",
            "descriptors",
        ):
            self.assertIn(said, start[0]["message"])
        of_it = [x for x in lines if x.get("migration_id") == mid]
        messages = " | ".join(x["message"] for x in of_it)
        for said in ("admitted VM vm1", "source-a attested", "ended: done"):
            self.assertIn(said, messages)
        # Every line that names this VM's arrival carries its id.  By the
        # word: a temporary directory's random name may hold "vm1" too.
        for line in lines:
            if re.search(r"\bvm1\b", line["message"]) or "source-a attested" in line["message"]:
                self.assertEqual(line.get("migration_id"), mid, line)
                self.assertEqual(line.get("vm"), "vm1", line)
        ended = next(x for x in of_it if "ended: done" in x["message"])
        self.assertEqual(ended["outcome"], "done")
        self.assertIn("source-a", ended["peer"])
        self.assertEqual(ended["role"], "destination")
        # The TOFU recording (logged by the attestor, which knows no
        # migration) is a warning a collector can select, with the migration.
        [tofu] = [x for x in lines if x["message"].startswith("trust on first use")]
        self.assertEqual((tofu["level"], tofu.get("migration_id")), ("warning", mid), tofu)

    def test_text_names_the_migration_and_no_reprs(self) -> None:
        destination, summary = self.secure_migration()
        log = destination.log()
        self.assertNotIn("IPv4Address(", log)
        self.assertNotIn(" object at 0x", log)
        mid = str(summary["migration_id"])
        for line in log.splitlines():
            if "source-a attested" in line or "data channel" in line or "ended: done" in line:
                self.assertIn(mid, line)
        self.assertRegex(log, r"data channel from 127\.0\.0\.1:\d+ authenticated")

    def test_journal_priorities(self) -> None:
        destination, _ = self.secure_migration("--log-format", "journal")
        lines = destination.log().splitlines()
        # Every line, a multi-line message's too, carries its priority.
        self.assertTrue(all(re.match(r"<[2-7]>", line) for line in lines), lines[:5])
        self.assertTrue(any(line.startswith("<6>") for line in lines))
        # No privacy CA URL in the identity: a warning, priority 4.
        warned = [line for line in lines if "NOT checked for revocation" in line]
        self.assertTrue(warned and all(line.startswith("<4>") for line in warned), lines)
