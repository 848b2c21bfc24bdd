"""The secure variant end to end: a real ``twistd securemig --listen`` with
its own swtpm host TPM, a real ``securemig migrate --identity`` with
another, mutual TLS 1.3, mutual attestation, vTPM key release."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from securemig import files
from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle, disk_owner, set_disk_owner
from securemig.lab import processes
from securemig.protocol import wire
from securemig.trust import eventlog, vtpm
from securemig.trust.attestor import Attestor, open_attestor
from securemig.trust.identity import issue_tls
from securemig.trust.pki import Authority
from securemig.trust.policy import Policy, PolicyStore
from tests.support.bundles import bundle_digests
from tests.support.commands import crash_env, migrate_vm
from tests.support.secure import SecureBase, staging_left

#: Whether dest-b's TPM was extended with test_event_log_policy's events.
_booted_b: list[bool] = []


class SecureMigrationTests(SecureBase):
    """Secure migrations and their refusals, each leaving the VM at the source."""

    def test_secure_migration(self) -> None:
        """Both attested (trust on first use), the vTPM key released to the
        destination's TPM only, the source's copy destroyed."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm("--disk-mib", "2")
        before = bundle_digests(bundle)
        secret = self.vtpm_key_at_source(bundle)
        leftover = self.base / "copied-vtpm-state"
        shutil.copytree(bundle.path / vtpm.STATE_DIR, leftover)
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        summary = json.loads(result.stdout)
        self.assertEqual((summary["outcome"], summary["protocol"]), ("done", "secure"))
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        # The key arrived re-sealed to the destination's TPM, nowhere in clear.
        sealed = arrived.vtpm_key_path.read_bytes()
        self.assertNotIn(secret, sealed)
        self.assertEqual(open_attestor(self.dst_id, None, False).unseal(sealed), secret)
        self.assertFalse(bundle.path.exists())
        # The same vTPM arrived: its (still encrypted) state opens with the
        # released key and has the same EK.
        self.assertEqual(arrived.manifest.vtpm, bundle.manifest.vtpm)
        self.assertEqual(vtpm.identity(arrived.path / vtpm.STATE_DIR, secret), bundle.manifest.vtpm)
        # The images came on the data channel (AEAD records), not through TLS.
        self.assertIn("data channel from", destination.log())
        # Each side recorded the other's golden values on first use.
        self.assertIsNotNone(PolicyStore(self.src_policy).get("dest-b"))
        self.assertIsNotNone(PolicyStore(self.dst_policy).get("source-a"))

    def test_images_inside_tls(self) -> None:
        """A destination started with --tls-data offers no data channel: the
        images travel inside the TLS connection, checked by SHA-256."""
        destination = self.start_destination("--tofu", "--tls-data")
        bundle = self.create_vm("--disk-mib", "2")
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertEqual(result.returncode, 0, result.stderr)
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertNotIn("data channel from", destination.log())

    def test_shared_storage_variant(self) -> None:
        """RAM and vTPM travel; the disk stays on shared storage."""
        destination = self.start_destination("--tofu")
        shared = self.base / "shared"
        shared.mkdir()
        bundle = self.create_vm("--shared-disk", str(shared / "vm1.disk"))
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu", "--shared-storage")
        self.assertEqual(result.returncode, 0, result.stderr)
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertEqual([i.name for i in arrived.manifest.images], ["ram", "vtpm"])
        self.assertEqual(arrived.manifest.shared_disk, str(shared / "vm1.disk"))
        # The shared disk passed from source to destination at the commit.
        self.assertEqual(disk_owner(shared / "vm1.disk"), "dest-b")

    def test_shared_disk_owned_by_another_host(self) -> None:
        """A source may not migrate a VM whose shared disk another host owns."""
        destination = self.start_destination("--tofu")
        shared = self.base / "shared"
        shared.mkdir()
        bundle = self.create_vm("--shared-disk", str(shared / "vm1.disk"))
        self.assertEqual(disk_owner(shared / "vm1.disk"), "source-a")
        set_disk_owner(shared / "vm1.disk", "host-c")
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu", "--shared-storage")
        self.assertStaysAtSource(bundle, before, result, "belongs to host-c")
        self.assertEqual(disk_owner(shared / "vm1.disk"), "host-c")

    def test_vtpm_state_flipped_byte(self) -> None:
        """A vTPM state with one byte flipped (before it is sent, so the
        stream digests match) does not open at the destination: refused,
        and the VM stays at the source."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        state = bundle.image_path("vtpm")
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        state.write_bytes(bytes(raw))
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(bundle, before, result, "KEY_TRANSFER_FAILED")
        self.assertEqual(staging_left(destination), [])

    def test_vtpm_vm_over_insecure_variant_needs_identity(self) -> None:
        """Without --identity the source cannot unseal the vTPM key to send it."""
        bundle = self.create_vm()
        result = processes.securemig(
            "migrate", "vm1", "--vm-dir", str(self.vm_dir), "--to", "127.0.0.1:9", "--insecure"
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("has a vTPM: give --identity", result.stderr)
        self.assertTrue(bundle.vtpm_key_path.exists())

    def insecure_migrate(self, port: int) -> Any:
        return migrate_vm(
            self.vm_dir,
            f"127.0.0.1:{port}",
            "--insecure",
            "--identity",
            str(self.src_id),
            "--json",
            "--no-progress",
        )

    def test_insecure_twin_carries_the_vtpm(self) -> None:
        """The insecure variant moves the same VM: the vTPM key travels in the
        clear, and the destination still checks the vTPM and re-seals the key."""
        destination = self.start_destination(
            "--tofu",
            "--insecure-listen",
            "tcp:0:interface=127.0.0.1",
            "--insecure-port-file",
            str(self.base / "insecure.port"),
        )
        port = processes.wait_for_port(self.base / "insecure.port", destination.process)
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        secret = self.vtpm_key_at_source(bundle)
        result = self.insecure_migrate(port)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["protocol"], "insecure")
        arrived = Bundle.load(destination.state_dir / "vms" / "vm1")
        self.assertEqual(bundle_digests(arrived), before)
        self.assertEqual(
            open_attestor(self.dst_id, None, False).unseal(arrived.vtpm_key_path.read_bytes()),
            secret,
        )
        self.assertEqual(arrived.manifest.vtpm, bundle.manifest.vtpm)
        self.assertFalse(bundle.path.exists())

    def test_insecure_destination_without_tpm_refuses_vtpm(self) -> None:
        """A destination with no identity has no TPM to keep a vTPM key."""
        destination = processes.start_destination(self.base / "plain-dst")
        self.addCleanup(destination.stop)
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.insecure_migrate(destination.port)
        self.assertStaysAtSource(bundle, before, result, "no TPM identity")

    def test_destination_pcr_changed(self) -> None:
        """Golden values recorded, then the destination's PCR changes: the
        source refuses it before any image byte moves."""
        PolicyStore(self.src_policy).record("dest-b", self.tpm_b.pcr_read([0, 1, 2, 3, 4, 7]))
        self.tpm_b.pcr_extend(7, b"untrusted boot component " + os.urandom(8))
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination)
        self.assertStaysAtSource(bundle, before, result, "golden-values")
        self.assertEqual(staging_left(destination), [])

    def test_source_pcr_changed(self) -> None:
        """The destination refuses a source whose PCRs left its golden values."""
        PolicyStore(self.dst_policy).record("source-a", self.tpm_a.pcr_read([0, 1, 2, 3, 4, 7]))
        destination = self.start_destination()
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        self.tpm_a.pcr_extend(4, b"rootkit " + os.urandom(8))
        # Sealed to the old state, the vTPM key no longer unseals at the source
        # either; record a fresh VM key for the new state to reach the refusal.
        files.remove_tree(bundle.path)
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(bundle, before, result, "golden-values")

    def test_wrong_destination_name(self) -> None:
        """A destination that cannot prove the expected name is refused by TLS."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu", name="dest-z")
        self.assertStaysAtSource(bundle, before, result, "dest-z")

    def test_relay_to_another_hosts_tpm(self) -> None:
        """A destination holding dest-b's TLS certificate whose evidence comes
        from another enrolled host's TPM and AK (a relay) is refused: the AK
        certificate must name the TLS peer."""
        self.dst_id = self.world / "relay"
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(bundle, before, result, "does not name host 'dest-b'")
        self.assertIn("ATTESTATION_FAILED", result.stderr)
        self.assertIsNone(PolicyStore(self.src_policy).get("dest-b"))

    def test_unknown_destination_without_tofu(self) -> None:
        """No golden values and no --tofu: refused, nothing moves."""
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination)
        self.assertStaysAtSource(bundle, before, result, "no golden values for dest-b")

    def test_policies_by_selection_and_class(self) -> None:
        """Each side judges the other by a policy `securemig policy record`
        wrote, and the quotes ask exactly for its selection: the source's
        own policy for dest-b selects PCRs 0-5,7; the destination's class
        policy for source-* selects 0,7 (before, both failed "PCRs [..]
        differ").  A change in source-a's PCR 16, outside that selection, is
        ignored; nothing is trusted on first use."""
        for args in (
            ["--policy-dir", str(self.src_policy), "--host", "dest-b", "--tpm", self.tpm_b.tcti],
            ["--policy-dir", str(self.dst_policy), "--class", "sources", "--hosts", "source-*"],
        ):
            pcrs = "0-5,7" if "--host" in args else "0,7"
            tpm = [] if "--tpm" in args else ["--tpm", self.tpm_a.tcti]
            result = processes.securemig("policy", "record", *args, *tpm, "--pcrs", pcrs)
            self.assertEqual(result.returncode, 0, result.stderr)
        self.tpm_a.pcr_extend(16, b"outside the selection " + os.urandom(8))
        destination = self.start_destination()
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination)
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        self.assertEqual(bundle_digests(Bundle.load(destination.state_dir / "vms" / "vm1")), before)
        self.assertNotIn("trust on first use", result.stderr + destination.log())
        # The destination kept source-a's counters only: the class judges it.
        golden = PolicyStore(self.dst_policy).get("source-a")
        assert golden is not None
        self.assertIsNone(golden.policy)

    def test_event_log_policy(self) -> None:
        """The source judges dest-b's PCRs 8 and 9 (GRUB's commands, the
        files it loaded) by the measured-boot event log dest-b's daemon
        sends with its quote: a policy that allows another kernel refuses
        it naming the event; one that allows this kernel and initrd accepts
        it, over the real wire and TLS."""
        ipl = eventlog.EVENT_TYPES["EV_IPL"]
        events = [
            (8, ipl, b"grub_cmd: linux /vmlinuz-6.1.0-28-amd64 root=/dev/vda1\0"),
            (9, ipl, b"/boot/vmlinuz-6.1.0-28-amd64\0"),
            (9, ipl, b"/boot/initrd.img-6.1.0-28-amd64\0"),
        ]
        sha256 = wire.HashAlg.SHA256
        log = eventlog.spec_id_event([sha256]) + b"".join(
            eventlog.event2(p, t, {sha256: hashlib.sha256(d).digest()}, d) for p, t, d in events
        )
        if not _booted_b:  # dest-b's TPM boots once per test process
            for pcr, _, data in events:
                self.tpm_b.pcr_extend(pcr, data)
            _booted_b.append(True)
        (self.dst_id / "event-log").write_bytes(log)
        self.addCleanup((self.dst_id / "event-log").unlink)
        firmware = self.tpm_b.pcr_values([wire.PcrBank.of(sha256, [0, 1, 2, 3, 4, 7])])

        def allow(*files: bytes) -> Policy:
            rule = eventlog.EventRule(9, ipl, frozenset(hashlib.sha256(f).digest() for f in files))
            return Policy(
                (wire.PcrBank.of(sha256, [0, 1, 2, 3, 4, 7, 8, 9]),),
                {k: frozenset((v,)) for k, v in firmware.items()},
                eventlog.EventLogPolicy((8, 9), (rule,)),
            )

        store = PolicyStore(self.src_policy)
        store.record("dest-b", allow(b"/boot/vmlinuz-6.2.0-other\0", events[2][2]))
        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination)
        self.assertStaysAtSource(bundle, before, result, "event 2 (PCR 9, EV_IPL) digest")
        store.record("dest-b", allow(events[1][2], events[2][2]))
        result = self.migrate(destination)
        self.assertEqual(result.returncode, 0, result.stderr + destination.log()[-3000:])
        self.assertEqual(bundle_digests(Bundle.load(destination.state_dir / "vms" / "vm1")), before)


class HostileSourceTests(SecureBase):
    """A source that holds a genuine identity but replays old evidence, and
    a destination that only admits named sources."""

    def test_source_not_allowed(self) -> None:
        destination = self.start_destination("--tofu", "--allow-source", "someone-else")
        bundle = self.create_vm()
        before = bundle_digests(bundle)
        result = self.migrate(destination, "--tofu")
        self.assertStaysAtSource(bundle, before, result, "source-a is not allowed")
        # Refused when the handshake completed, before its HELLO was read.
        self.assertIn("refused source", destination.log())
        self.assertNotIn("admitted VM", destination.log())
        self.assertNoUnhandledError(destination)

    async def test_quote_replayed_from_another_session(self) -> None:
        """Evidence that was genuine in another TLS session is refused by the
        destination, and the VM stays at the source.  The source here is the
        real one with its attestor replaced by a replaying attacker."""
        from twisted.internet import reactor

        from securemig.host.journal import Journal
        from securemig.protocol import wire
        from securemig.protocol.errors import ErrorCode
        from securemig.transport.client import migrate
        from securemig.transport.options import SecureOptions, SourceOptions
        from securemig.trust import keyrelease as secure

        destination = self.start_destination("--tofu")
        bundle = self.create_vm()
        before = bundle_digests(bundle)

        class Replayer(Attestor):
            def evidence(
                self, qualifying: bytes, request: wire.QuoteRequest = wire.DEFAULT_QUOTE_REQUEST
            ) -> wire.Evidence:
                # A quote made for another session's exporter and nonce.
                stale = secure.qualifying_data(
                    os.urandom(32), "source", os.urandom(32), os.urandom(16)
                )
                return super().evidence(stale, request)

        class ReplayOptions(SecureOptions):
            def prepare(self, bundle: Bundle, host: str) -> Any:
                real = super().prepare(bundle, host)
                a = real.attestor
                real.attestor = Replayer(a.identity, a.tpm, a.policy, a.pca, a.tofu, a.pcrs)
                return real

        options = ReplayOptions(self.src_id, self.src_policy, True, "dest-b")
        journal = Journal(self.base / "src-journal.sqlite")
        _, finished = await migrate(
            reactor,
            bundle,
            SourceOptions(destination.address, wire.Variant.FULL, secure=options),
            journal=journal,
        )
        self.assertEqual(finished.code, ErrorCode.ATTESTATION_FAILED)
        self.assertIn("qualifying-data", finished.reason)
        self.assertEqual(bundle_digests(Bundle.load(bundle.path)), before)
        self.assertTrue(bundle.vtpm_key_path.exists())
        self.assertFalse(storage.is_locked(bundle.lock_path))


class UnauthenticatedClientTests(SecureBase):
    """The real destination's TLS listener against clients without the
    right certificate: refused in the handshake, nothing admitted."""

    def handshake(self, destination: processes.Destination, identity: Path | None) -> str:
        import socket
        import ssl

        context = ssl.create_default_context(cafile=str(self.dst_id / "site-ca.pem"))
        context.check_hostname = False  # the destination's name is not what is tested
        if identity is not None:
            context.load_cert_chain(identity / "tls.pem", identity / "tls.key")
        with socket.create_connection(("127.0.0.1", destination.port), timeout=10) as raw:
            try:
                with context.wrap_socket(raw) as tls:
                    # TLS 1.3: a refused client certificate shows at the first read.
                    tls.sendall(b"\x01")
                    tls.recv(1)
            except (ssl.SSLError, ConnectionError) as e:
                return str(e)
        return "accepted"

    def test_disallowed_clients_leave_no_unhandled_error(self) -> None:
        """Site-CA certified but not allowed: refused after the handshake
        however the client behaves (it sends garbage and closes, closes at
        once, or resets), and the destination logs no Twisted "Unhandled
        Error" (the TLS layer's flush after our close once raised one)."""
        destination = self.start_destination("--tofu", "--allow-source", "someone-else")
        for _ in range(3):
            self.handshake(destination, self.src_id)
            self.reset_after_handshake(destination)
        # One allowed attempt's worth of time for the refusals to be logged.
        deadline = time.monotonic() + 10
        while destination.log().count("refused source") < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(destination.log().count("refused source"), 6, destination.log())
        time.sleep(0.5)
        self.assertNoUnhandledError(destination)
        self.assertEqual(staging_left(destination), [])

    def test_disallowed_client_sending_data_with_its_handshake(self) -> None:
        """A disallowed source whose application data comes in the same
        segment as its handshake's end (as a real source's HELLO can): the
        refusal leaves no "Unhandled Error" (the half-close under TLS once
        left Twisted's TLS layer reading a connection it had dropped:
        'NoneType' object has no attribute 'bio_read')."""
        destination = self.start_destination("--tofu", "--allow-source", "someone-else")
        for then in ("after-eof", "read", "close", "half-close", "sleep", "flood", "after-eof"):
            handshake_then_data(
                destination.port, self.dst_id / "site-ca.pem", self.src_id, b"\x00" * 16384, then
            )
        deadline = time.monotonic() + 10
        while destination.log().count("refused source") < 7 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(destination.log().count("refused source"), 7, destination.log())
        time.sleep(0.5)
        self.assertNoUnhandledError(destination)

    def reset_after_handshake(self, destination: processes.Destination) -> None:
        """Complete the handshake and close with a TCP reset (SO_LINGER 0)."""
        import socket
        import ssl
        import struct

        context = ssl.create_default_context(cafile=str(self.dst_id / "site-ca.pem"))
        context.check_hostname = False
        context.load_cert_chain(self.src_id / "tls.pem", self.src_id / "tls.key")
        raw = socket.create_connection(("127.0.0.1", destination.port), timeout=10)
        tls = context.wrap_socket(raw)
        tls.sendall(b"\x00" * 7)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()

    def test_no_client_certificate(self) -> None:
        destination = self.start_destination("--tofu")
        self.assertIn("CERTIFICATE_REQUIRED", self.handshake(destination, None).upper())
        self.assertEqual(staging_left(destination), [])

    def test_certificate_from_another_ca(self) -> None:
        destination = self.start_destination("--tofu")
        rogue = self.base / "rogue"
        rogue.mkdir()

        issue_tls(Authority.create("rogue CA"), "source-a", rogue)
        self.assertIn("UNKNOWN_CA", self.handshake(destination, rogue).upper())
        self.assertEqual(staging_left(destination), [])


class SecureCrashPointTests(SecureBase):
    """The secure variant's crash points (see tests/app/test_crash.py for the
    cells of the commit itself): the source's `securemig migrate` dies
    during attestation, at the key transfer, mid data channel, and right
    after COMMITTED; the operator restarts the source host's daemon (same
    --state-dir, its identity), which settles the migration and tells the
    destination over mutual TLS.  The VM ends on one host, whole."""

    timeout = 120

    def source_dies(self, point: str) -> str:
        destination = self.start_destination("--tofu")
        bundle = self.create_vm("--disk-mib", "1")
        before = bundle_digests(bundle)
        state = self.base / "src-state"
        env = {**os.environ, "SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point}
        result = self.migrate(destination, "--state-dir", str(state), "--tofu", env=env)
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        daemon = processes.start_destination(
            state, "--identity", str(self.src_id), "--resolve-interval", "0.3"
        )
        self.addCleanup(daemon.stop)
        deadline = time.monotonic() + 30
        while True:
            journal = Journal(state / "journal.sqlite")
            record = journal.records()[0]
            journal.close()
            staged = list((destination.state_dir / "staging").iterdir())
            if record.outcome not in (None, "in-doubt") and record.peer_settled and not staged:
                break
            if record.outcome == "aborted" and record.migration_id is None and not staged:
                break  # the destination never admitted it far enough to hold anything
            self.assertLess(time.monotonic(), deadline, daemon.log()[-3000:])
            time.sleep(0.2)
        at_source = (self.vm_dir / "vm1").exists()
        at_destination = (destination.state_dir / "vms" / "vm1").exists()
        self.assertNotEqual(at_source, at_destination, "the VM must be on exactly one host")
        self.assertEqual(at_destination, record.reached("committed"))
        where = destination.state_dir / "vms" / "vm1" if at_destination else bundle.path
        self.assertEqual(bundle_digests(Bundle.load(where)), before)
        if at_source:
            self.assertTrue(bundle.vtpm_key_path.exists())
        else:
            self.assertFalse(bundle.vtpm_key_path.exists())
        return "destination" if at_destination else "source"

    def test_dies_during_attestation(self) -> None:
        self.assertEqual(self.source_dies("source-attesting"), "source")

    def test_dies_at_key_transfer(self) -> None:
        self.assertEqual(self.source_dies("source-key-wrapped"), "source")

    def test_dies_mid_data_channel(self) -> None:
        self.assertEqual(self.source_dies("source-streaming"), "source")

    def test_dies_after_committed(self) -> None:
        self.assertEqual(self.source_dies("source-committed"), "destination")

    def test_busy_resolve_is_logged_as_busy(self) -> None:
        """While the VM's name is locked at the destination (its session, or
        another arrival), RESOLVE is answered "busy, try again" over mutual
        TLS: the destination logs that as busy, never as an aborted
        migration, and no Unhandled Error comes of closing the connection
        (it used to log Twisted TLS's "'NoneType' object has no attribute
        'bio_read'"); once the name is free the migration settles."""
        destination = self.start_destination("--tofu")
        self.create_vm("--disk-mib", "1")
        state = self.base / "src-state"
        env = {**os.environ, **crash_env("source-committed")}
        result = self.migrate(destination, "--state-dir", str(state), "--tofu", env=env)
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        deadline = time.monotonic() + 30
        while True:  # until the destination holds the migration in doubt
            try:
                lock = storage.Lock(destination.state_dir / "locks" / "vm1.lock")
                break
            except storage.LockBusy:
                self.assertLess(time.monotonic(), deadline, destination.log()[-3000:])
                time.sleep(0.1)
        daemon = processes.start_destination(
            state, "--identity", str(self.src_id), "--resolve-interval", "0.3"
        )
        self.addCleanup(daemon.stop)
        while destination.log().count("busy") < 3:
            self.assertLess(time.monotonic(), deadline, destination.log()[-3000:])
            time.sleep(0.2)
        time.sleep(0.5)  # a refused connection's close grace
        lock.release()
        while not (destination.state_dir / "vms" / "vm1").exists():
            self.assertLess(time.monotonic(), deadline + 30, daemon.log()[-3000:])
            time.sleep(0.2)
        time.sleep(1.0)
        log = destination.log()
        self.assertNotIn("Unhandled Error", log)
        self.assertNotIn("POLICY_REFUSED", log)
        self.assertNotIn("ended: aborted", log)


def handshake_then_data(
    port: int, site_ca: Path, identity: Path, data: bytes = b"\x00" * 4096, then: str = "read"
) -> None:
    """A TLS 1.3 client (memory BIOs) whose last handshake flight and
    ``data`` leave in one ``send``: the server's TLS layer reads the
    application data in the same turn as the handshake's end."""
    import contextlib
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(site_ca))
    context.check_hostname = False
    context.load_cert_chain(identity / "tls.pem", identity / "tls.key")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                chunk = raw.recv(65536)
                if not chunk:
                    return
                incoming.write(chunk)
        if then == "after-eof":
            # The handshake's last flight; only once the destination's
            # refusal and its half-close came: data, then a TLS
            # close_notify, in one segment.
            raw.sendall(outgoing.read())
            with contextlib.suppress(OSError):
                while chunk := raw.recv(65536):
                    incoming.write(chunk)
            with contextlib.suppress(ssl.SSLError):
                tls.read(65536)
            tls.write(data)
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
            with contextlib.suppress(OSError):
                raw.sendall(outgoing.read())
                time.sleep(0.2)
            return
        tls.write(data)
        try:
            raw.sendall(outgoing.read())
            if then == "read":
                while raw.recv(65536):
                    pass
            elif then == "half-close":
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
            elif then == "sleep":
                time.sleep(0.3)
            elif then == "flood":
                for _ in range(64):
                    tls.write(data)
                    raw.sendall(outgoing.read())
        except OSError:
            pass
