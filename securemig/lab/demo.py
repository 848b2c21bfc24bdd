"""
``securemig demo``: the whole system in one command, on loopback.

In a temporary directory it starts a privacy CA (``twistd securemig-pca``)
and two hosts, each with its own swtpm as host TPM, enrolled through the
privacy CA, each running a real ``twistd securemig``; creates a VM with a
vTPM whose key is sealed to the source's TPM; migrates it securely (mutual
TLS 1.3, attestation both ways, key release), then back over the insecure
variant; checks what arrived each time, and prints a table of phases.  It
ends every process it started.  ``--backend qemu --live`` (:func:`run_live`)
moves a running Linux guest live and securely, there and back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from securemig.hypervisor import guest
from securemig.hypervisor.bundle import Bundle
from securemig.hypervisor.heartbeat import Watch
from securemig.hypervisor.qemu import MARKER_ADDRESS, QemuBackend, heartbeat_path
from securemig.lab.lab import DESTINATION, SOURCE, Lab
from securemig.trust import vtpm
from securemig.trust.attestor import open_attestor
from securemig.trust.policy import PolicyStore


def _digests(bundle: Bundle) -> dict[str, str]:
    result = {}
    for image in bundle.manifest.images:
        h = hashlib.sha256()
        with open(bundle.image_path(image), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        result[image.name] = h.hexdigest()
    return result


def run(
    size_mib: int = 256, as_json: bool = False, keep: bool = False, backend: str = "image"
) -> int:
    """Run the demo (``backend="qemu"``: with a running QEMU guest); returns
    the process exit status."""

    work = Path(tempfile.mkdtemp(prefix="securemig-demo-"))
    say: Callable[..., None] = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    lab = Lab(work, say)
    try:
        say(f"securemig demo in {work}")
        say("1. setting up a site CA, a privacy CA and two hosts")
        lab.start()
        qemu: Any = None
        if backend == "qemu":
            qemu = QemuBackend()
        destination = lab.start_destination(backend=backend)
        say(
            f"   destination {DESTINATION} `twistd securemig`: secure on port "
            f"{destination.port}, insecure on port {destination.insecure_port}"
        )
        home = lab.start_destination(host=SOURCE, backend=backend)
        say(
            f"   and {SOURCE} runs one too (for the way back): insecure on port "
            f"{home.insecure_port}"
        )
        vm = lab.create_vm("demo-vm", size_mib, 32, secure=True, backend=backend)
        if qemu is not None:  # end the guest wherever it is when the demo ends
            for where in (
                vm.path,
                destination.state_dir / "vms" / "demo-vm",
                home.state_dir / "vms" / "demo-vm",
            ):
                lab.on_stop(partial(qemu.end_blocking, Bundle(where, vm.manifest)))
        identity = vm.manifest.vtpm

        def state_of(bundle: Bundle) -> Any:
            """What must arrive intact: the images, or for a QEMU guest that it
            runs with the same memory and its vTPM attached (its RAM image
            differs per suspend)."""
            if qemu is None:
                return _digests(bundle)

            return (
                qemu.status(bundle),
                qemu.vtpm_attached(bundle),
                qemu.guest_memory(bundle, MARKER_ADDRESS, 4096),
            )

        before = state_of(vm)
        with open_attestor(work / SOURCE, None, False) as source:
            secret = source.unseal(vm.vtpm_key_path.read_bytes())
        kind = "a running QEMU guest" if qemu else "a suspended VM"
        say(
            f"2. created VM demo-vm at {SOURCE}: {kind} (RAM {size_mib} MiB, disk 32 MiB, a "
            f"swtpm vTPM encrypted at rest, its key sealed to {SOURCE}'s TPM)"
        )
        say(
            f"3. migrating demo-vm securely to {DESTINATION}: mutual TLS 1.3, attestation "
            "both ways, key release"
        )
        secure, _ = lab.migrate(destination, "demo-vm", secure=True)
        attested = _say_attested(say, work, tofu_note=True)
        there = Bundle.load(destination.state_dir / "vms" / "demo-vm")
        with open_attestor(work / DESTINATION, None, False) as dest:
            released = dest.unseal(there.vtpm_key_path.read_bytes())
        at_destination = {
            "images": state_of(there) == before,
            "key": released == secret,
            "vtpm": there.manifest.vtpm == identity
            and vtpm.identity(there.path / vtpm.STATE_DIR, released, expected=identity) == identity,
            "source_copy_removed": not vm.path.exists(),
        }
        say(
            f"4. migrating it back to {SOURCE} over the insecure variant (the vTPM key "
            "travels in the clear)"
        )
        insecure, _ = lab.migrate(
            home, "demo-vm", secure=False, vm_dir=there.path.parent, source=DESTINATION, to=SOURCE
        )
        back = Bundle.load(home.state_dir / "vms" / "demo-vm")
        with open_attestor(work / SOURCE, None, False) as source:
            returned = source.unseal(back.vtpm_key_path.read_bytes())
        checks = {
            (
                "guest_running_with_same_memory_and_vtpm" if qemu else "images_identical"
            ): at_destination["images"] and state_of(back) == before,
            "vtpm_key_released_to_destination_tpm": at_destination["key"],
            "same_vtpm_at_destination": at_destination["vtpm"],
            "vtpm_back_at_source": returned == secret and back.manifest.vtpm == identity,
            "source_copies_removed": at_destination["source_copy_removed"]
            and not there.path.exists(),
        }
        say(
            f"5. a refusal: {DESTINATION}'s PCR 7 (secure boot policy) is extended, then "
            f"demo-vm is sent there securely again"
        )
        with open_attestor(work / DESTINATION, None, False) as dest:
            dest.tpm.pcr_extend(7, b"securemig demo: a changed boot policy")
        held = state_of(back)
        try:
            lab.migrate(destination, "demo-vm", secure=True, vm_dir=back.path.parent)
            refusal = "NOT REFUSED"
        except RuntimeError as e:
            refusal = str(e).rsplit("securemig: ", 1)[-1]
        say(f"   refused: {refusal}")
        checks["refused_after_a_pcr_change_vm_intact_at_source"] = (
            refusal != "NOT REFUSED"
            and "7" in refusal
            and Bundle.load(back.path).vtpm_key_path.exists()
            and state_of(Bundle.load(back.path)) == held
        )
        result = {
            "backend": backend,
            "secure": secure,
            "insecure": insecure,
            "attested": attested,
            "refusal": refusal,
            "checks": checks,
        }
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            _table(say, secure, insecure)
            for check, ok in checks.items():
                say(f"   {check.replace('_', ' ')}: {'yes' if ok else 'NO'}")
        ok = secure["outcome"] == insecure["outcome"] == "done" and all(checks.values())
        return 0 if ok else 1
    except RuntimeError as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        lab.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _say_attested(
    say: Callable[..., None], work: Path, tofu_note: bool
) -> dict[str, dict[str, Any]]:
    """Say what each side attested of the other (AK, PCR values), marking
    values trusted on first use when ``tofu_note``; returns them."""
    attested = {
        f"{SOURCE} saw {DESTINATION}": _attested(work / SOURCE, DESTINATION),
        f"{DESTINATION} saw {SOURCE}": _attested(work / DESTINATION, SOURCE),
    }
    for who, seen in attested.items():
        say(
            f"   {who}: AK {seen['ak']}, PCRs "
            + ", ".join(f"{i}={v[:12]}…" for i, v in seen["pcrs"].items())
            + (
                "  (recorded on first use: trust on first use, nobody checked them; a "
                "site records golden values with `securemig policy record`)"
                if tofu_note and seen["first_use"]
                else ""
            )
        )
    return attested


def _attested(identity: Path, peer: str) -> dict[str, Any]:
    """What the host of ``identity`` recorded of ``peer``'s attestation: its
    PCR values (hex), its AK's name (short hex) and whether trust on first
    use recorded them."""
    golden = PolicyStore(identity / "policy").get(peer)
    if golden is None:
        return {"pcrs": {}, "ak": "?", "first_use": False}
    aks = [name.hex()[:16] for name in golden.clocks]
    return {
        "pcrs": {i: v.hex() for i, v in sorted(golden.pcrs.items())},
        "ak": aks[-1] if aks else "?",
        "first_use": golden.first_use,
    }


def _table(say: Callable[..., None], secure: dict[str, Any], insecure: dict[str, Any]) -> None:
    say("6. phases of the two migrations (seconds, from the source's journal):")
    say(f"   {'phase':<28} {'secure':>9} {'insecure':>9}")
    order = [
        "connect",
        "hello",
        "hello + attest destination",
        "attest source",
        "key transfer",
        "streams",
        "commit",
        "resume",
    ]
    seen = set(secure["phases"]) | set(insecure["phases"])
    names = [n for n in order if n in seen] + sorted(seen - set(order))
    for name in names:
        s = secure["phases"].get(name)
        i = insecure["phases"].get(name)
        say(
            f"   {name:<28} {'' if s is None else f'{s:9.4f}':>9} "
            f"{'' if i is None else f'{i:9.4f}':>9}"
        )
    say(f"   {'total':<28} {secure['seconds']:9.3f} {insecure['seconds']:9.3f}")
    say(f"   {'MiB/s':<28} {secure['throughput_mibps']:>9} {insecure['throughput_mibps']:>9}")
    say("   (one run each, the first with cold caches: `securemig bench` measures the cost)")


#: The live demo's guest: memory, and the rate its workload dirties it.
LIVE_MEMORY_MIB = 160
LIVE_DIRTY_MIB_S = 16
LIVE_WSS_MIB = 32


def run_live(as_json: bool = False, keep: bool = False) -> int:
    """``securemig demo --backend qemu --live``: a running Linux guest under
    load, migrated live and securely to the destination and back; prints
    QEMU's and the guest-observed downtime, whether the heartbeat went on
    without a restart and whether PCR 16 (which the guest extended) is the
    same after each move; returns the exit status."""
    work = Path(tempfile.mkdtemp(prefix="securemig-demo-live-"))
    say: Callable[..., None] = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    lab = Lab(work, say)
    qemu = QemuBackend()
    watches: list[Watch] = []
    try:
        say(f"securemig live demo in {work}")
        say("1. setting up a site CA, a privacy CA and two hosts, each running QEMU")
        lab.start()
        destination = lab.start_destination(backend="qemu")
        home = lab.start_destination(host=SOURCE, backend="qemu")
        pcr16 = os.urandom(32).hex()
        cmdline = guest.cmdline(pcr16, LIVE_DIRTY_MIB_S, LIVE_WSS_MIB)
        vm = lab.create_vm(
            "demo-vm", LIVE_MEMORY_MIB, None, secure=True, backend="qemu", guest_cmdline=cmdline
        )
        there = destination.state_dir / "vms" / "demo-vm"
        back = home.state_dir / "vms" / "demo-vm"
        for where in (vm.path, there, back):
            lab.on_stop(partial(qemu.end_blocking, Bundle(where, vm.manifest)))
        expected = hashlib.sha256(bytes(32) + bytes.fromhex(pcr16)).hexdigest()
        watch = Watch(heartbeat_path(vm))
        watches.append(watch)
        first = watch.wait(5, timeout=120.0)
        say(
            f"2. a Linux guest runs at {SOURCE} ({LIVE_MEMORY_MIB} MiB, rewriting "
            f"{LIVE_DIRTY_MIB_S} MiB/s of memory), heartbeat {first.seq}, its vTPM's "
            f"PCR 16 = {first.pcr16[:16]}… (it extended it at boot)"
        )
        moves = []
        for step, (target, path, vm_dir, source, to) in enumerate(
            (
                (destination, there, vm.path.parent, SOURCE, DESTINATION),
                (home, back, there.parent, DESTINATION, SOURCE),
            ),
            start=3,
        ):
            say(
                f"{step}. migrating it live from {source} to {to}: attestation both ways and "
                "key release while it runs, then QEMU's stream in sealed records"
            )
            watch = Watch(
                heartbeat_path(Bundle(vm_dir / "demo-vm", vm.manifest)), path / "heartbeat.log"
            )
            watches.append(watch)
            summary, _ = lab.migrate(
                target, "demo-vm", secure=True, vm_dir=vm_dir, source=source, to=to,
                extra=("--live",),
            )  # fmt: skip
            last = watch.wait(5, timeout=60.0, source=1)
            summary["guest_downtime_ms"] = watch.largest_gap_ms()
            summary["guest_kept_running"] = watch.continuous()
            # Where it broke, if it did: a beat lost, repeated, or a restart.
            summary["heartbeat_breaks"] = watch.breaks()[:5]
            summary["guest_vtpm_preserved"] = last.pcr16 == expected
            moves.append(summary)
            say(
                f"   done in {summary['seconds']:.2f} s: downtime {summary['downtime_ms']} ms "
                f"(QEMU), {summary['guest_downtime_ms']} ms (largest heartbeat gap seen here), "
                f"{summary['iterations']} rounds, {summary['transferred'] >> 20} MiB; heartbeat "
                f"{'went on' if summary['guest_kept_running'] else 'DID NOT go on'} "
                + "".join(f"({a} then {b}) " for a, b in summary["heartbeat_breaks"])
                + f"(now {last.seq}), PCR 16 "
                f"{'the same' if summary['guest_vtpm_preserved'] else 'CHANGED'}"
            )
        attested = _say_attested(say, work, tofu_note=False)
        at_home = Bundle.load(back)
        checks = {
            "mode_live": all(m["mode"] == "live" for m in moves),
            "guest_kept_running": all(m["guest_kept_running"] for m in moves)
            and qemu.status(at_home) == "running",
            "guest_vtpm_preserved": all(m["guest_vtpm_preserved"] for m in moves),
            "source_copies_removed": not vm.path.exists() and not there.exists(),
        }
        result = {"backend": "qemu", "mode": "live", "migrations": moves, "attested": attested}
        result["checks"] = checks
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            for check, ok in checks.items():
                say(f"   {check.replace('_', ' ')}: {'yes' if ok else 'NO'}")
        ok = all(m["outcome"] == "done" for m in moves) and all(checks.values())
        return 0 if ok else 1
    except (RuntimeError, TimeoutError) as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        for w in watches:
            w.stop()
        lab.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
