"""Operator mistakes, against the real ``securemig`` (and ``twistd
securemig``) processes: each row of :data:`ROWS` is one mistake and asserts
its exit status, a piece of its message, that stderr holds no traceback,
and, where a VM is involved, that the VM is intact (same digests) and
unlocked.  Every row is its own test (``test_<row name>``)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import TestCase

from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle, create_image_vm
from securemig.hypervisor.qemu import QemuBackend, qemu_binary
from securemig.lab import processes
from securemig.trust.pca.core import PrivacyCA
from securemig.trust.pki import Authority
from tests.support.bundles import bundle_digests
from tests.support.qemu import under_tcg
from tests.support.secure import SecureBase, staging_left


class Scene:
    """What a row's command line is made from, in a test's temporary
    directory: a VM directory with VM ``vm1`` (1 MiB of RAM image), files
    that are wrong in the ways operators get them wrong, and a port where
    nothing listens."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.vms = base / "vms"
        self.bundle = create_image_vm(self.vms, "vm1", 1)
        self.digests = bundle_digests(self.bundle)
        self.missing = base / "missing"
        self.a_file = base / "a-file"
        self.a_file.write_text("not a directory\n")
        self.garbage = base / "garbage.sqlite"
        self.garbage.write_bytes(b"this is not a database\n" * 100)
        self.garbage_state = base / "garbage-state"
        self.garbage_state.mkdir()
        (self.garbage_state / "journal.sqlite").write_bytes(self.garbage.read_bytes())
        self.down_tpm = self.identity(
            "down-tpm", name="host-a", tpm=f"swtpm:host=127.0.0.1,port={free_port()}"
        )
        self.nameless = self.identity("nameless", tpm="device:/dev/tpmrm0")
        self.hostname = base / "hostname"
        self.hostname.write_text("host-a\n")
        ca = Authority.create("site")
        leaf = ca.issue(Authority.create("other").key.public_key(), "host-a")
        self.leaf = base / "leaf.pem"
        self.leaf.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.closed = f"127.0.0.1:{free_port()}"

    def identity(self, directory_name: str, **host: str) -> Path:
        """An identity directory whose host.json holds ``host``."""
        directory = self.base / directory_name
        directory.mkdir()
        (directory / "host.json").write_text(json.dumps(host))
        (directory / "pca.pem").write_bytes(Authority.create("pca").cert.public_bytes(PEM))
        return directory

    def migrate(self, *extra: str, name: str = "vm1", to: str | None = None) -> list[str]:
        """``securemig migrate`` of ``vm1`` from the VM directory."""
        return ["migrate", name, "--vm-dir", str(self.vms), "--to", to or self.closed, *extra]

    def config(self, text: str) -> str:
        """A configuration file holding ``text``; its path."""
        path = self.base / "securemig.toml"
        path.write_text(text)
        return str(path)

    def hold_port(self) -> None:
        """Something else listens on a port (and the next): ``self.held``."""
        self.listeners = []
        while len(self.listeners) < 2:
            for listener in self.listeners:
                listener.close()
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            first.listen()
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", first.getsockname()[1] + 1))
            except OSError:
                first.close()
                second.close()
                continue
            second.listen()
            self.listeners = [first, second]
        self.held = int(self.listeners[0].getsockname()[1])

    def pca_and_site_ca(self) -> None:
        """A privacy CA (``pca``, host-a not enrolled) and a site CA (``site``)."""
        vendor = self.base / "vendor.pem"
        vendor.write_bytes(Authority.create("vendor").cert.public_bytes(PEM))
        PrivacyCA.init(self.base / "pca", [vendor])
        Authority.create("site").save(self.base / "site")

    def departure(self, *phases: str, outcome: str) -> None:
        """A source record of vm1 in the VM directory's journal."""
        journal = Journal(self.vms / ".securemig" / "journal.sqlite")
        mid = journal.begin(
            role="source",
            vm="vm1",
            peer="127.0.0.1:9",
            variant="full",
            protocol="secure",
            peer_name="dest-b",
        )
        journal.set_migration_id(mid, "ab" * 16)
        for phase in phases:
            journal.phase(mid, phase)
        journal.finish(mid, outcome)
        journal.close()

    def in_doubt(self) -> None:
        """vm1's migration reached PREPARED and its outcome is in doubt."""
        self.departure("connected", "admitted", "streaming", "prepared", outcome="in-doubt")

    def given_away(self) -> None:
        """vm1 was committed to dest-b; its bundle's removal did not finish."""
        self.departure(
            "connected", "admitted", "streaming", "prepared", "committed", outcome="done"
        )

    def lock_vm(self) -> None:
        """A migration holds vm1's lock."""
        self.lock = storage.Lock(self.bundle.lock_path)

    def bad_manifest(self) -> None:
        """A second bundle whose manifest is valid JSON of the wrong shape."""
        create_image_vm(self.vms, "vm2", 1)
        (self.vms / "vm2" / "manifest.json").write_text('["not", "a", "manifest"]\n')


PEM = serialization.Encoding.PEM


def free_port() -> int:
    """A loopback TCP port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def policy_record(s: Scene) -> list[str]:
    """``policy record`` of a peer's own policy, all but ``--pcrs``."""
    return [
        "policy",
        "record",
        "--policy-dir",
        str(s.base / "policy"),
        "--host",
        "host-a",
        "--tpm",
        "device:/dev/tpmrm0",
    ]


@dataclass
class Row:
    """One operator mistake and what it must give."""

    name: str
    argv: Callable[[Scene], list[str]]
    status: int
    message: str
    #: Whether the row involves vm1: it must then be intact and unlocked.
    vm: bool = False
    #: Runs before the command, to make the mistake.
    prepare: Callable[[Scene], None] = field(default=lambda s: None)
    #: Checked after the command (what must not have been made, say).
    then: Callable[[Scene, subprocess.CompletedProcess[str]], bool] = field(
        default=lambda s, r: True
    )
    #: The command run: securemig, or twistd (its usage errors exit 1).
    program: str = "securemig"


ROWS = [
    # -- migrate: usage errors (2), and failures that leave the VM here (1)
    Row(
        "migrate_no_variant",
        lambda s: s.migrate(),
        2,
        "choose the variant: --identity DIR for the secure one, or --insecure",
        vm=True,
    ),
    Row(
        "migrate_bad_chunk",
        lambda s: s.migrate("--insecure", "--chunk-kib", "0"),
        2,
        "--chunk-kib must be between 4 and 4096",
        vm=True,
    ),
    Row(
        "migrate_no_port",
        lambda s: s.migrate("--insecure", to="127.0.0.1"),
        2,
        "destination '127.0.0.1' is not HOST:PORT",
        vm=True,
    ),
    Row("migrate_bad_vm_name", lambda s: s.migrate("--insecure", name="../vm1"), 2, "bad VM name"),
    Row(
        "migrate_missing_option",
        lambda s: ["migrate", "vm1", "--to", s.closed, "--insecure"],
        2,
        "the following arguments are required: --vm-dir",
        vm=True,
    ),
    Row("migrate_unknown_vm", lambda s: s.migrate("--insecure", name="vm9"), 1, "no VM bundle at"),
    Row(
        "migrate_missing_vm_dir",
        lambda s: ["migrate", "vm1", "--vm-dir", str(s.missing), "--to", s.closed, "--insecure"],
        1,
        "no directory",
        # Nothing made where the mistyped directory would be.
        then=lambda s, r: not s.missing.exists(),
    ),
    Row(
        "vm_status_missing_dir",
        lambda s: ["vm", "status", "vm1", "--dir", str(s.missing)],
        1,
        "no directory",
        then=lambda s, r: not s.missing.exists(),
    ),
    Row(
        "vm_list_missing_dir",
        lambda s: ["vm", "list", "--dir", str(s.missing)],
        1,
        "no directory",
    ),
    Row(
        "migrate_state_dir_not_writable",
        lambda s: s.migrate("--insecure", "--state-dir", str(s.a_file / "state")),
        1,
        "cannot keep this host's journal in",
        vm=True,
    ),
    Row(
        "migrate_garbage_journal",
        lambda s: s.migrate("--insecure", "--state-dir", str(s.garbage_state)),
        1,
        "journal.sqlite is not a securemig journal",
        vm=True,
    ),
    Row(
        "migrate_missing_identity",
        lambda s: s.migrate("--identity", str(s.missing)),
        1,
        "is not a host identity directory: it does not exist",
        vm=True,
    ),
    Row(
        "migrate_nobody_listens",
        lambda s: s.migrate("--insecure", "--no-progress"),
        1,
        "cannot connect to 127.0.0.1:",
        vm=True,
        # One sentence: no full stop before what follows the reason.
        then=lambda s, r: ".;" not in r.stderr and "still here, unlocked" in r.stderr,
    ),
    Row(
        "host_init_site_ca_missing",
        lambda s: [
            "host",
            "init",
            "--dir",
            str(s.base / "new-identity"),
            "--name",
            "host-a",
            "--tpm",
            "device:/dev/tpmrm0",
            "--site-ca",
            str(s.missing),
            "--pca",
            "https://localhost:1",
            "--pca-ca",
            str(s.a_file),
        ],
        1,
        "not a site CA directory (no ca.key there",
        then=lambda s, r: not (s.base / "new-identity").exists(),
    ),
    # -- vm
    Row(
        "vm_create_tpm_down",
        lambda s: (
            [
                "vm",
                "create",
                "vm3",
                "--dir",
                str(s.vms),
                "--ram-mib",
                "1",
                "--identity",
                str(s.down_tpm),
            ]
        ),
        1,
        "must be running (nothing was created)",
        then=lambda s, r: not (s.vms / "vm3").exists(),
    ),
    Row(
        "vm_create_host_json_without_name",
        lambda s: (
            [
                "vm",
                "create",
                "vm3",
                "--dir",
                str(s.vms),
                "--ram-mib",
                "1",
                "--identity",
                str(s.nameless),
            ]
        ),
        1,
        "host.json does not name the host ('name')",
        then=lambda s, r: not (s.vms / "vm3").exists(),
    ),
    Row(
        "vm_create_missing_identity",
        lambda s: (
            [
                "vm",
                "create",
                "vm3",
                "--dir",
                str(s.vms),
                "--ram-mib",
                "1",
                "--identity",
                str(s.missing),
            ]
        ),
        1,
        "is not a host identity directory",
        then=lambda s, r: not (s.vms / "vm3").exists(),
    ),
    Row(
        "vm_create_bad_name",
        lambda s: ["vm", "create", "a/b", "--dir", str(s.vms), "--ram-mib", "1"],
        2,
        "bad VM name 'a/b'",
    ),
    Row(
        "vm_list_wrong_shape_manifest",
        lambda s: ["vm", "list", "--dir", str(s.vms)],
        0,
        "skipping",
        vm=True,
        prepare=Scene.bad_manifest,
        then=lambda s, r: r.stdout.startswith("vm1 ") and "vm2" not in r.stdout,
    ),
    # -- journals
    Row(
        "status_garbage_journal",
        lambda s: ["status", "--state-dir", str(s.garbage_state)],
        1,
        "is not a securemig journal (file is not a database)",
    ),
    Row(
        "recover_garbage_source_journal",
        lambda s: (
            ["recover", "--state-dir", str(s.base / "dst"), "--source-journal", str(s.garbage)]
        ),
        1,
        "garbage.sqlite is not a securemig journal",
    ),
    Row(
        "journal_export_over_a_file",
        lambda s: ["journal", "export", str(s.a_file), "--vm-dir", str(s.vms)],
        1,
        "no journal at",
    ),
    # -- bench, policy: malformed lists are usage errors
    Row("bench_sizes_not_numbers", lambda s: ["bench", "--sizes", "abc"], 2, "--sizes takes"),
    Row("bench_unknown_variant", lambda s: ["bench", "--variants", "half"], 2, "--variants takes"),
    Row(
        "bench_concurrency_zero",
        lambda s: ["bench", "--concurrency", "0"],
        2,
        "--concurrency takes 1 to",
    ),
    Row(
        "bench_repeat_zero",
        lambda s: ["bench", "--repeat", "0"],
        2,
        "--repeat must be a positive number",
    ),
    Row(
        "bench_live_series_of_another_bench",
        lambda s: ["bench", "--live", "--protocols", "secure-live,secure-daemon"],
        2,
        "unknown series secure-daemon: --protocols takes secure-live, secure-live-daemon, "
        "qemu-tls, qemu-plain here",
    ),
    Row(
        "bench_libvirt_no_series",
        lambda s: ["bench", "--libvirt", "--protocols", ","],
        2,
        "--protocols takes secure-libvirt, secure-libvirt-daemon, libvirt-tls, libvirt-plain",
    ),
    Row(
        "bench_protocols_with_tpm",
        lambda s: ["bench", "--tpm", "--protocols", "secure"],
        2,
        "--protocols goes with the migration benches, not --tpm or --qemu",
    ),
    Row(
        "bench_json_under_a_file",
        lambda s: ["bench", "--libvirt", "--json", str(s.a_file / "out.json")],
        2,
        "--json: cannot make directory",
    ),
    Row(
        "policy_pcrs_not_numbers",
        lambda s: [*policy_record(s), "--pcrs", "a"],
        2,
        "--pcrs takes a selection like sha256:0-5,7",
    ),
    Row(
        "policy_pcrs_unknown_bank",
        lambda s: [*policy_record(s), "--pcrs", "md5:0,7"],
        2,
        "unknown PCR bank 'md5'",
    ),
    Row(
        "policy_pcr_over_23",
        lambda s: [*policy_record(s), "--pcrs", "sha256:0,24"],
        2,
        "must name PCRs 0..23",
    ),
    Row(
        "policy_class_applies_to_nothing",
        lambda s: [
            "policy",
            "record",
            "--policy-dir",
            str(s.base / "policy"),
            "--class",
            "compute",
            "--tpm",
            "device:/dev/tpmrm0",
        ],
        2,
        "a class policy needs --hosts patterns or --labels",
    ),
    Row(
        "policy_import_not_a_policy",
        lambda s: ["policy", "import", "--policy-dir", str(s.base / "policy"), str(s.a_file)],
        1,
        "is not a policy file",
    ),
    Row(
        "policy_without_a_directory",
        lambda s: ["policy", "show"],
        2,
        "give --policy-dir, or --identity",
    ),
    # -- identities and CAs
    Row(
        "pca_init_vendor_ca_not_a_certificate",
        lambda s: ["pca", "init", str(s.base / "pca"), "--vendor-ca", str(s.hostname)],
        1,
        "holds no PEM certificate",
        then=lambda s, r: not (s.base / "pca").exists(),
    ),
    Row(
        "pca_init_vendor_ca_not_a_ca",
        lambda s: ["pca", "init", str(s.base / "pca"), "--vendor-ca", str(s.leaf)],
        1,
        "is not a CA certificate",
        then=lambda s, r: not (s.base / "pca").exists(),
    ),
    Row(
        "ca_issue_bad_host_name",
        lambda s: ["ca", "issue", str(s.base), "--name", "not a name", "--out", str(s.base)],
        2,
        "'not a name' is not a DNS host name",
    ),
    # -- issue 24: misuse cases that ended wrong
    Row(
        "tpm_simulate_on_a_port_in_use",
        lambda s: ["tpm", "simulate", str(s.base / "tpm"), "--port", str(s.held)],
        1,
        "swtpm did not start on 127.0.0.1 ports",
        prepare=Scene.hold_port,
        # The other listener is not taken for the swtpm: no TCTI, no DIR/port.
        then=lambda s, r: "TCTI" not in r.stdout and not (s.base / "tpm" / "port").exists(),
    ),
    Row(
        "abort_negative_timeout",
        lambda s: ["abort", "abcd", "--vm-dir", str(s.vms), "--timeout", "-1"],
        2,
        "--timeout: must be 0 or more seconds, not -1",
    ),
    Row(
        "pca_revoke_in_a_site_ca",
        lambda s: ["pca", "revoke", "host-a", "--dir", str(s.base / "site")],
        1,
        "is not a privacy CA (it holds a CA, but no pca.sqlite: a site CA?)",
        prepare=Scene.pca_and_site_ca,
        then=lambda s, r: not (s.base / "site" / "pca.sqlite").exists(),
    ),
    Row(
        "pca_revoke_empty_ak",
        lambda s: ["pca", "revoke", "host-a", "--dir", str(s.base / "pca"), "--ak", ""],
        2,
        "--ak '' is not an AK name",
        prepare=Scene.pca_and_site_ca,
        then=lambda s, r: "not enrolled" not in r.stderr,
    ),
    Row(
        "pca_revoke_host_not_enrolled",
        lambda s: ["pca", "revoke", "host-a", "--dir", str(s.base / "pca"), "--ak", "abcd"],
        1,
        "host host-a is not enrolled",
        prepare=Scene.pca_and_site_ca,
    ),
    # -- vm stop / vm delete refuse what could lose a VM
    Row(
        "vm_delete_in_doubt",
        lambda s: ["vm", "delete", "vm1", "--dir", str(s.vms)],
        1,
        "VM vm1 is in doubt in migration abababab",
        vm=True,
        prepare=Scene.in_doubt,
    ),
    Row(
        "vm_stop_in_doubt",
        lambda s: ["vm", "stop", "vm1", "--dir", str(s.vms)],
        1,
        "settle it first",
        vm=True,
        prepare=Scene.in_doubt,
    ),
    Row(
        "vm_delete_given_away",
        lambda s: ["vm", "delete", "vm1", "--dir", str(s.vms)],
        1,
        "VM vm1 was migrated to dest-b",
        prepare=Scene.given_away,
        then=lambda s, r: s.bundle.path.exists(),
    ),
    Row(
        "vm_delete_locked",
        lambda s: ["vm", "delete", "vm1", "--dir", str(s.vms)],
        1,
        "VM vm1 is locked by a migration under way",
        prepare=Scene.lock_vm,
        then=lambda s, r: bundle_digests(s.bundle) == s.digests,
    ),
    Row(
        "vm_stop_not_running",
        lambda s: ["vm", "stop", "vm1", "--dir", str(s.vms)],
        1,
        "VM vm1 is not running (suspended)",
        vm=True,
    ),
    Row(
        "vm_delete",
        lambda s: ["vm", "delete", "vm1", "--dir", str(s.vms)],
        0,
        "deleted VM vm1",
        then=lambda s, r: not s.bundle.path.exists(),
    ),
    # -- twistd securemig
    Row(
        "twistd_listen_without_tcp",
        lambda s: (
            [
                "-n",
                "--pidfile=",
                "securemig",
                "--state-dir",
                str(s.base / "dst"),
                "--insecure-listen",
                "9000",
            ]
        ),
        1,
        "--insecure-listen '9000' is not an endpoint",
        program="twistd",
    ),
    # -- the configuration file: a mistake in it is a usage error
    Row(
        "config_unknown_key",
        lambda s: ["--config", s.config("[migrate]\nbandwith = 5\n"), *s.migrate("--insecure")],
        2,
        "securemig.toml: unknown key 'bandwith' in [migrate]; known: destination,",
        vm=True,
    ),
    Row(
        "config_unknown_section",
        lambda s: ["--config", s.config("[migration]\ntofu = true\n"), "status"],
        2,
        "securemig.toml: unknown section [migration]; sections are [paths], [migrate], [service]",
    ),
    Row(
        "config_wrong_type",
        lambda s: [
            "--config",
            s.config('[migrate]\nbandwidth = "fast"\n'),
            *s.migrate("--insecure"),
        ],
        2,
        "securemig.toml: [migrate] bandwidth must be a number, not 'fast'",
        vm=True,
    ),
    Row(
        "config_not_toml",
        lambda s: ["--config", s.config("[paths\n"), "jobs"],
        2,
        "securemig.toml is not TOML: Expected ']'",
    ),
    Row(
        "config_missing",
        lambda s: ["--config", str(s.missing), "jobs"],
        2,
        "no configuration file",
    ),
    Row(
        "twistd_config_wrong_type",
        lambda s: [
            "-n",
            "--pidfile=",
            "securemig",
            "--config",
            s.config('[service]\nallow-source = "source-a"\n'),
            "--state-dir",
            str(s.base / "dst"),
        ],
        1,
        "[service] allow-source must be a list of strings, not 'source-a'",
        program="twistd",
    ),
]


#: How many rows run at once (each is a Python process starting up).
PARALLEL = 4

_results: dict[str, tuple[Scene, subprocess.CompletedProcess[str]]] = {}


def results() -> dict[str, tuple[Scene, subprocess.CompletedProcess[str]]]:
    """Every row's scene and what its command gave, run :data:`PARALLEL` at
    a time the first time a row's test asks (each row has its own scene, in
    a directory of trial's working directory), so the table takes seconds."""
    if not _results:
        base = Path(tempfile.mkdtemp(prefix="misuse-", dir=Path.cwd()))
        pending = list(ROWS)
        running: list[tuple[Row, Scene, subprocess.Popen[str]]] = []
        while pending or running:
            while pending and len(running) < PARALLEL:
                row = pending.pop(0)
                scene = Scene(base / row.name)
                row.prepare(scene)
                process = subprocess.Popen(
                    [processes.script(row.program), *row.argv(scene)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                running.append((row, scene, process))
            row, scene, process = running.pop(0)
            out, err = process.communicate(timeout=60)
            _results[row.name] = (
                scene,
                subprocess.CompletedProcess(process.args, process.returncode, out, err),
            )
    return _results


class MisuseTests(TestCase):
    """One test per row of :data:`ROWS`, and Ctrl-C during a migration."""

    def check(self, row: Row) -> None:
        """Check what ``row``'s command gave."""
        scene, result = results()[row.name]
        said = result.stdout + result.stderr
        self.assertNotIn("Traceback", said)
        self.assertNotIn("internal error", said)
        self.assertIn(row.message, said)
        self.assertEqual(result.returncode, row.status, said)
        self.assertTrue(row.then(scene, result), said)
        if row.vm:
            self.assertVMIntact(scene)

    def assertVMIntact(self, scene: Scene) -> None:
        """vm1 is still here, with the same images, and unlocked."""
        bundle = Bundle.find(scene.vms, "vm1")
        self.assertEqual(bundle_digests(bundle), scene.digests)
        self.assertFalse(storage.is_locked(bundle.lock_path))

    def test_debug_shows_the_traceback(self) -> None:
        """``--debug`` is how to see the traceback of an error."""
        result = processes.securemig("--debug", "bench", "--sizes", "abc")
        self.assertEqual(result.returncode, 2)
        self.assertIn("Traceback", result.stderr)
        self.assertIn("UsageError", result.stderr)

    def test_interrupted_migration(self) -> None:
        """Ctrl-C while the images stream: the migration is cancelled (the
        destination is told), the VM stays here intact and unlocked, and the
        journal says so; no traceback."""
        scene = Scene(Path(self.mktemp()).absolute())
        destination = processes.start_destination(scene.base / "dst")
        self.addCleanup(destination.stop)
        big = create_image_vm(scene.vms, "big", 64)
        digests = bundle_digests(big)
        argv = scene.migrate(
            "--insecure", "--no-progress", "--chunk-kib", "4", name="big", to=destination.address
        )
        migrate = subprocess.Popen(
            [processes.script("securemig"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: migrate.poll() is None and migrate.kill())
        journal_path = scene.vms / ".securemig" / "journal.sqlite"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if journal_path.exists():
                records = Journal(journal_path).records(1)
                if records and records[0].phase == "streaming":
                    break
            time.sleep(0.02)
        else:
            self.fail("the migration never started streaming")
        migrate.send_signal(signal.SIGINT)
        _, err = migrate.communicate(timeout=30)
        self.assertNotIn("Traceback", err)
        self.assertIn("interrupted: cancelling the migration", err)
        self.assertIn("CANCELLED: interrupted by the operator (Ctrl-C)", err)
        self.assertIn("the VM is still at the source, unlocked", err)
        self.assertEqual(migrate.returncode, 1)
        bundle = Bundle.find(scene.vms, "big")
        self.assertEqual(bundle_digests(bundle), digests)
        self.assertFalse(storage.is_locked(bundle.lock_path))
        record = Journal(journal_path).records(1)[0]
        self.assertEqual(record.outcome, "aborted")


def _row_test(row: Row) -> Callable[[MisuseTests], None]:
    def test(self: MisuseTests) -> None:
        self.check(row)

    test.__doc__ = f"Misuse: {row.name.replace('_', ' ')} -> exit {row.status}."
    return test


for _row in ROWS:
    setattr(MisuseTests, f"test_{_row.name}", _row_test(_row))


class BackendMismatchTests(SecureBase):
    """A VM offered to a destination whose backend cannot run it (issue 21):
    refused at admission with BACKEND_MISMATCH and a sentence naming both
    backends, before PREPARED (before attestation: HELLO is answered first);
    the VM runs on at the source, nothing is staged or arrives at the
    destination, ``migrate`` exits 1 saying so.  Real daemons, real QEMU."""

    timeout = 180

    def qemu_guest(self) -> Bundle:
        """A running QEMU guest (firmware only) with a vTPM at the source."""
        qemu_binary()
        bundle = self.create_vm("--backend", "qemu", "--ram-mib", "64")
        self.addCleanup(QemuBackend().end, bundle)
        started = processes.securemig(
            "vm", "start", "vm1", "--dir", str(self.vm_dir), "--identity", str(self.src_id)
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        return Bundle.load(bundle.path)

    def assertRefused(
        self, result: subprocess.CompletedProcess[str], destination: processes.Destination,
        vm: str, dest: str,
    ) -> None:  # fmt: skip
        """Exit 1 with the code and a sentence naming both backends; the
        source journal never reached PREPARED; the destination staged and
        keeps nothing, and journaled the refusal."""
        said = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, said)
        self.assertNotIn("Traceback", said)
        self.assertIn(
            f"failed: BACKEND_MISMATCH: destination: the VM's backend is {vm} and this "
            f"destination's is {dest}: it cannot run the VM",
            result.stderr,
        )
        self.assertIn("the VM is still at the source, unlocked", result.stderr)
        source = Journal(self.vm_dir / ".securemig" / "journal.sqlite")
        self.addCleanup(source.close)
        [mine] = source.records()
        self.assertEqual(mine.outcome, "aborted")
        self.assertFalse(mine.reached("prepared"))
        self.assertEqual(staging_left(destination), [])
        self.assertFalse((destination.state_dir / "vms" / "vm1").exists())
        theirs = Journal(destination.state_dir / "journal.sqlite")
        self.addCleanup(theirs.close)
        # Refused before admission: no migration record, one refusal.
        self.assertEqual(theirs.records(), [])
        [refusal] = theirs.refusals()
        self.assertEqual((refusal.vm, refusal.code), ("vm1", "BACKEND_MISMATCH"))
        self.assertNoUnhandledError(destination)

    def test_live_qemu_vm_to_an_image_destination(self) -> None:
        """``migrate --live`` of a running QEMU guest to an image daemon: the
        guest never stops (same QEMU process, QMP says running)."""
        under_tcg(self)
        destination = self.start_destination("--tofu")
        bundle = self.qemu_guest()
        pid = int((bundle.path / "qemu.pid").read_text())
        result = self.migrate(destination, "--live", "--tofu")
        self.assertRefused(result, destination, "qemu", "image")
        self.assertEqual(int((bundle.path / "qemu.pid").read_text()), pid)
        self.assertEqual(QemuBackend().query(bundle, "query-status")["status"], "running")
        self.assertTrue(bundle.vtpm_key_path.exists())

    def test_suspended_qemu_vm_to_an_image_destination(self) -> None:
        """A suspended migration of a running QEMU guest to an image daemon:
        refused; the guest runs again at the source from its saved state (QMP
        says running), its vTPM key kept."""
        under_tcg(self)
        destination = self.start_destination("--tofu")
        bundle = self.qemu_guest()
        result = self.migrate(destination, "--tofu")
        self.assertRefused(result, destination, "qemu", "image")
        self.assertEqual(QemuBackend().query(bundle, "query-status")["status"], "running")
        self.assertEqual(Bundle.load(bundle.path).manifest.state, "running")
        self.assertTrue(bundle.vtpm_key_path.exists())

    def test_image_vm_to_a_qemu_destination(self) -> None:
        """The reverse (before: committed, then RESUME_FAILED, exit 3): an
        image VM offered to a QEMU daemon is refused; its images are intact
        and unlocked at the source."""
        destination = self.start_destination("--tofu", "--backend", "qemu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertRefused(result, destination, "image", "qemu")
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertFalse(storage.is_locked(bundle.lock_path))
