"""``securemig migrate``: drive one migration from the source, show its
progress and report how it ended."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from securemig.app import config, control_client
from securemig.app.cli.common import (
    EXIT_FAILED,
    EXIT_IN_DOUBT,
    EXIT_OK,
    Subparsers,
    check_identity,
    describe,
    error,
    run_interruptible,
    usage_error,
)
from securemig.app.cli.journal import given_away, host_journal, settle_here, source_state_dir
from securemig.host.departure import Departure, VMLocked
from securemig.host.glibc import tune_malloc
from securemig.host.journal import Journal
from securemig.hypervisor.bundle import Bundle, BundleError, check_vm_name
from securemig.hypervisor.qemu import LIVE_DOWNTIME_LIMIT_MS, LIVE_MAX_BANDWIDTH
from securemig.lab.processes import peak_rss_mib
from securemig.protocol import wire
from securemig.protocol.connection import DEADLINE, IDLE_TIMEOUT
from securemig.protocol.effects import Outcome
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.transport.client import migrate, parse_address
from securemig.transport.options import SecureOptions, SourceOptions
from securemig.transport.source import SourceProtocol
from securemig.trust.attestor import FirstUse, log_first_use, warn_on_stderr
from securemig.trust.identity import Identity
from securemig.trust.revocation import CRL_MAX_AGE, CRLError, RevocationList
from securemig.trust.revocation import for_identity as revocation_for


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig migrate``."""
    mig = subparsers.add_parser(
        "migrate",
        help="migrate a VM to a destination",
        description="Migrate VM NAME from --vm-dir to the destination at --to. Before the "
        "commit any failure leaves the VM here, unlocked and intact; after it the VM "
        "belongs to the destination and its bundle here is removed.  Ctrl-C cancels "
        "the migration (before the commit: the VM stays here).",
    )
    mig.add_argument("name", help="the VM to migrate")
    mig.add_argument("--vm-dir", required=True, type=Path, help="directory holding the VM bundle")
    mig.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination")
    mig.add_argument(
        "--identity",
        type=Path,
        help="this host's identity directory: the secure variant; with --insecure, only "
        "to unseal a vTPM key (which then travels in the clear)",
    )
    mig.add_argument(
        "--policy-dir", type=Path, help="golden values of destinations (default: IDENTITY/policy)"
    )
    mig.add_argument(
        "--tofu",
        action="store_true",
        help="record an unknown destination's PCR values on first attestation",
    )
    mig.add_argument(
        "--destination-name", help="the name the destination must prove (default: the host of --to)"
    )
    mig.add_argument(
        "--crl",
        metavar="URL",
        help="the privacy CA's https:// URL to fetch its revocation list from before "
        "migrating (default: the one IDENTITY enrolled with)",
    )
    mig.add_argument(
        "--crl-max-age",
        type=float,
        default=CRL_MAX_AGE,
        help="seconds after its signing past which a revocation list is stale and the "
        "destination refused, when no newer one can be fetched (default %(default)g)",
    )
    mig.add_argument(
        "--insecure",
        action="store_true",
        help="use the insecure variant (no TLS, no attestation): for measurements",
    )
    mig.add_argument(
        "--shared-storage",
        action="store_true",
        help="move RAM only; the disk stays on storage both hosts share",
    )
    mig.add_argument(
        "--live",
        action="store_true",
        help="live migration: the running guest keeps running while QEMU copies its "
        "memory (pre-copy, inside securemig's sealed stream) and stops only for the last "
        "dirty pages (--downtime-ms), on N multifd channels with --parallel N.  Needs "
        "the secure variant (--identity), a running "
        "QEMU guest, twistd securemig --backend qemu at the destination and the disk on "
        "storage both hosts mount (RAM and vTPM travel; implies --shared-storage).  An "
        "adopted libvirt domain (twistd securemig --backend libvirt at the destination) "
        "moves by libvirt's own migration, its sockets carried sealed (--copy-storage, "
        "--parallel).  Not yet: post-copy, or copying a disk of a QEMU guest",
    )
    mig.add_argument(
        "--copy-storage",
        action="store_true",
        help="--live, a libvirt domain: copy its disks too (non-shared storage; NBD, "
        "carried sealed); the destination creates them empty",
    )
    mig.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="N",
        help="--live: N multifd channels for the guest's memory, each carried as its own "
        "sealed stream (its own key): a QEMU guest 1 to 8, a libvirt domain 1 to 16; "
        "default 0: one stream.  A suspended migration ignores it (the [migrate] "
        "parallel key of the configuration file too)",
    )
    mig.add_argument(
        "--downtime-ms",
        type=int,
        default=LIVE_DOWNTIME_LIMIT_MS,
        help="--live: the downtime QEMU aims for (migrate-set-parameters "
        "downtime-limit; for a libvirt domain, other than the default, its "
        "migrate-setmaxdowntime, which stays with it; default %(default)s)",
    )
    mig.add_argument(
        "--chunk-kib",
        type=int,
        default=wire.DEFAULT_CHUNK_SIZE // 1024,
        help="DATA frame size in KiB (default %(default)s)",
    )
    mig.add_argument(
        "--state-dir",
        type=Path,
        help="where the source journal lives (default: $SECUREMIG_STATE_DIR, else "
        "VM_DIR/.securemig)",
    )
    mig.add_argument("--idle-timeout", type=float, help="seconds without progress (default 60)")
    mig.add_argument("--deadline", type=float, help="seconds for the whole migration (3600)")
    mig.add_argument(
        "--bandwidth",
        type=_bandwidth,
        metavar="MIB/S",
        help="send at most this many MiB of images a second (with --live: QEMU's "
        "max-bandwidth for its stream; for a libvirt domain libvirt's migration "
        "bandwidth, in whole MiB/s, 1024 or more: no limit; default: no limit)",
    )
    mig.add_argument(
        "--daemon",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="have this host's twistd securemig (the one of the same --state-dir) drive "
        "the migration: this command only asks it over its control socket and shows the "
        "progress, and starts faster (no interpreter full of TLS and TPM code).  Ctrl-C "
        "cancels it; a client that goes away does not.  --no-daemon: migrate in this "
        "process even when the configuration file says [migrate] daemon = true",
    )
    mig.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    mig.add_argument("--no-progress", action="store_true", help="no progress bar")
    mig.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    """``securemig migrate``: drive one migration from the source."""
    tune_malloc()
    if (status := check(args)) is not None:
        return status
    if args.daemon:
        # The line as typed goes to the daemon, which parses it the same way.
        line = getattr(args, "_argv", None) or sys.argv[1:]
        origin = getattr(args, "_origins", {}).get("daemon", "")
        hint = None
        if origin.startswith("file"):
            # Not asked for on this command line: say where it came from.
            hint = (
                f"the configuration file's [migrate] daemon = true ({origin[5:]}) asks for "
                "the daemon: give --no-daemon to migrate in this process"
            )
        return control_client.ask(source_state_dir(args.vm_dir, args.state_dir), line, hint=hint)
    options = prepare(args)
    journal = host_journal(args.vm_dir, args.state_dir)
    outcome: dict[str, Any] = {}
    bar = control_client.ProgressBar(f"migrating {args.name}", shown=not args.no_progress)
    sessions: list[SourceProtocol] = []

    async def run(reactor: Any) -> None:
        await drive(
            reactor,
            args,
            options,
            journal,
            outcome,
            on_start=lambda departure: bar.start(departure.expected_bytes or 0),
            on_progress=bar.update,
            on_protocol=sessions.append,
        )

    def interrupted(reactor: Any) -> None:
        print(
            "securemig: interrupted: cancelling the migration, unless it already committed "
            "or its hypervisor already completed it (its result below says where the VM is; "
            "Ctrl-C again to exit at once)",
            file=sys.stderr,
        )
        cancel(reactor, outcome, sessions)

    run_interruptible(run, interrupted)
    bar.close()
    return conclude(args, journal, outcome)


# The shared core: ``securemig migrate`` runs it in its own process, and
# ``twistd securemig`` for ``migrate --daemon`` (app/control.py) in the
# daemon; each step writes its sentences to the streams it is given, so that
# both print exactly the same.


def check(args: argparse.Namespace, err: TextIO | None = None) -> int | None:
    """The checks the parser cannot make: None when the command line makes
    a migration, else the usage error's exit status (its sentence said on
    ``err``, default stderr).  Nothing is touched."""
    if not args.insecure and not args.identity:
        return usage_error(
            "choose the variant: --identity DIR for the secure one, or --insecure "
            "(no TLS, no attestation)",
            err,
        )
    # The validators twistd securemig shares (app/config.py): one sentence each.
    for option in ("chunk-kib", "idle-timeout", "deadline", "parallel", "crl-max-age", "crl"):
        if problem := config.refusal_of("migrate", option, getattr(args, option.replace("-", "_"))):
            return usage_error(problem, err)
    if args.live and args.insecure:
        return usage_error("--live is secure only: drop --insecure", err)
    if args.copy_storage and not args.live:
        return usage_error("--copy-storage goes with --live", err)
    if not args.live:
        # Live only: a suspended migration's images have one data channel
        # (the configuration file's default must not refuse them).
        args.parallel = 0
    if args.downtime_ms <= 0:
        return usage_error("--downtime-ms must be positive", err)
    try:
        parse_address(args.to)
        check_vm_name(args.name)
    except (ValueError, BundleError) as e:
        return usage_error(str(e), err)
    return None


def prepare(args: argparse.Namespace, err: TextIO | None = None) -> SourceOptions:
    """The checked command line's migration options (the identity checked,
    the revocation list fetched: blocking); :class:`~.common.CommandError`
    for an identity that cannot serve."""
    if args.identity:
        check_identity(args.identity)
    return source_options(args, err)


async def drive(
    reactor: Any,
    args: argparse.Namespace,
    options: SourceOptions,
    journal: Journal,
    outcome: dict[str, Any],
    *,
    err: TextIO | None = None,
    on_start: Callable[[Departure], None] = lambda d: None,
    on_progress: Callable[[int], None] = lambda n: None,
    on_protocol: Callable[[SourceProtocol], None] = lambda p: None,
    off_reactor: bool = False,
) -> None:
    """Run the migration the checked ``args`` ask for, recording in
    ``outcome`` how it ended (for :func:`conclude`): first what an earlier
    migrate that died left unfinished, then the migration itself
    (:func:`~securemig.transport.client.migrate`, its hooks passed on)."""
    started = time.monotonic()
    try:
        # What an earlier migrate that died left unfinished comes first:
        # it may give this VM back, or show that it was given away.
        await settle_here(journal, args.identity, err)
        gone = given_away(journal, args.name, args.vm_dir)
        if gone is not None:
            raise BundleError(gone)
        bundle = Bundle.find(args.vm_dir, args.name)
        # From here on a failure leaves the VM here, unlocked.
        outcome["stays"] = True
        if outcome.get("cancelled"):
            # Cancelled before anything was touched (an early Ctrl-C).
            outcome.update(CANCELLED_EARLY)
            return
        departure, finished = await migrate(
            reactor,
            bundle,
            options,
            journal=journal,
            on_progress=on_progress,
            on_start=on_start,
            on_protocol=on_protocol,
            off_reactor=off_reactor,
        )
    except (MigrationError, OSError) as e:
        # Another migration holds the VM: here, but not unlocked.
        outcome["locked"] = isinstance(e, VMLocked)
        outcome["error"] = describe(e)
        outcome["code"] = e.code.name if isinstance(e, MigrationError) else "IO_ERROR"
        return
    finally:
        outcome["over"] = True
    outcome["departure"] = departure
    outcome["finished"] = finished
    outcome["seconds"] = time.monotonic() - started


def conclude(
    args: argparse.Namespace,
    journal: Journal,
    outcome: dict[str, Any],
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Say how the migration :func:`drive` ran ended, on ``out`` and
    ``err`` (default: stdout and stderr), and return its exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    if "error" in outcome:
        return _report_refused(args, outcome, out, err)
    return _report(args, journal, outcome, out, err)


def source_options(args: argparse.Namespace, err: TextIO | None = None) -> SourceOptions:
    """The migration the checked command line (and configuration file) asks
    for, built once (the revocation list is fetched here); its warnings
    said on ``err`` (default: stderr)."""
    secure = None
    if args.identity and not args.insecure:
        secure = SecureOptions(
            args.identity,
            args.policy_dir,
            args.tofu,
            args.destination_name,
            _revocation(args, err),
            on_first_use=_first_use_on(err),
        )
    # Live migration moves RAM only (the disk, if any, stays on shared storage).
    shared = args.shared_storage or args.live
    # --live: --bandwidth is QEMU's max-bandwidth for its stream.
    limit = int(args.bandwidth * (1 << 20)) if args.bandwidth else LIVE_MAX_BANDWIDTH
    return SourceOptions(
        args.to,
        variant=wire.Variant.SHARED_STORAGE if shared else wire.Variant.FULL,
        chunk_size=args.chunk_kib * 1024,
        idle_timeout=IDLE_TIMEOUT if args.idle_timeout is None else args.idle_timeout,
        deadline=DEADLINE if args.deadline is None else args.deadline,
        secure=secure,
        unseal_with=args.identity if args.insecure else None,
        bandwidth=args.bandwidth * (1 << 20) if args.bandwidth else None,
        live=(args.downtime_ms, limit) if args.live else None,
        copy_storage=args.copy_storage,
        parallel=args.parallel,
    )


def _first_use_on(err: TextIO | None) -> Callable[[FirstUse], None]:
    """What says a trust on first use: on the terminal's stderr (as the
    attestor does), or on the stream ``err`` and in the log."""
    if err is None:
        return warn_on_stderr

    def warn(first_use: FirstUse) -> None:
        for line in first_use.lines():
            print(f"securemig: WARNING: {line}", file=err)
        log_first_use(first_use)

    return warn


def _report_refused(
    args: argparse.Namespace, outcome: dict[str, Any], out: TextIO, err: TextIO
) -> int:
    """A migration that failed before anything was sent (a key that does
    not unseal, a locked VM, no destination): said on stderr, where the VM
    is, and with ``--json`` also the summary (nothing moved)."""
    stays = outcome.get("stays", False)
    # A reason may end with a full stop (Twisted's "Connection refused."):
    # what follows it is part of the same sentence.
    reason = outcome["error"].rstrip(".") if stays else outcome["error"]
    if outcome.get("locked"):
        message = reason + "; the VM is still here, untouched (securemig jobs shows what holds it)"
    else:
        message = reason + ("; the VM is still here, unlocked" if stays else "")
    if args.json:
        summary = {
            "vm": args.name,
            "to": args.to,
            "protocol": "insecure" if args.insecure else "secure",
            "variant": "shared-storage" if args.shared_storage or args.live else "full",
            "mode": "live" if args.live else "suspended",
            "outcome": "aborted",
            "error": f"{outcome['code']}: {outcome['error']}",
            "vm_here": stays,
            "migration_id": None,
            "bytes": 0,
            "seconds": 0,
        }
        print(json.dumps(summary, indent=2), file=out)
    return error(message, err)


def _bandwidth(text: str) -> float:
    """An argument type: a positive number of MiB a second."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB/s") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of MiB/s")
    return value


def _revocation(args: argparse.Namespace, err: TextIO | None) -> RevocationList | None:
    """The revocation list to judge the destination by, fetched now; a
    failed fetch is said on stderr, and the list held (IDENTITY/crl.der)
    is used while it is not older than --crl-max-age."""
    revocation = revocation_for(
        args.identity, args.crl, Identity.load(args.identity).pca_url, args.crl_max_age
    )
    if revocation is None:
        print(
            f"securemig: WARNING: {args.identity} names no privacy CA URL: the destination's "
            "AK certificate is NOT checked for revocation (give --crl URL)",
            file=err or sys.stderr,
        )
        return None
    try:
        revocation.fetch()
    except CRLError as e:
        print(f"securemig: WARNING: revocation list: {e}", file=err or sys.stderr)
    return revocation


#: The reason a migration cancelled with Ctrl-C ends with.
INTERRUPTED = "interrupted by the operator (Ctrl-C)"

#: :func:`conclude`'s ``outcome`` of a migration cancelled before it was
#: started: nothing touched, nothing sent, the VM here.
CANCELLED_EARLY: dict[str, Any] = {
    "error": f"cancelled: {INTERRUPTED} before anything was sent",
    "code": ErrorCode.CANCELLED.name,
    "stays": True,
}


def cancel(reactor: Any, outcome: dict[str, Any], sessions: list[SourceProtocol]) -> None:
    """Cancel the migration :func:`drive` runs, whose connected session
    ``on_protocol`` put in ``sessions``, as a timeout would end it: the
    session fails with CANCELLED, tells the destination (ABORT), rolls back
    and is journaled.  Not connected yet: try again shortly, until the
    migration is over; not started yet: :func:`drive` does not start it.
    (Only this migration's session: a daemon drives others on the same
    reactor.)  Only the first call acts: one attempt chain a migration."""
    if outcome.get("cancelled"):
        return
    outcome["cancelled"] = True
    _cancel_sessions(reactor, outcome, sessions)


def _cancel_sessions(reactor: Any, outcome: dict[str, Any], sessions: list[SourceProtocol]) -> None:
    for proto in sessions:
        if not proto.session.finished:
            proto.fail(ProtocolError(ErrorCode.CANCELLED, INTERRUPTED))
    if not sessions and not outcome.get("over"):
        reactor.callLater(0.1, _cancel_sessions, reactor, outcome, sessions)


def _report(
    args: argparse.Namespace, journal: Journal, outcome: dict[str, Any], out: TextIO, err: TextIO
) -> int:
    """Say how the migration ended (a line, or the summary as JSON with
    ``--json``) and return the exit status that tells it."""
    departure, finished = outcome["departure"], outcome["finished"]
    record = journal.get(departure.id)
    seconds = outcome["seconds"]
    # What moved: all of it when done; of an aborted migration, what was
    # sent before it ended (the journal's count), not the total.
    moved = departure.total_bytes
    if finished.outcome is not Outcome.DONE and record is not None:
        moved = record.bytes
    mib = moved / (1 << 20)
    summary = {
        "vm": args.name,
        "to": args.to,
        "protocol": "insecure" if args.insecure else "secure",
        "variant": "shared-storage" if args.shared_storage or args.live else "full",
        "mode": "live" if args.live else "suspended",
        "outcome": finished.outcome.value,
        "error": f"{finished.code.name}: {finished.reason}" if finished.code else None,
        "migration_id": record.migration_id if record else None,
        "bytes": moved,
        "total_bytes": departure.total_bytes,
        "wire_bytes": departure.wire_bytes,
        "seconds": round(seconds, 4),
        "throughput_mibps": round(mib / seconds, 1) if seconds > 0 else None,
        "phases": {k: round(v, 4) for k, v in (record.phase_times() if record else {}).items()},
        "peak_rss_mib": peak_rss_mib(),
    }
    if departure.live_stats is not None:
        stats = departure.live_stats
        # QEMU's own numbers (query-migrate at the source).
        summary.update(
            downtime_ms=stats.downtime_ms,
            qemu_total_ms=stats.total_ms,
            qemu_setup_ms=stats.setup_ms,
            iterations=stats.iterations,
            dirty_pages_rate=stats.dirty_pages_rate,
            transferred=stats.transferred,
            # What QEMU sent on its multifd channels (0: one stream).
            multifd_bytes=getattr(stats, "multifd_bytes", 0),
            # The guest's own pause, bounded here: its stop to the DONE.
            guest_downtime_ms=departure.guest_downtime_ms,
        )
    if args.json:
        print(json.dumps(summary, indent=2), file=out)
    if finished.outcome is Outcome.DONE:
        if not args.json:
            if departure.live_stats is not None:
                stats = departure.live_stats
                print(
                    f"securemig: VM {args.name} migrated live to {args.to} (secure): "
                    f"{stats.transferred / (1 << 20):.0f} MiB in {seconds:.2f} s, downtime "
                    f"{stats.downtime_ms} ms (QEMU), {stats.iterations} rounds, migration "
                    f"{summary['migration_id']}",
                    file=out,
                )
                return EXIT_OK
            print(
                f"securemig: VM {args.name} migrated to {args.to} ({summary['variant']}, "
                f"{summary['protocol']}): {mib:.0f} MiB in {seconds:.2f} s "
                f"({summary['throughput_mibps']} MiB/s), migration {summary['migration_id']}",
                file=out,
            )
        return EXIT_OK
    if finished.outcome is Outcome.ABORTED:
        print(
            f"securemig: migration of VM {args.name} failed: {summary['error']}; "
            f"the VM is still at the source, unlocked",
            file=err,
        )
        return EXIT_FAILED
    if departure.undecided:
        # Live through libvirt, its libvirtd not answering where the guest
        # is, or the guest gone here before PREPARED: nothing was decided
        # (protocol.recovery.carried_decision); the reason says who decides.
        print(
            f"securemig: migration of VM {args.name} to {args.to} is in doubt, neither "
            f"committed nor aborted: {summary['error']} (`securemig status` shows it)",
            file=err,
        )
        return EXIT_IN_DOUBT
    print(
        f"securemig: VM {args.name} was committed to {args.to} but the destination did not "
        f"confirm: {summary['error']}; check `securemig status` there",
        file=err,
    )
    return EXIT_IN_DOUBT
