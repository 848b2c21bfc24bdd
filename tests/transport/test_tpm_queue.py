"""Concurrent secure migrations share each host's TPM (swtpm: no resource
manager, three object slots): eight ``securemig migrate`` processes on the
source's swtpm and one destination daemon on its own take turns
(``trust/tpm/tpm.py``: Turns) and all of them succeed.  Without the turns,
3 to 8 of the 8 failed with "out of memory for object contexts"."""

from __future__ import annotations

import json
import threading
from typing import Any

from securemig.lab import processes
from tests.support.secure import SecureBase

#: Concurrent migrations from one source host to one destination (issue 12).
CONCURRENT = 8


class ConcurrentMigrationTests(SecureBase):
    """Many secure migrations at once between the same two hosts."""

    def test_concurrent_secure_migrations(self) -> None:
        """Eight at once, from one source host to one destination."""
        destination = self.start_destination("--tofu")
        names = [f"vm{i}" for i in range(CONCURRENT)]
        for name in names:
            created = processes.securemig(
                "vm",
                "create",
                name,
                "--dir",
                str(self.vm_dir),
                "--ram-mib",
                "2",
                "--identity",
                str(self.src_id),
            )
            self.assertEqual(created.returncode, 0, created.stderr)
        results: dict[str, Any] = {}

        def run(name: str) -> None:
            results[name] = self.migrate(destination, "--tofu", vm=name)

        threads = [threading.Thread(target=run, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {n: r.stderr[-2000:] for n, r in results.items() if r.returncode != 0}
        self.maxDiff = None
        # What failed, and the end of the destination's log.
        self.assertEqual(failed, {}, destination.log()[-3000:])
        for r in results.values():
            self.assertEqual(json.loads(r.stdout)["outcome"], "done")
