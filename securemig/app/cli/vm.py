"""``securemig vm create|adopt|start|status|stop|delete|console|list``: VM
bundles on this host."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securemig.app.cli.common import (
    EXIT_OK,
    Subparsers,
    _mib,
    check_identity,
    describe,
    error,
    run_interruptible,
    usage_error,
)
from securemig.app.cli.journal import given_away, host_journal, settle_here
from securemig.app.cli.vm_libvirt import add_adopt_parser
from securemig.host import storage
from securemig.host.journal import Journal
from securemig.hypervisor import backends
from securemig.hypervisor import guest as linux_guest
from securemig.hypervisor.backends import Backend, backend_for, capabilities
from securemig.hypervisor.bundle import MANIFEST, Bundle, BundleError, check_vm_name
from securemig.protocol.errors import MigrationError
from securemig.trust import vtpm
from securemig.trust.attestor import open_attestor
from securemig.trust.tpm.tpm import TPMError


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig vm`` and its actions."""
    vm = subparsers.add_parser("vm", help="create, adopt, start, stop and inspect VMs")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    create = vm_sub.add_parser(
        "create",
        help="create a suspended VM of the image backend (random contents)",
        description="Create DIR/NAME/, a suspended VM whose RAM (and disk) images hold "
        "random bytes; enough to prove that a migration moves state intact.",
    )
    create.add_argument("name", help="VM name (letters, digits, '.', '_', '-')")
    create.add_argument("--dir", required=True, type=Path, help="directory holding VM bundles")
    create.add_argument(
        "--ram-mib",
        required=True,
        type=_mib,
        help="RAM image size (a backend that runs no guest) or guest memory in MiB",
    )
    create.add_argument(
        "--backend",
        default=backends.DEFAULT,
        choices=backends.kinds(lambda c: c.creatable),
        help="the VM's hypervisor backend: image (default): a suspended VM of random bytes; "
        "a backend that runs guests (qemu): a stopped guest (start it with `securemig vm start`)",
    )
    create.add_argument(
        "--guest",
        default="firmware",
        choices=("firmware", "linux"),
        help="qemu: firmware only (a marker in RAM; fast) or the Linux guest built by "
        "`make setup` (vTPM use, a memory workload, a heartbeat)",
    )
    create.add_argument(
        "--pcr16",
        type=_pcr16,
        help="linux guest: the 32-byte value (64 hex digits) it extends its vTPM's PCR 16 with",
    )
    create.add_argument(
        "--dirty-mib-s",
        type=int,
        default=0,
        help="linux guest: MiB of memory its workload rewrites per second (default 0)",
    )
    create.add_argument(
        "--wss-mib",
        type=_mib,
        default=32,
        help="linux guest: the workload's working set in MiB (default 32)",
    )
    create.add_argument("--disk-mib", type=_mib, help="disk image size in MiB (default: no disk)")
    create.add_argument(
        "--identity",
        type=Path,
        help="give the VM a vTPM key sealed to this host's TPM (needed for secure migration)",
    )
    create.add_argument(
        "--shared-disk", type=Path, help="create the disk image here, on storage both hosts mount"
    )
    create.set_defaults(func=cmd_vm_create)
    add_adopt_parser(vm_sub)
    for action, text, func in (
        ("start", "start a QEMU VM or an adopted libvirt domain", cmd_vm_start),
        ("status", "say what state a VM is in", cmd_vm_status),
    ):
        a = vm_sub.add_parser(action, help=text)
        a.add_argument("name")
        a.add_argument("--dir", required=True, type=Path, help="directory holding VM bundles")
        a.add_argument(
            "--state-dir",
            type=Path,
            help="this host's state directory, whose journal is settled first "
            "(default: $SECUREMIG_STATE_DIR, else DIR/.securemig)",
        )
        a.add_argument(
            "--connect",
            metavar="URI",
            help="libvirt domains: the libvirt connection (default: the one it was adopted on)",
        )
        if action == "start":
            a.add_argument(
                "--identity",
                type=Path,
                help="this host's identity directory: its TPM unseals the key of a VM's vTPM",
            )
        a.set_defaults(func=func)
    for action, text, description, func in (
        (
            "stop",
            "stop a running QEMU VM, its state saved (vm start resumes it)",
            "Suspend the running VM into its RAM image (QEMU and its vTPM's swtpm then "
            "exit); `securemig vm start` resumes it where it was.  --force ends QEMU "
            "instead, losing the guest's memory (a power cut).  Refused, with the reason, "
            "while a migration holds the VM, while a migration of it is in doubt, and for "
            "a VM this host gave away.",
            cmd_vm_stop,
        ),
        (
            "delete",
            "delete a stopped VM's bundle",
            "Remove DIR/NAME (images, vTPM state, sealed key).  Refused, with the reason, "
            "for a running VM (vm stop first), while a migration holds it or one of it is "
            "in doubt, and for a VM this host gave away (its bundle here may be the only "
            "copy until the destination confirms).  A shared disk is left where it is.",
            cmd_vm_delete,
        ),
    ):
        a = vm_sub.add_parser(action, help=text, description=description)
        a.add_argument("name")
        a.add_argument("--dir", required=True, type=Path, help="directory holding VM bundles")
        a.add_argument(
            "--state-dir",
            type=Path,
            help="this host's state directory, whose journal is settled and read first "
            "(default: $SECUREMIG_STATE_DIR, else DIR/.securemig)",
        )
        if action == "stop":
            a.add_argument(
                "--force", action="store_true", help="end QEMU without saving (memory lost)"
            )
        a.set_defaults(func=func)
    console = vm_sub.add_parser(
        "console",
        help="show a VM's console output",
        description="Print what the VM's guest wrote on its console (its first serial "
        "port), as this host keeps it: the last --lines lines, then with --follow what "
        "it writes next until interrupted (Ctrl-C).  Read-only: the console takes no "
        "input.  A libvirt domain's console is libvirt's: virsh console DOMAIN.",
    )
    console.add_argument("name")
    console.add_argument("--dir", required=True, type=Path, help="directory holding VM bundles")
    console.add_argument(
        "--lines", type=_count, default=50, metavar="N", help="how many last lines (default 50)"
    )
    console.add_argument(
        "--follow", action="store_true", help="keep printing what the guest writes next"
    )
    console.set_defaults(func=cmd_vm_console)
    listing = vm_sub.add_parser("list", help="list the VM bundles in a directory")
    listing.add_argument("--dir", required=True, type=Path)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_vm_list)


def cmd_vm_create(args: argparse.Namespace) -> int:
    """``securemig vm create``: a new VM bundle, with a sealed vTPM key given
    ``--identity``."""
    try:
        check_vm_name(args.name)
    except BundleError as e:
        return usage_error(str(e))
    cmdline = ""
    if args.guest == "linux":
        if args.guest not in capabilities(args.backend).guests:
            able = backends.kinds(lambda c: args.guest in c.guests)
            return usage_error(f"--guest {args.guest} needs --backend {' or '.join(able)}")
        if args.wss_mib * 2 + 48 > args.ram_mib:
            return usage_error(
                f"--ram-mib {args.ram_mib} is too small for a {args.wss_mib} MiB working set "
                f"(at least {args.wss_mib * 2 + 48})"
            )
        try:
            cmdline = linux_guest.cmdline(
                args.pcr16 or linux_guest.DEFAULT_PCR16, args.dirty_mib_s, args.wss_mib
            )
        except linux_guest.GuestError as e:
            return usage_error(str(e))
    sealed = key_and_ca = owner = None
    if args.identity:
        check_identity(args.identity)
        # The vTPM's state key: sealed to this host's TPM, handed to
        # swtpm through a pipe, never written in the clear.
        key = os.urandom(32)
        try:
            with open_attestor(args.identity, None, False) as attestor:
                sealed = attestor.seal(key)
                owner = attestor.identity.name
        except TPMError as e:
            return error(
                f"{e}; the host TPM that {args.identity / 'host.json'} names must be running "
                "(nothing was created)"
            )
        except ValueError as e:
            return error(f"cannot use the identity in {args.identity}: {e}")
        key_and_ca = (key, args.identity / vtpm.CA_DIR)
    try:
        bundle = backends.create_vm(
            args.dir,
            args.name,
            args.ram_mib,
            kind=args.backend,
            guest=args.guest,
            disk_mib=args.disk_mib,
            shared_disk=args.shared_disk,
            sealed_vtpm_key=sealed,
            vtpm=key_and_ca,
            owner=owner,
            guest_cmdline=cmdline,
        )
    except (BundleError, OSError, ValueError) as e:
        return error(describe(e))
    sizes = ", ".join(f"{i.name} {i.size >> 20} MiB" for i in bundle.manifest.images)
    shared = f", shared disk {bundle.manifest.shared_disk}" if bundle.manifest.shared_disk else ""
    print(f"created VM {bundle.name} at {bundle.path} ({sizes}{shared})")
    return EXIT_OK


def _pcr16(text: str) -> str:
    """``--pcr16``: 64 hex digits, lowercased."""
    value = text.lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError("give 64 hex digits (32 bytes)")
    return value


def cmd_vm_list(args: argparse.Namespace) -> int:
    """``securemig vm list``: the VM bundles in ``--dir``, as a table or
    JSON; a bundle whose manifest is unusable is left out, saying why on
    stderr; a ``--dir`` that is no directory is an error (a mistyped one
    would otherwise look empty)."""
    if not args.dir.is_dir():
        return error(f"no directory {args.dir} (the directory holding VM bundles)")
    rows: list[dict[str, Any]] = []
    for path in sorted(args.dir.iterdir()):
        if not (path / MANIFEST).exists():
            continue  # not a bundle (the journal's .securemig, say)
        try:
            b = Bundle.load(path)
        except BundleError as e:
            print(f"securemig: warning: skipping {path}: {e}", file=sys.stderr)
            continue
        except OSError as e:
            print(f"securemig: warning: skipping {path}: {describe(e)}", file=sys.stderr)
            continue
        rows.append(
            {
                "name": b.name,
                "backend": b.manifest.backend,
                "state": b.manifest.state,
                "images": {i.name: i.size for i in b.manifest.images},
                "shared_disk": b.manifest.shared_disk,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['name']:<24} {r['backend']:<6} {r['state']:<10} "
                + " ".join(f"{k}={v >> 20}MiB" for k, v in r["images"].items())
            )
    return EXIT_OK


def cmd_vm_status(args: argparse.Namespace) -> int:
    """``securemig vm status``: what state a VM is in, by its backend."""
    _settle(args, None)
    try:
        bundle, backend = _find(args.dir, args.name, None, args.connect)
    except BundleError as e:
        gone = given_away(_journal(args), args.name, args.dir)
        return error(gone or str(e))
    state = backend.status(bundle)
    if (
        state == "shutoff"
        and bundle.manifest.state == "suspended"
        and bundle.image_path("ram").exists()
    ):
        # libvirt's word for a domain whose memory securemig saved (vm stop).
        state = "shutoff, its memory saved (securemig vm start resumes it)"
    print(f"{bundle.name}: {state} ({bundle.manifest.backend})")
    return EXIT_OK


def _count(text: str) -> int:
    """A non-negative whole number of lines, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines (0 or more)")
    return value


#: How often ``vm console --follow`` looks for more output.
CONSOLE_POLL_S = 0.2


def cmd_vm_console(args: argparse.Namespace) -> int:
    """``securemig vm console``: the guest's console output, as its backend
    keeps it here; with ``--follow``, what comes next until interrupted."""
    try:
        bundle, backend = _find(args.dir, args.name, None)
    except BundleError as e:
        return error(str(e))
    path = backend.console(bundle)
    if path is None:
        return error(
            f"VM {bundle.name} ({bundle.manifest.backend}, guest {bundle.manifest.guest}) "
            "has no console kept by securemig on this host (a firmware guest prints "
            "none; an adopted libvirt domain's console is virsh console DOMAIN)"
        )
    try:
        while args.follow and not path.exists():
            # A VM that has not started yet: its console is followed from
            # its first line.
            time.sleep(CONSOLE_POLL_S)
        with open(path, "rb") as f:
            tail = f.read().splitlines(keepends=True)[-args.lines :] if args.lines else []
            out = sys.stdout.buffer
            out.write(b"".join(tail))
            out.flush()
            while args.follow:
                chunk = f.read(1 << 16)
                if chunk:
                    out.write(chunk)
                    out.flush()
                else:
                    time.sleep(CONSOLE_POLL_S)
    except FileNotFoundError:
        return error(f"VM {bundle.name} has written no console yet ({path} does not exist)")
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_vm_start(args: argparse.Namespace) -> int:
    """``securemig vm start``: start a VM whose backend runs VMs here (QEMU),
    its vTPM key unsealed with ``--identity``."""
    journal = _journal(args)
    found: list[Any] = []

    async def start(reactor: Any) -> None:
        await settle_here(journal, args.identity)
        gone = given_away(journal, args.name, args.dir)
        if gone is not None:
            raise BundleError(gone)
        bundle, backend = _find(args.dir, args.name, args.identity, args.connect)
        found[:] = [bundle, backend]
        if not capabilities(bundle.manifest.backend).startable:
            raise BundleError(f"VMs of the {bundle.manifest.backend} backend are not started here")
        try:
            # The migration's lock: a VM that a migration (or the daemon's
            # recovery) is moving is not started under it.
            lock = storage.VMLock(bundle.lock_path)
        except storage.LockBusy:
            raise BundleError(
                f"VM {bundle.name} is locked by a migration ({bundle.lock_path}); "
                "see `securemig jobs`"
            ) from None
        try:
            state = backend.status(bundle)
            if state == "running":
                return
            if state == "busy":
                raise BundleError(f"VM {bundle.name} does not answer its monitor; try again")
            if state == "paused" or (
                bundle.manifest.state == "suspended" and bundle.image_path("ram").exists()
            ):
                # Paused (e.g. after a live stream): continued, no key needed.
                # Saved by a suspend (a migration that did not happen): resumed
                # from the RAM image; a cold boot would discard the guest's memory.
                await backend.resume(bundle)
            else:
                await backend.start(bundle)
        finally:
            lock.release()

    if args.identity:
        check_identity(args.identity)
    try:
        run_interruptible(start)
    except (MigrationError, OSError) as e:
        return error(describe(e))
    bundle, backend = found
    print(f"{bundle.name}: {backend.status(bundle)}")
    return EXIT_OK


def _journal(args: argparse.Namespace) -> Journal:
    """This host's journal, as ``vm start|status --state-dir`` names it."""
    return host_journal(args.dir, args.state_dir)


def _settle(args: argparse.Namespace, identity: Path | None) -> None:
    """Settle this host's unfinished departures (a VM a dead migrate left)."""
    journal = _journal(args)

    async def settle(reactor: Any) -> None:
        await settle_here(journal, identity)

    run_interruptible(settle)


def _find(
    vm_dir: Path, name: str, identity: Path | None, connect: str | None = None
) -> tuple[Bundle, Backend]:
    """VM ``name`` in ``vm_dir`` and its backend, which unseals vTPM keys
    with the TPM of ``identity`` if given (a libvirt domain's on ``connect``
    if given)."""
    bundle = Bundle.find(vm_dir, name)
    backend = backend_for(bundle.manifest.backend, vtpm_key=_vtpm_key(identity))
    if connect is not None and hasattr(backend, "connect"):
        backend.connect = connect
    return bundle, backend


def _vtpm_key(identity: Path | None) -> Callable[[Any], bytes] | None:
    """How a VM's vTPM key is unsealed with the TPM of ``identity``."""
    if identity is None:
        return None
    return vtpm.key_reader(vtpm.unsealer(identity))


def _held(journal: Journal, bundle: Bundle, vm_dir: Path) -> storage.VMLock:
    """VM ``bundle``'s lock, taken for a lifecycle action, after the checks
    that refuse one which could lose the VM: a migration holds it, one of it
    is in doubt (or unfinished), or this host gave it away."""
    gone = given_away(journal, bundle.name, vm_dir)
    if gone is not None:
        raise BundleError(gone)
    try:
        lock = storage.VMLock(bundle.lock_path)
    except storage.LockBusy:
        raise BundleError(
            f"VM {bundle.name} is locked by a migration under way (securemig jobs): "
            "abort it or let it end first"
        ) from None
    for record in journal.departures() + journal.unfinished():
        if (
            record.vm == bundle.name
            and record.role == "source"
            and record.outcome in (None, "in-doubt")
        ):
            lock.release()
            raise BundleError(
                f"VM {bundle.name} is in doubt in migration {record.migration_id or record.id} "
                f"to {record.peer_name or record.peer}: it may be committed there; settle it "
                "first (twistd securemig on this state directory does, or securemig status)"
            )
    return lock


def cmd_vm_stop(args: argparse.Namespace) -> int:
    """``securemig vm stop``: suspend a running VM into its images (or
    end it with ``--force``)."""
    journal = _journal(args)
    said: list[str] = []

    async def stop(reactor: Any) -> None:
        await settle_here(journal, None)
        bundle, backend = _find(args.dir, args.name, None)
        lock = _held(journal, bundle, args.dir)
        try:
            state = backend.status(bundle)
            if state not in ("running", "paused"):  # paused: its QEMU runs, the guest stopped
                raise BundleError(f"VM {bundle.name} is not running ({state})")
            if args.force:
                await backend.end(bundle)
                bundle.manifest.state = "stopped"
                bundle.save()
                said.append(f"{bundle.name}: stopped (ended; its memory is lost)")
            else:
                await backend.suspend(bundle)
                said.append(f"{bundle.name}: suspended (securemig vm start resumes it)")
        finally:
            lock.release()

    try:
        run_interruptible(stop)
    except (MigrationError, OSError) as e:
        return error(describe(e))
    print(said[0])
    return EXIT_OK


def cmd_vm_delete(args: argparse.Namespace) -> int:
    """``securemig vm delete``: remove a stopped VM's bundle."""
    journal = _journal(args)

    found: list[Bundle] = []

    async def delete(reactor: Any) -> None:
        await settle_here(journal, None)
        bundle, backend = _find(args.dir, args.name, None)
        found.append(bundle)
        lock = _held(journal, bundle, args.dir)
        try:
            if backend.status(bundle) == "running" or backend.has_process(bundle):
                raise BundleError(f"VM {bundle.name} is running: securemig vm stop it first")
            # The backend removes the VM with its bundle (a libvirt domain's
            # definition and vTPM state too: its bundle holds the only copy
            # of the vTPM's secret).
            await backend.discard(bundle)
        finally:
            lock.release()

    try:
        run_interruptible(delete)
    except (MigrationError, OSError) as e:
        return error(describe(e))
    bundle = found[0]
    shared = bundle.manifest.shared_disk
    print(f"deleted VM {bundle.name}" + (f" (its shared disk {shared} is kept)" if shared else ""))
    return EXIT_OK
