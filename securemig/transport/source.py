"""
The source's Twisted shell: one outgoing migration and its data channel.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, assert_never

from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from securemig import crashpoint
from securemig.crashpoint import CrashPoint
from securemig.host.contract import LeavingVM
from securemig.host.journal import PROGRESS_INTERVAL
from securemig.protocol import effects, records
from securemig.protocol import source as source_session
from securemig.protocol.connection import DEADLINE, IDLE_TIMEOUT, SourceConnection
from securemig.protocol.effects import SourceEffect
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.protocol.phases import Phase
from securemig.protocol.recovery import SourceGuest
from securemig.transport import tls
from securemig.transport.carried import CARRIED_EXPORTER_LABEL, CarrierSource
from securemig.transport.control import Connection, FramedProtocol, failure_to_error
from securemig.transport.executor import Executor
from securemig.transport.live import LiveSender
from securemig.transport.streamer import ImageStreamer
from securemig.transport.tcp import client_endpoint, connect, tcp_bytes_acked, tune_transport
from securemig.trust.keyrelease import MIGRATION_KEY_ROLE, SourceSecurity, check_offer, wrap

#: The reason a migration ended by ``securemig abort`` ends with.
ABORTED = "aborted by the operator (securemig abort)"


@implementer(IHandshakeListener)
class SourceProtocol(FramedProtocol[SourceEffect]):
    """The source's connection: drives one :class:`~securemig.protocol.session.SourceSession`.

    ``departure`` is the host side (lock, journal, commit, roll back; see
    :mod:`securemig.host.departure`).  ``finished`` fires with the final
    :class:`~securemig.protocol.session.Finished` effect.
    """

    connection: SourceConnection
    security: SourceSecurity | None

    def __init__(
        self,
        session: source_session.SourceSession,
        departure: LeavingVM,
        clock: IReactorTime,
        executor_factory: Callable[[], Executor],
        on_progress: Callable[[int], None] = lambda n: None,
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        security: SourceSecurity | None = None,
        data_connector: DataConnector | None = None,
        bandwidth: float | None = None,
    ) -> None:
        super().__init__(clock, SourceConnection(session, idle_timeout, deadline))
        self.security = security
        self.data_connector = data_connector or partial(connect_data_channel, clock)
        self.data_channel: DataChannelSender | None = None
        self.departure = departure
        self.executor_factory = executor_factory
        self.on_progress = on_progress
        #: Image bytes a second at most (None: no limit).
        self.bandwidth = bandwidth
        self.streamer: ImageStreamer | None = None
        self.live_sender: LiveSender | None = None
        #: Live, a carried backend: the carried sockets' source end.
        self.carrier: CarrierSource | None = None
        #: Live, the backend's own stream on multifd channels: each of its
        #: connections carried on its own (``--parallel``).
        self.channels: CarrierSource | None = None
        self.live_listen: Path | None = None
        self.finished: Deferred[effects.Finished] = Deferred()
        #: Fires when the control connection is closed: what was written
        #: to it (the last ABORT or COMMIT) has left this process.
        self.closed: Deferred[None] = Deferred()
        self.rolled_back: Deferred[None] | None = None
        self.bytes_sent = 0
        #: TCP payload bytes acknowledged by the destination, both
        #: connections, when the session finished (None where unknown).
        self.wire_bytes: int | None = None
        self._watch: Any = None
        self._bytes_journaled = 0

    @property
    def session(self) -> source_session.SourceSession:
        """The source session the connection object drives."""
        return self.connection.session

    def connectionMade(self) -> None:
        """Say HELLO."""
        super().connectionMade()
        self.departure.connected()
        self._watch = self.clock.callLater(PROGRESS_INTERVAL, self._look_at_journal)
        self.run(self.session.start())

    def log_context(self) -> dict[str, str | None]:
        """The departure's migration id (the destination's, once WELCOME
        gave it), journal id, VM and destination."""
        mid = self.session.migration_id
        return {
            "role": "source",
            "migration_id": mid.hex() if mid else None,
            "journal_id": self.departure.id,
            "vm": self.departure.bundle.name,
            "peer": self.departure.peer,
        }

    #: Secure: whether the TLS handshake completed (Twisted's TLS says so).
    handshake_done = False

    def handshakeCompleted(self) -> None:
        """TLS is up: a connection lost from now on is not a refusal of it."""
        self.handshake_done = True

    def _tls_refusal(self, reason: Failure) -> MigrationError | None:
        """Secure: a connection that ended before TLS was up, as the coded
        refusal it is: the destination's certificate failed its name check
        (ATTESTATION_FAILED), or the destination closed it before the
        handshake completed (its pre-authentication caps, e.g. the
        per-address one; CONNECTION_LOST saying so)."""
        if self.security is None or self.handshake_done or self.session.finished:
            return None
        if isinstance(reason.value, VerificationError):
            return ProtocolError(ErrorCode.ATTESTATION_FAILED, tls.describe_failure(reason))
        if not isinstance(reason.value, net_error.ConnectionDone | net_error.ConnectionLost):
            return ProtocolError(
                ErrorCode.CONNECTION_LOST,
                f"the TLS handshake failed: {tls.describe_failure(reason)}",
            )
        return ProtocolError(
            ErrorCode.CONNECTION_LOST,
            "the destination closed the connection before the TLS handshake completed: "
            "it is at its cap of pending connections from this address (or of all), or "
            "it is not a securemig destination; try again later",
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Also fire :attr:`closed`."""
        try:
            refusal = self._tls_refusal(reason)
            if refusal is not None:
                self.connection_open = False
                self.fail(refusal)
            super().connectionLost(reason)
        finally:
            if not self.closed.called:
                self.closed.callback(None)

    def _look_at_journal(self) -> None:
        """Every :data:`PROGRESS_INTERVAL` until the commit: journal the
        bytes sent (``securemig jobs``) and end the migration if ``securemig
        abort`` asked for it: the session fails with CANCELLED, which sends
        the destination ABORT and rolls back, as Ctrl-C does."""
        self._watch = None
        if self.session.finished or self.departure.committed:
            return
        journal, local_id = self.departure.journal, self.departure.id
        try:
            if self.bytes_sent != self._bytes_journaled:
                self._bytes_journaled = self.bytes_sent
                journal.progress(local_id, self.bytes_sent)
            aborted = journal.abort_requested(local_id)
        except sqlite3.Error as e:
            # Only the live view is late; the phases still go to the journal.
            self.log.warn("cannot read or update the journal: {e}", e=e)
            aborted = False
        if aborted:
            self.fail(ProtocolError(ErrorCode.CANCELLED, ABORTED))
            return
        self._watch = self.clock.callLater(PROGRESS_INTERVAL, self._look_at_journal)

    def carry_out(self, effect: SourceEffect) -> None:
        """Carry out one effect of the source's session."""
        match effect:
            case effects.Send() | effects.Attest() | effects.VerifyPeer():
                self.carry_out_common(effect)
            case effects.Finished():
                self._do_Finished(effect)
            case effects.StartStreams():
                self._do_StartStreams(effect)
            case effects.WrapKey():
                self._do_WrapKey(effect)
            case effects.CommitLocally():
                self._do_CommitLocally(effect)
            case effects.RollBack():
                self._do_RollBack(effect)
            case effects.StartLive():
                self._do_StartLive(effect)
            case _:
                assert_never(effect)

    def _do_StartStreams(self, effect: effects.StartStreams) -> None:
        self.departure.streaming(self.session.migration_id)
        if self.security is None or not self.session.data_port:
            self._stream(self.transport, None)
            return

        sealer = records.Sealer(*self.data_channel_key(), self.migration_id())
        self.data_channel = DataChannelSender(self)

        def connected(channel: DataChannelSender) -> None:
            if not self.session.finished:
                self._stream(channel.out, sealer)

        def failed(f: Failure) -> None:
            self.fail(
                ProtocolError(
                    ErrorCode.CONNECTION_LOST,
                    f"cannot open the data channel: {f.getErrorMessage()}",
                )
            )

        self.data_connector(
            self.out.getPeer().host, self.session.data_port, self.data_channel
        ).addCallbacks(connected, failed)

    def _do_StartLive(self, effect: effects.StartLive) -> None:
        # The destination's QEMU waits paused: start ours sending, through
        # records keyed for this session's live stream, to the port it named.
        departure = self.departure
        departure.streaming(self.session.migration_id)
        if departure.carried:
            self._start_carried(effect)
            return
        listen = departure.live_socket(f"{self.migration_id().hex()}-s")
        self.live_listen = listen

        def progress(n: int) -> None:
            self.bytes_sent += n
            self.touch()
            self.on_progress(n)

        if departure.parallel:
            # QEMU's main channel and each multifd channel connect to the
            # same socket: each is its own sealed stream (its own key from
            # the carried-socket exporter), at most parallel + 1 of them.
            cipher, key = self.data_channel_key(CARRIED_EXPORTER_LABEL)
            try:
                self.channels = CarrierSource(
                    self.clock,
                    {"memory": str(listen)},
                    self.out.getPeer().host,
                    effect.port,
                    cipher,
                    key,
                    self.migration_id(),
                    on_progress=progress,
                    limits={"memory": departure.parallel + 1},
                )
            except Exception as e:
                self.fail(ProtocolError(ErrorCode.LIVE_FAILED, f"cannot carry the stream: {e}"))
                return
        else:
            cipher, key = self.data_channel_key(records.LIVE_EXPORTER_LABEL)
            sealer = records.Sealer(cipher, key, self.migration_id())
            self.live_sender = LiveSender(
                self.clock, str(listen), self.out.getPeer().host, effect.port, sealer, progress
            )
        channels = self.channels

        async def start() -> None:
            await departure.start_live(f"unix:{listen}")
            try:
                await departure.live_sent()
            except MigrationError as e:
                if not self.session.finished:
                    errors = "; ".join(channels.errors) if channels is not None else ""
                    why = f"{e} ({errors})" if errors else str(e)
                    self.fail(ProtocolError(ErrorCode.LIVE_FAILED, why))

        def failed(f: Failure) -> None:
            self.fail(ProtocolError(ErrorCode.LIVE_FAILED, f.getErrorMessage()))

        Deferred.fromCoroutine(start()).addErrback(failed)

    def _start_carried(self, effect: effects.StartLive) -> None:
        # The destination's backend is ready (its secret defined, after key
        # release): listen on this migration's sockets, carry each connection
        # to the carrier port it named, keyed from this TLS session, and let
        # the hypervisor's own migration run through them.
        departure = self.departure
        tag = self.migration_id().hex()
        cipher, key = self.data_channel_key(CARRIED_EXPORTER_LABEL)

        def progress(n: int) -> None:
            self.bytes_sent += n
            self.touch()
            self.on_progress(n)

        try:
            listen = departure.carried_sockets(tag)
            carrier = CarrierSource(
                self.clock,
                listen,
                self.out.getPeer().host,
                effect.port,
                cipher,
                key,
                self.migration_id(),
                on_progress=progress,
            )
        except Exception as e:
            self.fail(ProtocolError(ErrorCode.LIVE_FAILED, f"cannot carry the migration: {e}"))
            return
        self.carrier = carrier

        async def start() -> None:
            await departure.start_live(tag)
            try:
                await departure.live_sent()
            except MigrationError as e:
                if self.session.finished:
                    return
                errors = "; ".join(carrier.errors)
                why = f"{e} ({errors})" if errors else str(e)
                guest = await departure.guest_here()
                if guest is not SourceGuest.RUNS and not self.session.finished:
                    # The job failed, yet the guest does not demonstrably
                    # run on here (its libvirtd died at completion, say):
                    # the destination may hold it whole.  Its PREPARED, or
                    # its ABORT, decides (carried_decision), not this error.
                    self.log.warn(
                        "the hypervisor's migration failed ({e}) and the guest is {where} "
                        "here: waiting for the destination's word",
                        e=why,
                        where=guest.value,
                    )
                    return
                if not self.session.finished:
                    self.fail(ProtocolError(ErrorCode.LIVE_FAILED, why))

        def failed(f: Failure) -> None:
            self.fail(ProtocolError(ErrorCode.LIVE_FAILED, f.getErrorMessage()))

        Deferred.fromCoroutine(start()).addErrback(failed)

    def _stream(self, transport: Any, sealer: records.Sealer | None) -> None:
        def progress(n: int) -> None:
            self.bytes_sent += n
            self.touch()
            self.on_progress(n)

        def done() -> None:
            if self.data_channel is not None:
                # Kept open until the end, to count its bytes on the wire.
                self.data_channel.done = True
            self.run(self.session.streams_sent())

        self.streamer = ImageStreamer(
            transport,
            self.departure.stream_files(),
            self.session.hello.chunk_size,
            self.executor_factory(),
            progress,
            done,
            self.fail,
            sealer,
            hashed=self.security is not None,
            bandwidth=self.bandwidth,
            clock=self.clock,
            send_timeout=self.connection.idle_timeout,
        )
        self.streamer.start()

    def data_channel_lost(self, detail: str) -> None:
        """The data channel ended before every stream was sent."""
        self.connection.data_channel_lost(detail, self.clock.seconds())
        self._schedule()

    def migration_id(self) -> bytes:
        """The id the destination gave this migration."""
        assert self.session.migration_id is not None
        return self.session.migration_id

    def peer_name(self) -> str:
        """The destination's name, which TLS already checked."""
        return self.secure().destination_name

    def secure(self) -> SourceSecurity:
        """This migration's security (key wrapping is the secure variant's)."""
        if self.security is None:
            raise ProtocolError(ErrorCode.INTERNAL, "the insecure variant wraps no key")
        return self.security

    def journal_phase(self, phase: Phase) -> None:
        """Record a phase in the source's journal."""
        self.departure.journal.phase(self.departure.id, phase)

    def _do_WrapKey(self, effect: effects.WrapKey) -> None:

        self.journal_phase(Phase.KEY_OFFERED)
        key = check_offer(
            effect.offer,
            self.peer_ak,
            self.qualifying(MIGRATION_KEY_ROLE, b""),
            self.attestor().pcrs,
            self.peer_values,
        )
        wrapped = wrap(key, self.secure().key_material(), self.migration_id())
        crashpoint.reached(CrashPoint.SOURCE_KEY_WRAPPED)
        self.run(self.session.key_wrapped(wrapped))

    def _do_CommitLocally(self, effect: effects.CommitLocally) -> None:
        def failed(f: Failure) -> None:
            error = failure_to_error(f, "committing at the source")
            if self.departure.committed:
                self.fail(error)  # after the commit point: in doubt
            elif not self.session.finished:
                self.log.warn("commit failed: {e}", e=error)
                self.run(self.session.commit_failed(error.code, error.reason))

        Deferred.fromCoroutine(self.departure.commit()).addCallbacks(
            lambda _: self.run(self.session.committed_locally()), failed
        )

    def _do_RollBack(self, effect: effects.RollBack) -> None:
        self._stop_streaming()
        self.rolled_back = self.departure.rollback()

    def _do_Finished(self, effect: effects.Finished) -> None:
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        if self.live_listen is not None:
            # This migration's own socket (the stream is over either way).
            self.live_listen.unlink(missing_ok=True)
        try:
            counts = [tcp_bytes_acked(self.transport)]
            if self.data_channel is not None:
                counts.append(tcp_bytes_acked(self.data_channel.transport))
            self.wire_bytes = None if None in counts else sum(c or 0 for c in counts)
            self._stop_streaming()
            self._close(effect)
            departure = self.departure
            if departure.committed and (
                departure.kept or (departure.live_started() and not departure.carried)
            ):
                # Live, after COMMITTED: the paused QEMU (or, a hypervisor
                # that ended its own, the domain's definition) was kept until
                # now; on DONE a QEMU's copy goes even if that QEMU has ended
                # since: the key and bundle must not outlive the hand-over.
                self.rolled_back = self._settle_live(effect)
            elif self.carrier is not None and self.rolled_back is not None:
                # The rollback learns whether the hypervisor moved the guest
                # anyway (then it commits): journal the outcome after it.
                nbytes = self.bytes_sent
                self.rolled_back.addBoth(
                    lambda _: self.departure.finish(effect, nbytes, effect.peer_settled)
                )
            elif (releasing := self.departure.released()) is not None:
                # After the commit the bundle's removal may still be under
                # way (it overlapped the destination's resume): journal the
                # outcome, and report it, once it is done.
                departure, nbytes = self.departure, self.bytes_sent
                self.rolled_back = releasing.addCallback(
                    lambda _: departure.finish(effect, nbytes, effect.peer_settled)
                ).addErrback(
                    lambda f: self.log.error(
                        "cannot journal the outcome: {e}", e=f.getErrorMessage()
                    )
                )
            else:
                self.departure.finish(effect, self.bytes_sent, effect.peer_settled)
        finally:
            # Whatever failed above, the caller must learn the outcome (nothing
            # else would: the session has ended).  Report it only once the VM
            # is back where it was (a resume).
            rolled_back = self.rolled_back or succeed(None)
            rolled_back.addBoth(lambda _: self.finished.callback(effect))

    def _settle_live(self, effect: effects.Finished) -> Deferred[None]:
        """DONE: the destination's guest runs; end ours and give the VM up,
        then journal done.  Anything else: keep ours paused for recovery
        (RESOLVE learns whether the guest runs there or never did)."""

        async def settle() -> None:
            try:
                if effect.outcome is effects.Outcome.DONE:
                    await self.departure.hand_over()
                else:
                    self.departure.keep_paused()
            except Exception as e:
                self.log.error("after the commit: {e}", e=e)
            finally:
                self.departure.finish(effect, self.bytes_sent, effect.peer_settled)

        return Deferred.fromCoroutine(settle())

    def _stop_streaming(self) -> None:
        if self.streamer is not None:
            self.streamer.stopProducing()
        if self.live_sender is not None and not self.departure.committed:
            self.live_sender.cut()
        if self.channels is not None and (self.session.finished or not self.departure.committed):
            self.channels.close()
        if self.carrier is not None and (self.session.finished or not self.departure.committed):
            self.carrier.close()
        channel = self.data_channel
        if (
            channel is not None
            and channel.transport is not None
            and channel.connected
            and not channel.cutting
        ):
            if channel.done:
                channel.out.loseConnection()
            else:
                # Cut short: the destination must learn why from our ABORT,
                # so the data channel is cut only once the control connection
                # (which carries it) has closed; cut first, it would be taken
                # for a truncated stream.
                channel.done = channel.cutting = True

                def cut(_: object) -> None:
                    if self.streamer is not None:
                        self.streamer.cut()
                    if channel.connected:
                        channel.out.abortConnection()

                self.closed.addBoth(cut)


#: Opens the source's data connection: (host, port, protocol) → Deferred(protocol).
DataConnector = Callable[[str, int, "DataChannelSender"], Deferred["DataChannelSender"]]


def connect_data_channel(
    reactor: Any, host: str, port: int, proto: DataChannelSender
) -> Deferred[DataChannelSender]:
    """Connect ``proto`` to a destination's data channel port over TCP."""
    return connect(client_endpoint(reactor, host, port), proto)


class DataChannelSender(Connection):
    """The source's data connection; it only sends (records, from the
    :class:`ImageStreamer`).  Losing it before the streams are sent fails
    the migration."""

    def __init__(self, control: SourceProtocol) -> None:
        self.control = control
        self.done = False
        #: To be cut once the control connection closed (see _stop_streaming).
        self.cutting = False

    def connectionMade(self) -> None:
        """Send in large pieces."""
        tune_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """The destination never sends on the data channel: a violation."""
        self.control.fail(ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "bytes on the data channel"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Cut before the streams were all sent: the migration cannot go on.
        The destination cuts it when it refuses, so its ABORT may still be
        on the control connection: the connection object waits for it."""
        if not self.done:
            self.control.data_channel_lost(reason.getErrorMessage())
