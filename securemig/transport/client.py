"""
The source's side of a connection: reach a destination and run one migration.

:func:`migrate` wires a :class:`~securemig.host.departure.Departure` (the VM
leaving this host) to a :class:`~securemig.transport.source.SourceProtocol`
over TCP, or over mutual TLS for the secure variant, and fires when the
session ends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from securemig import files
from securemig.host.departure import Departure, check_keys, has_vtpm_key, unseal_vtpm_key
from securemig.host.journal import Journal, driven
from securemig.host.recovery import Owed, acknowledge
from securemig.hypervisor.bundle import Bundle
from securemig.protocol import wire
from securemig.protocol.effects import Finished, Outcome
from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.protocol.source import SourceSession
from securemig.transport import tls
from securemig.transport.executor import ThreadExecutor
from securemig.transport.options import SourceOptions
from securemig.transport.resolve import resolve
from securemig.transport.source import SourceProtocol
from securemig.transport.tcp import client_endpoint, connect

log = Logger()

T = TypeVar("T")


class ConnectFailed(LocalFault):
    """The destination could not be reached; nothing was sent."""

    default_code = ErrorCode.CONNECTION_LOST


async def migrate(
    reactor: object,
    bundle: Bundle,
    options: SourceOptions,
    *,
    journal: Journal,
    on_progress: Callable[[int], None] = lambda n: None,
    on_start: Callable[[Departure], None] = lambda d: None,
    on_protocol: Callable[[SourceProtocol], None] = lambda p: None,
    off_reactor: bool = False,
) -> tuple[Departure, Finished]:
    """Migrate ``bundle`` to ``options.to`` (``HOST:PORT``): over mutual TLS
    with attestation and vTPM key release when ``options.secure`` is given,
    else over the insecure variant.

    Fires with the departure and the session's final effect.  Raises
    :class:`VMLocked` or :class:`~securemig.hypervisor.bundle.BundleError` before
    anything is sent, :class:`ConnectFailed` if the destination cannot be
    reached (the VM stays here in every one of those cases).

    ``on_protocol`` is handed the session's protocol once it is connected:
    the handle that cancels this migration and no other
    (``SourceProtocol.fail``).  With ``off_reactor`` the blocking
    preparation (the TPM's unseal of the vTPM key) runs in a thread, for a
    caller whose reactor serves other work (the daemon).
    """
    to, variant, secure = options.to, options.variant, options.secure
    unseal_with, live = options.unseal_with, options.live
    host, port = parse_address(to)
    check_keys(bundle, secure=secure is not None, live=live is not None, unseal_with=unseal_with)
    # Keys are unsealed before the VM is touched: nothing to undo if that fails.
    security = None
    if secure is not None:
        security = await _blocking(reactor, off_reactor, secure.prepare, bundle, host)
    clear_key = None
    if secure is None and has_vtpm_key(bundle) and unseal_with is not None:
        clear_key = await _blocking(reactor, off_reactor, unseal_vtpm_key, bundle, unseal_with)
    vtpm_key: bytes | None = None
    if security is not None:
        vtpm_key = security.secret
    else:
        # The key without the identity after it (a libvirt domain's secret,
        # of any length, has none): the whole key, for the rollback.
        identity = len(bytes.fromhex(bundle.manifest.vtpm or ""))
        vtpm_key = clear_key and clear_key[: len(clear_key) - identity]
    departure = Departure(
        bundle,
        variant,
        to,
        "secure" if secure else "insecure",
        journal,
        vtpm_key or None,
        peer_name=security.destination_name if security is not None else None,
        live=live is not None,
        live_options=live,
    )
    departure.copy_storage, departure.parallel = options.copy_storage, options.parallel
    # The copy given up here is removed once the last journal write is
    # done (files.removals_deferred): its unlinking stalls every fsync.
    with files.removals_deferred(bundle.path.parent):
        try:
            await departure.acquire()
            if security is not None:
                try:
                    departure.hand_shared_disk(
                        security.attestor.identity.name, security.destination_name
                    )
                except BaseException as e:
                    await departure.rollback()
                    departure.refused(e)
                    raise
            on_start(departure)
            session = SourceSession(
                departure.hello(options.chunk_size),
                secure=security is not None,
                clear_key=clear_key,
                # What to ask the destination to quote: the source's policy for it,
                # and the PCRs its migration key is bound to.
                request=(
                    (lambda: security.attestor.request_for(security.destination_name, binding=True))
                    if security is not None
                    else None
                ),
            )
            proto = SourceProtocol(
                session,
                departure,
                reactor,  # type: ignore[arg-type]
                lambda: ThreadExecutor(reactor),  # type: ignore[arg-type]
                on_progress,
                idle_timeout=options.idle_timeout,
                deadline=options.deadline,
                security=security,
                bandwidth=options.bandwidth,
            )
            endpoint: Any = client_endpoint(reactor, host, port)
            if security is not None:
                assert secure is not None
                endpoint = wrapClientTLS(
                    tls.client_options(secure.identity, security.destination_name), endpoint
                )
            try:
                await connect(endpoint, proto)
            except Exception as e:
                await departure.rollback()
                departure.journal.finish(
                    departure.id, "aborted", error=f"CONNECTION_LOST: cannot connect to {to}: {e}"
                )
                raise ConnectFailed(f"cannot connect to {to}: {e}") from None
            on_protocol(proto)
            result = await proto.finished
            # Twisted sends what was written on a later turn of the reactor: a
            # caller that stops it at once (securemig migrate) would lose an ABORT
            # from a timer (securemig abort, Ctrl-C) or the last COMMIT.  The
            # connection is closed once they are out; not waiting longer than
            # CLOSE_WAIT for a peer that does not close.
            closed = proto.closed
            closed.addTimeout(CLOSE_WAIT, reactor)  # type: ignore[arg-type]
            closed.addErrback(_late_close)
            await closed
            departure.wire_bytes = proto.wire_bytes
            if departure.committed and result.outcome is Outcome.ABORTED:
                # The hypervisor moved the guest before the session could commit
                # (Departure.moved_by_hypervisor): committed here, in doubt there.
                result = Finished(Outcome.IN_DOUBT, result.code, result.reason)
            if departure.undecided and result.outcome is Outcome.ABORTED:
                # Nothing decided (carried_decision): said as it is, never "aborted".
                result = Finished(
                    Outcome.IN_DOUBT,
                    result.code,
                    f"{result.reason}; {departure.undecided_why}: neither committed nor aborted",
                )
            if live is not None and departure.committed and result.outcome is not Outcome.DONE:
                assert secure is not None
                result = await _settle_live_now(reactor, departure, result, secure.identity)
            return departure, result
        finally:
            # Over (its release, if any, done or failed): what it left unfinished
            # is recovery's now, in this process too (a daemon drives migrate --daemon).
            if departure.id:
                driven(departure.id)


async def _settle_live_now(
    reactor: Any, departure: Departure, result: Finished, identity: Path
) -> Finished:
    """Live, committed, no DONE: the paused QEMU is kept here.  Ask the
    destination at once (one RESOLVE) rather than leave the guest paused
    until this host's daemon does: ``done`` (its guest runs) gives this copy
    up; ``lost`` (its QEMU ended before the guest ran there) continues the
    guest here.  Anything else: in doubt, for the daemon, as before."""
    kept = departure.kept if departure.carried else await departure.live_qemu_alive()
    if not kept:
        return result
    record = departure.journal.get(departure.id)
    if record is None or record.migration_id is None:
        return result
    owed = Owed(record, wire.Decision.COMMITTED)
    try:
        answer = await resolve(reactor, owed, identity, timeout=RESOLVE_NOW_TIMEOUT)
        settled = await acknowledge(departure.journal, owed, answer)
    except Exception as e:
        log.warn("committed, in doubt: {e}; this host's daemon settles it", e=e)
        return result
    if not settled:
        return result
    if answer.settled is wire.Settled.LOST:
        if departure.carried:
            # Its hypervisor ended the guest here when it completed (it
            # commits only then): there is no paused copy to continue, only
            # its disks and vTPM state.
            name = departure.bundle.name
            return Finished(
                Outcome.ABORTED,
                ErrorCode.LIVE_FAILED,
                "the destination's QEMU ended before its guest ran there, after the "
                "hypervisor had ended it here: its memory is lost; `securemig vm start "
                f"{name}` boots it here from its disks and vTPM state",
                peer_settled=True,
            )
        return Finished(
            Outcome.ABORTED,
            ErrorCode.LIVE_FAILED,
            "the destination's QEMU ended before its guest ran there; the guest continued here",
            peer_settled=True,
        )
    if answer.settled is wire.Settled.DONE:
        return Finished(Outcome.DONE, peer_settled=True)
    return result


async def _blocking(reactor: Any, off_reactor: bool, f: Callable[..., T], *args: Any) -> T:
    """``f(*args)``: in the reactor's thread pool with ``off_reactor``, else here."""
    if not off_reactor:
        return f(*args)
    result: T = await deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return result


def _late_close(failure: Failure) -> Failure | None:
    """Not closed within :data:`CLOSE_WAIT`: go on (any other failure stays one)."""
    return None if isinstance(failure.value, defer.TimeoutError) else failure


#: Seconds the source waits for the one RESOLVE it sends itself (live, no DONE).
RESOLVE_NOW_TIMEOUT = 10.0


#: Seconds :func:`migrate` waits, after the session's end, for its control
#: connection to close (its last message flushed).
CLOSE_WAIT = 3.0


def parse_address(to: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a clear error."""
    host, sep, port = to.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"destination {to!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
