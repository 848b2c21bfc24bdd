"""
The backend contract and its registry (:mod:`securemig.hypervisor.backends`),
and a toy third backend (:mod:`tests.hypervisor.toy`, not shipped) that
needs nothing but its ``register`` call to be usable by ``vm create``, ``vm
start``, ``migrate`` (secure, between two real daemons of the lab),
``twistd securemig --backend``, the configuration file and recovery.

Other processes (the daemons, ``securemig``) import the toy through
``SECUREMIG_BACKEND_MODULES``; every check of "the toy did it" reads the
toy's own log, which names the process that did each operation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.host.journal import Journal
from securemig.hypervisor import backends
from securemig.hypervisor.backends import Capabilities, Unsupported
from securemig.hypervisor.bundle import Bundle, BundleError, Manifest
from securemig.lab import processes
from securemig.lab.lab import Lab
from securemig.protocol.errors import ErrorCode
from tests.support.commands import RESOLVE_INTERVAL, crash_env

from . import toy

#: Seconds a crashed migration may take to settle itself.
SETTLE_TIMEOUT = 30.0


class RegistryTests(SynchronousTestCase):
    """The registry is the one place backends are known by."""

    def setUp(self) -> None:
        toy.registered(self)

    def test_shipped_backends_and_their_capabilities(self) -> None:
        """The shipped kinds, what each can do, and a backend object that is
        the kind it was asked for."""
        self.assertEqual(backends.kinds()[:3], ("image", "qemu", "xen"))
        self.assertEqual(backends.kinds(lambda c: c.live), ("qemu", "libvirt"))
        # Only libvirt's live stream is several carried sockets.
        self.assertEqual(backends.kinds(lambda c: c.carried), ("libvirt",))
        self.assertIn("toy", backends.kinds(lambda c: c.creatable))
        self.assertNotIn("xen", backends.kinds(lambda c: c.creatable))
        self.assertTrue(backends.capabilities("qemu").resume_continues)
        self.assertFalse(backends.capabilities("image").runs_guest)
        for kind in backends.kinds():
            self.assertEqual(backends.backend_for(kind).name, kind)

    def test_unknown_kind_names_the_known(self) -> None:
        """A kind no module registered is an error that lists the known ones."""
        with self.assertRaises(BundleError) as cm:
            backends.capabilities("bogus")
        self.assertIn("unknown backend 'bogus'; known: image, qemu, xen", str(cm.exception))

    def test_kind_names_are_checked(self) -> None:
        """A kind is what HELLO can carry: lowercase, short, not empty."""
        for bad in ("", "Qemu", "9x", "a" * 17, "kvm-x"):
            with self.assertRaises(ValueError, msg=bad):
                backends.register(bad, lambda key: toy.ToyBackend(), Capabilities())

    def test_what_a_backend_lacks_is_refused_by_name(self) -> None:
        """The contract's defaults: an operation the capabilities do not
        offer raises, naming the backend; ``end`` and ``vtpm_attached`` are
        harmless."""
        image = backends.backend_for("image")
        bundle = Bundle(Path("nowhere"), Manifest(name="vm1"))
        with self.assertRaises(Unsupported) as cm:
            image.live_socket(bundle)
        self.assertEqual(str(cm.exception), "the image backend does not migrate live")
        with self.assertRaises(Unsupported):
            image.start(bundle)
        self.successResultOf(image.end(bundle))
        image.end_blocking(bundle)
        self.assertFalse(image.vtpm_attached(bundle))

    def test_refusal_names_both_backends(self) -> None:
        """A destination runs only VMs of its own kind, and says so; a source
        that does not name the kind (version 1) is not judged."""
        why = backends.refusal("image", "qemu", live=True)
        assert why is not None
        self.assertIn("the VM's backend is qemu and this destination's is image", why)
        self.assertIsNone(backends.refusal("qemu", "qemu", live=True, guest="linux", vtpm=True))
        self.assertIsNone(backends.refusal("image", ""))
        self.assertIn("does not know", backends.refusal("image", "hyperv") or "")
        self.assertIn("no live migration", backends.refusal("toy", "toy", live=True) or "")
        self.assertIn("linux guest", backends.refusal("toy", "toy", guest="linux") or "")


def toy_env() -> dict[str, str]:
    """The environment under which other processes know the toy."""
    return {backends.MODULES_ENV: toy.MODULE}


class ToyBase(TestCase):
    """Processes that know the toy (``SECUREMIG_BACKEND_MODULES``)."""

    timeout = 180

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.vm_dir = self.base / "src-vms"
        previous = os.environ.get(backends.MODULES_ENV)
        os.environ[backends.MODULES_ENV] = toy.MODULE
        self.addCleanup(self._restore, previous)
        toy.registered(self)

    @staticmethod
    def _restore(previous: str | None) -> None:
        if previous is None:
            os.environ.pop(backends.MODULES_ENV, None)
        else:
            os.environ[backends.MODULES_ENV] = previous

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return processes.securemig(*args)

    def create_running_toy(self) -> Bundle:
        """``vm create --backend toy`` then ``vm start``: a running toy VM."""
        for args in (
            ("create", "vm1", "--ram-mib", "4", "--disk-mib", "1", "--backend", "toy"),
            ("start", "vm1"),
        ):
            result = self.cli("vm", *args, "--dir", str(self.vm_dir))
            self.assertEqual(result.returncode, 0, result.stderr)
        return Bundle.find(self.vm_dir, "vm1")

    def daemon(self, state: Path, *extra: str, port: int = 0) -> processes.Destination:
        process = processes.start_destination(
            state,
            "--resolve-interval",
            RESOLVE_INTERVAL,
            *extra,
            listen=f"tcp:{port}:interface=127.0.0.1",
            log_file=state.parent / f"{state.name}.log",
        )
        self.addCleanup(process.stop)
        return process

    def migrate(self, to: processes.Destination, state: Path, **run: Any) -> Any:
        return processes.securemig(
            "migrate", "vm1", "--vm-dir", str(self.vm_dir), "--state-dir", str(state),
            "--to", to.address, "--insecure", "--json", "--no-progress", **run,
        )  # fmt: skip


class ToyCommandTests(ToyBase):
    def test_vm_create_start_status(self) -> None:
        """``vm create --backend toy`` makes a toy VM, ``vm start`` boots it
        with the toy (in that process), ``vm status`` asks the toy; without
        the module the choice does not exist (the registry is the source)."""
        bundle = self.create_running_toy()
        self.assertEqual(bundle.manifest.backend, "toy")
        self.assertEqual([op for op, _ in toy.operations(bundle)], ["resume"])
        status = self.cli("vm", "status", "vm1", "--dir", str(self.vm_dir))
        self.assertEqual(status.stdout.strip(), "vm1: running (toy)")
        os.environ.pop(backends.MODULES_ENV)
        refused = self.cli("vm", "create", "vm2", "--dir", str(self.vm_dir), "--ram-mib", "4",
                           "--backend", "toy")  # fmt: skip
        self.assertEqual(refused.returncode, 2)
        self.assertIn("invalid choice: 'toy'", refused.stderr)

    def test_twistd_backend_choice_and_config_file(self) -> None:
        """``twistd securemig --backend toy`` runs; the configuration file's
        ``backend = "toy"`` is accepted; unknown to a process that did not
        import the toy, both are refused, naming the registered kinds."""
        self.daemon(self.base / "a", "--backend", "toy")
        config = self.base / "securemig.toml"
        config.write_text('[service]\nbackend = "toy"\n')
        self.daemon(self.base / "b", "--config", str(config))
        shown = self.cli("--config", str(config), "config", "show", "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        os.environ.pop(backends.MODULES_ENV)
        refused = subprocess.run(
            [processes.script("twistd"), "-n", "--pidfile=", "securemig", "--state-dir",
             str(self.base / "c"), "--insecure-listen", "tcp:0:interface=127.0.0.1",
             "--backend", "toy"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        self.assertEqual(refused.returncode, 1, refused.stdout + refused.stderr)
        # The shipped kinds, in registration order (the toy is not one of them).
        shipped = ", ".join(k for k in backends.kinds() if k != "toy")
        self.assertIn(f"unknown --backend toy: {shipped}\n", refused.stdout + refused.stderr)
        shown = self.cli("--config", str(config), "config", "show")
        self.assertEqual(shown.returncode, 2)
        self.assertIn(f"backend must be one of {shipped}, not 'toy'", shown.stderr)


class ToyMigrationTests(ToyBase):
    def test_secure_migration_between_lab_daemons(self) -> None:
        """The lab's two enrolled hosts, its destination daemon running the
        toy: a toy VM with a vTPM is attested, moved and resumed there by the
        toy, in the daemon's process."""
        lab = Lab(self.base / "lab")
        self.addCleanup(lab.stop)
        lab.start()
        destination = lab.start_destination(backend="toy")
        vm = lab.create_vm("vm1", 4, 1, secure=True, backend="toy")
        self.assertEqual(vm.manifest.state, "running")
        summary, _ = lab.migrate(destination, "vm1", secure=True)
        self.assertEqual(summary["outcome"], "done")
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual((arrived.manifest.backend, arrived.manifest.state), ("toy", "running"))
        self.assertEqual(toy.operations(arrived)[-1], ("resume", destination.process.pid))
        self.assertFalse(vm.path.exists())

    def test_refused_by_an_image_destination(self) -> None:
        """A toy VM offered to a daemon of the image backend: BACKEND_MISMATCH
        at admission, naming both; the VM runs on at the source (resumed by
        the toy after its suspend), nothing arrived."""
        state = self.base / "dst"
        destination = self.daemon(state)
        bundle = self.create_running_toy()
        result = self.migrate(destination, self.base / "src-state")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("BACKEND_MISMATCH", result.stderr)
        self.assertIn("VM's backend is toy and this destination's is image", result.stderr)
        self.assertTrue(
            json.loads(result.stdout)["error"].startswith(ErrorCode.BACKEND_MISMATCH.name + ":")
        )
        bundle = Bundle.load(bundle.path)
        self.assertEqual(bundle.manifest.state, "running")
        self.assertEqual([op for op, _ in toy.operations(bundle)][-2:], ["suspend", "resume"])
        self.assertEqual(list((state / "staging").iterdir()), [])
        self.assertFalse((state / "vms" / "vm1").exists())

    def test_recovery_resumes_a_toy_vm(self) -> None:
        """``securemig migrate`` killed after PREPARED, before COMMITTED: the
        source host's daemon settles the departure and resumes the VM with
        the toy, in its own process; the destination discards its staging."""
        source_state, dst_state = self.base / "src-state", self.base / "dst"
        source_daemon = self.daemon(source_state, "--backend", "toy")
        destination = self.daemon(dst_state, "--backend", "toy")
        bundle = self.create_running_toy()
        result = self.migrate(
            destination,
            source_state,
            env={**os.environ, **crash_env("source-prepared-received")},
        )
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            journal = Journal(source_state / "journal.sqlite")
            try:
                # Aborted, and the destination confirmed (it discarded).
                settled = not journal.departures() and [
                    r.outcome for r in journal.records() if r.role == "source"
                ] == ["aborted"]
            finally:
                journal.close()
            if settled and not list((dst_state / "staging").iterdir()):
                break
            self.assertLess(time.monotonic(), deadline, source_daemon.log()[-3000:])
            time.sleep(0.2)
        bundle = Bundle.load(bundle.path)
        self.assertEqual(bundle.manifest.state, "running")
        self.assertEqual(toy.operations(bundle)[-1], ("resume", source_daemon.process.pid))
        self.assertFalse((dst_state / "vms" / "vm1").exists())
