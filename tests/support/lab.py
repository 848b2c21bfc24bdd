"""A lab (two swtpm hosts, a privacy CA, both daemons) per test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.trust.policy import PolicyStore


class LabBase(TestCase):
    """A lab per test, a destination on each host, one secure VM at source-a."""

    #: More options of both hosts' ``twistd securemig``.
    daemon_options: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).absolute()
        self.work.mkdir(parents=True)
        self.lab = Lab(self.work)
        self.addCleanup(self.lab.stop)
        self.lab.start()
        self.pca_url = f"https://localhost:{int((self.work / 'pca.port').read_text())}"
        self.at = {
            DESTINATION: self.lab.start_destination(extra=self.daemon_options),
            SOURCE: self.lab.start_destination(host=SOURCE, keep=False, extra=self.daemon_options),
        }
        self.addCleanup(lambda: self.at[SOURCE].stop())
        self.lab.create_vm("vm1", 4, 2, secure=True)
        self.vm_dir = {SOURCE: self.lab.vm_dir}

    def migrate(self, source: str, to: str) -> subprocess.CompletedProcess[str]:
        """`securemig migrate` vm1 from wherever it is at ``source`` to the
        destination daemon of ``to``, secure, with --tofu (as the lab does)."""
        result = self.try_migrate(source, to)
        destination = self.at[to]
        self.assertEqual(
            result.returncode, 0, f"{source} -> {to}: {result.stderr}{destination.log()[-3000:]}"
        )
        self.assertEqual(json.loads(result.stdout)["outcome"], "done")
        self.vm_dir[to] = destination.state_dir / "vms"
        return result

    def try_migrate(self, source: str, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """:meth:`migrate`, whatever its outcome, with ``extra`` options."""
        destination = self.at[to]
        return processes.securemig(
            "migrate",
            "vm1",
            "--vm-dir",
            str(self.vm_dir[source]),
            "--to",
            f"127.0.0.1:{destination.port}",
            "--destination-name",
            to,
            "--tofu",
            "--json",
            "--no-progress",
            "--state-dir",
            str(self.work / f"{source}-state"),
            "--identity",
            str(self.work / source),
            *extra,
        )

    def source_init_args(self) -> list[str]:
        """`securemig host init` of the source host, as the lab made it
        (its TPM, site CA and privacy CA)."""
        return [
            "host",
            "init",
            "--dir",
            str(self.work / SOURCE),
            "--name",
            SOURCE,
            "--tpm",
            json.loads((self.work / SOURCE / "host.json").read_text())["tpm"],
            "--site-ca",
            str(self.work / "site-ca"),
            "--pca",
            self.pca_url,
            "--pca-ca",
            str(self.work / "pca" / "ca.pem"),
        ]

    def round_trip(self) -> tuple[str, str]:
        """vm1 to dest-b and back; the two sources' stderr."""
        out = self.migrate(SOURCE, DESTINATION)
        back = self.migrate(DESTINATION, SOURCE)
        return out.stderr, back.stderr

    def restart_home(self) -> None:
        """Restart source-a's daemon (to serve its new TLS certificate)."""
        self.at[SOURCE].stop()
        self.at[SOURCE] = self.lab.start_destination(
            host=SOURCE, keep=False, extra=self.daemon_options
        )

    def renew(self) -> Any:
        result = processes.securemig(
            "host",
            "renew",
            "--identity",
            str(self.work / SOURCE),
            "--site-ca",
            str(self.work / "site-ca"),
            "--pca",
            self.pca_url,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def ak_names_seen(self, at: str, of: str) -> list[str]:
        golden = PolicyStore(self.work / at / "policy").get(of)
        assert golden is not None
        return sorted(name.hex() for name in golden.clocks)
