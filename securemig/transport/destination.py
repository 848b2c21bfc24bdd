"""
The destination's Twisted shell: one incoming migration and its data channel.

:class:`DestinationProtocol` feeds the bytes of the control connection, and
of every connection to the data port, to one
:class:`~securemig.protocol.connection.DestinationConnection` (sans-IO: the
decoders, the session, the channel rules, the clocks), and carries out the
effects it returns.

Data path, and why it looks like this:

- The source streams each image with :class:`ImageStreamer`, a *push*
  producer: whenever the transport wants data it reads one large chunk,
  hashes it, and writes header and chunk with ``writeSequence`` so the chunk
  is never copied into a frame.  (Twisted's ``FileSender`` is a pull producer
  with 16 KiB chunks; it costs a Python round trip per 16 KiB.)
- The destination never writes files on the reactor thread.  Each
  connection gets its own single-thread pool (a shared pool could reorder
  one file's writes); chunks are queued to it in order, written (and
  hashed, where the stream's SHA-256 is checked) in the same pass.  When
  more than ``high_water`` bytes are queued the destination pauses the
  transport, so TCP's window pushes back on the source and memory is
  bounded by the window, not by the image.
- Secure variant: the images go on a data channel of their own
  (:class:`DataChannelSender` → :class:`DataChannelReceiver`), sealed into
  AEAD records by :mod:`securemig.protocol.records` on the source's worker
  thread, which also sends them (on a duplicate of the socket's descriptor,
  from buffers it reuses); Twisted's TLS would cost a Python round trip per
  16 KiB record.  The
  destination opens records on the reactor thread
  (:class:`~securemig.protocol.channels.DataChannelReader`) and hands their
  frames to the same session as if they had come on the control connection.
  Until the wrapped key is accepted no data connection is read: each is
  paused from the moment it connects, and resumed when WRAPPED_KEY (which
  travels on the other connection, and may come later) has been accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, assert_never

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from securemig import crashpoint, metrics
from securemig.crashpoint import CrashPoint
from securemig.host.contract import ArrivalHost, ArrivingVM, KeySealer, VtpmKey
from securemig.host.journal import PROGRESS_INTERVAL
from securemig.protocol import destination as destination_session
from securemig.protocol import effects, records, wire
from securemig.protocol.connection import (
    DataChannelBound,
    DataConnection,
    DestinationConnection,
    DropDataConnection,
)
from securemig.protocol.effects import DestinationEffect
from securemig.protocol.errors import ErrorCode, MigrationError, ProtocolError
from securemig.protocol.phases import Phase
from securemig.transport.carried import CARRIED_EXPORTER_LABEL, CarrierDestination
from securemig.transport.control import Connection, FramedProtocol, failure_to_error
from securemig.transport.executor import Executor, ThreadExecutor
from securemig.transport.live import LIVE_RECORD_PLAINTEXT, LiveReceiver
from securemig.transport.options import DestinationOptions, ListeningPort
from securemig.transport.tcp import BOUND_DATA_READ_SIZE, tune_transport
from securemig.transport.tls import peer_names
from securemig.trust.keyrelease import MIGRATION_KEY_ROLE, DestinationSecurity

T = TypeVar("T")


@implementer(IHandshakeListener)
class DestinationProtocol(FramedProtocol[DestinationEffect]):
    """One incoming migration, on a destination.

    Secure variant: the source rules that its TLS certificate alone can
    settle (``--allow-source``; a certificate that names no host, which the
    AK certificate's host name must equal) are checked when the handshake
    completes (:meth:`handshakeCompleted`, called by Twisted's TLS before it
    delivers any application byte); until they pass the connection object
    decodes nothing.
    """

    connection: DestinationConnection
    security: DestinationSecurity | None

    def __init__(
        self,
        host: ArrivalHost,
        clock: IReactorTime,
        executor_factory: Callable[[], Executor],
        options: DestinationOptions = DestinationOptions(),  # noqa: B008 (frozen)
    ) -> None:
        security = options.security
        session = destination_session.DestinationSession(
            secure=security is not None,
            # What to ask the source to quote: this host's policy for it.
            request=lambda: self.attestor().request_for(self.peer_name()),
        )
        connection = DestinationConnection(
            session, options.idle_timeout, options.deadline, check_peer=security is not None
        )
        super().__init__(clock, connection)
        self.options = options
        self.security = security
        self.key_keeper = options.key_keeper
        self.data_listener = options.data_listener if security is not None else None
        #: The data channel: its listening port, the connections to it not
        #: yet dropped, and the one that proved it holds the key.
        self.data_port: ListeningPort | None = None
        self.data_receivers: list[DataChannelReceiver] = []
        self.data_channel: DataChannelReceiver | None = None
        #: Live mode: the stream's receiver.
        self.live_receiver: LiveReceiver | None = None
        #: Live, a carried backend: the carried sockets' destination end.
        self.carrier: CarrierDestination | None = None
        #: Live, carried: the released key was sealed into staging at the
        #: start (the prepare need not release, check or seal it again).
        self.carried_key_kept = False
        #: A recovery connection: the RESOLVE and the answer it got.
        self.resolved: tuple[wire.Resolve | wire.Ask, wire.Resolved] | None = None
        self.host = host
        self.protocol_name = options.protocol_name
        self.executor_factory = executor_factory
        self.high_water = options.high_water
        self.arrival: ArrivingVM | None = None
        self.executor: Executor | None = None
        #: Live: the thread of the vTPM's EK check (its swtpm, started
        #: ahead there, dies with it).
        self.vtpm_checker: Executor | None = None
        self.queued = 0
        self.reading_paused = False
        self.progress_journaled = 0.0

    @property
    def session(self) -> destination_session.DestinationSession:
        """The destination session the connection object drives."""
        return self.connection.session

    def log_context(self) -> dict[str, str | None]:
        """The arrival's migration id, VM and source (address, and name once verified)."""
        hello = self.session.hello
        name = self._name_or_none() if self.security is not None else None
        return {
            "role": "destination",
            "migration_id": self.arrival.id if self.arrival else None,
            "vm": hello.vm_name if hello else None,
            "peer": f"{name} ({self._peer()})" if name else self._peer(),
        }

    def _name_or_none(self) -> str | None:
        try:
            return self.peer_name()
        except Exception:
            return None

    def _peer(self) -> str:
        peer = self.out.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def migration_id(self) -> bytes:
        """The id this destination gave the migration."""
        return self.admitted().migration_id

    def peer_name(self) -> str:
        """The source's name from its verified TLS certificate."""

        names = peer_names(self.transport)
        if not names:
            raise ProtocolError(
                ErrorCode.ATTESTATION_FAILED, "the source's certificate names no host"
            )
        return names[0]

    def handshakeCompleted(self) -> None:
        """TLS is up: refuse a source the certificate rules do not allow,
        before any of its bytes is decoded (it learns nothing of the
        decoder; it gets an ABORT with the reason and the connection closes)."""
        try:
            self.secure().check_source(self.peer_name())
        except ProtocolError as e:
            self.log.info("refused source {peer}: {reason}", peer=self._peer(), reason=e.reason)
            self._journal_refusal(None, e)
            self._run_reporting(self.connection.fail(e))
            self._schedule()
            return
        self.connection.peer_allowed()

    def carry_out(self, effect: DestinationEffect) -> None:
        """Carry out one effect of the destination's session."""
        match effect:
            case effects.Send() | effects.Attest() | effects.VerifyPeer():
                self.carry_out_common(effect)
            case effects.Finished():
                self._do_Finished(effect)
            case effects.Admit():
                self._do_Admit(effect)
            case effects.OfferKey():
                self._do_OfferKey(effect)
            case effects.AcceptKey():
                self._do_AcceptKey(effect)
            case effects.OpenStream():
                self._do_OpenStream(effect)
            case effects.WriteChunk():
                self._do_WriteChunk(effect)
            case effects.CloseStream():
                self._do_CloseStream(effect)
            case effects.Prepare():
                self._do_Prepare(effect)
            case effects.CommitInPlace():
                self._do_CommitInPlace(effect)
            case effects.Discard():
                self._do_Discard(effect)
            case effects.HoldInDoubt():
                self._do_HoldInDoubt(effect)
            case effects.Settle():
                self._do_Settle(effect)
            case effects.StartIncoming():
                self._do_StartIncoming(effect)
            case _:
                assert_never(effect)

    def secure(self) -> DestinationSecurity:
        """This listener's security (the handshake and the key offer are
        the secure variant's)."""
        if self.security is None:
            raise ProtocolError(ErrorCode.INTERNAL, "the insecure variant has no TLS peer")
        return self.security

    def source_identity(self) -> str:
        """Who the source is, as RESOLVE must prove again: its attested TLS
        name (secure variant), or only its address (the insecure twin)."""
        if self.security is not None:
            return self.peer_name()
        return str(getattr(self.out.getPeer(), "host", ""))

    def _do_Settle(self, effect: effects.Settle) -> None:
        d = Deferred.fromCoroutine(
            self.host.resolve(effect.resolve, self.source_identity(), self.protocol_name)
        )

        def failed(f: Failure) -> None:
            self.fail(failure_to_error(f, "settling a migration"))

        def answered(answer: wire.Resolved) -> None:
            self.resolved = (effect.resolve, answer)
            self.run(self.session.settled(answer))

        d.addCallbacks(answered, failed)

    def _do_OfferKey(self, effect: effects.OfferKey) -> None:

        qualifying = self.qualifying(MIGRATION_KEY_ROLE, b"")
        offer = self.secure().key.offer(self.attestor().identity.ak, qualifying)
        self.run(self.session.key_offered(offer))

    def _do_StartIncoming(self, effect: effects.StartIncoming) -> None:
        # Live: the key is released to us now (unwrapped inside our TPM, in
        # the attested state), to start the vTPM the stream will fill.
        arrival = self.admitted()
        released = arrival.release_key(self.security, live=True)
        cipher, stream_key = self.data_channel_key(records.LIVE_EXPORTER_LABEL)
        migration_id = self.migration_id()

        def new_opener() -> records.Opener:
            return records.Opener(cipher, stream_key, migration_id, LIVE_RECORD_PLAINTEXT)

        if arrival.carried:
            self._start_carried(arrival, released)
            return

        # Re-sealed to our TPM now, while the guest still runs at the source,
        # not on the switchover path: the prepare writes what this seals.
        announced = released.identity.hex() if released.identity else None
        arrival.keep_key(self.keeper_or_refuse(), released, announced)
        if arrival.multifd:
            self._start_channels(arrival, released)
            return

        def open_stream() -> tuple[int, Callable[[], str]]:
            receiver = LiveReceiver(
                self.clock,
                str(arrival.live_socket),
                new_opener,
                interface=self.out.getHost().host,
                on_progress=lambda n: self.touch(),
                listen=self.options.live_listener,
            )
            self.live_receiver = receiver
            receiver.done.addCallback(lambda _: self._live_unbound(receiver))
            return receiver.address[
                1
            ], lambda: f" ({receiver.error})" if receiver.error is not None else ""

        self._receive_live(arrival, released, open_stream)

    def _start_channels(self, arrival: ArrivingVM, released: VtpmKey) -> None:
        # The backend's own stream on multifd channels: its QEMU waits for
        # its main channel and every multifd channel on one socket; each of
        # the source's connections is carried as its own sealed stream (the
        # carried sockets' machinery, socket "memory"), exactly channels + 1
        # of them, and only an authenticated one reaches QEMU.
        cipher, key = self.data_channel_key(CARRIED_EXPORTER_LABEL)
        migration_id = self.migration_id()

        def open_stream() -> tuple[int, Callable[[], str]]:
            assert arrival.live_socket is not None
            carrier = CarrierDestination(
                self.clock,
                {"memory": str(arrival.live_socket)},
                cipher,
                key,
                migration_id,
                interface=self.out.getHost().host,
                on_progress=lambda n: self.touch(),
                limits={"memory": arrival.multifd + 1},
                listen=self.options.live_listener,
                expected=arrival.multifd + 1,
            )
            self.carrier = carrier
            return carrier.address[
                1
            ], lambda: f" ({'; '.join(carrier.errors)})" if carrier.errors else ""

        self._receive_live(arrival, released, open_stream)

    def _receive_live(
        self,
        arrival: ArrivingVM,
        released: VtpmKey,
        open_stream: Callable[[], tuple[int, Callable[[], str]]],
    ) -> None:
        """Start the backend's incoming QEMU, open what carries its stream
        (``open_stream``: the port it listens on, and what its refusals
        were), and announce it; then wait until the whole stream loaded."""

        async def start() -> None:
            await arrival.start_incoming(released)
            if self.session.finished:
                return  # ended meanwhile: the discard ends this guest too
            port, refusals = open_stream()
            arrival.incoming_started()
            self.run(self.session.incoming_ready(port))
            if not self.session.finished:
                # The EK check's swtpm starts now, on a thread of its own,
                # while the stream runs: at the switchover only its read of
                # the state that arrived remains.
                self.vtpm_checker = self.executor_factory()
                self.vtpm_checker.submit(arrival.start_vtpm_check, released).addErrback(
                    lambda f: self.log.warn(
                        "vTPM check not started ahead: {e}", e=f.getErrorMessage()
                    )
                )
            try:
                await arrival.wait_loaded()
            except MigrationError as e:
                raise ProtocolError(ErrorCode.LIVE_FAILED, f"{e}{refusals()}") from None
            if not self.session.finished:
                self.run(self.session.incoming_loaded())

        def failed(f: Failure) -> None:
            if not self.session.finished:
                self.fail(failure_to_error(f, "receiving the live stream"))

        Deferred.fromCoroutine(start()).addErrback(failed)

    def _start_carried(self, arrival: ArrivingVM, released: VtpmKey) -> None:
        # The hypervisor's own migration: its backend takes the released
        # material whole as its secret (libvirt's is 1 to 128 bytes, with no
        # vTPM identity after it), sealed to our TPM at once (staging holds it
        # from the start: a completed arrival may be rolled forward before
        # PREPARED); then the carrier dials its sockets for what the source
        # carries, keyed from this TLS session.
        arrival.keep_key(
            self.keeper_or_refuse(), VtpmKey(released.secret + released.identity, b""), None
        )
        self.carried_key_kept = True
        cipher, key = self.data_channel_key(CARRIED_EXPORTER_LABEL)
        migration_id = self.migration_id()

        async def start() -> None:
            await arrival.start_incoming(released)
            if self.session.finished:
                return  # ended meanwhile: the discard removes what the hypervisor made
            carrier = CarrierDestination(
                self.clock,
                arrival.carried_sockets(),
                cipher,
                key,
                migration_id,
                interface=self.out.getHost().host,
                on_progress=lambda n: self.touch(),
                listen=self.options.live_listener,
                expected=arrival.carried_connections,
            )
            self.carrier = carrier
            arrival.incoming_started()
            self.run(self.session.incoming_ready(carrier.address[1]))
            try:
                await arrival.wait_loaded()
            except MigrationError as e:
                refused = f" ({'; '.join(carrier.errors)})" if carrier.errors else ""
                raise ProtocolError(ErrorCode.LIVE_FAILED, f"{e}{refused}") from None
            arrival.loaded()
            if not self.session.finished:
                self.run(self.session.incoming_loaded())

        def failed(f: Failure) -> None:
            if not self.session.finished:
                self.fail(failure_to_error(f, "receiving the live migration"))

        Deferred.fromCoroutine(start()).addErrback(failed)

    def _live_unbound(self, receiver: LiveReceiver) -> None:
        # No connection proved the key in time: QEMU's incoming socket was
        # never connected, so its migration would wait; the session ends.
        if receiver.error is not None and not receiver.reached_qemu and not self.session.finished:
            self.fail(ProtocolError(ErrorCode.LIVE_FAILED, str(receiver.error)))

    def _do_AcceptKey(self, effect: effects.AcceptKey) -> None:
        self.admitted().accept_key(effect.wrapped, self.session.bytes_received)

    def journal_phase(self, phase: Phase) -> None:
        """Record a phase in the destination's journal."""
        self.admitted().journal_phase(phase, self.session.bytes_received)

    def admitted(self) -> ArrivingVM:
        """The arrival this connection admitted (an effect that needs one
        comes only after the admission)."""
        if self.arrival is None:
            raise ProtocolError(ErrorCode.INTERNAL, "no arrival was admitted")
        return self.arrival

    def _submit(
        self,
        doing: str,
        fn: Callable[..., T],
        *args: object,
        then: Callable[[T], None] | None = None,
    ) -> None:
        """Run ``fn(*args)`` on the disk executor, then ``then(result)`` on
        the reactor thread unless the session has ended meanwhile; a failure
        of either fails the session, saying what was being done."""
        assert self.executor is not None

        def done(result: T) -> None:
            self.touch()
            if then is not None and not self.session.finished:
                try:
                    then(result)
                except Exception as e:
                    self.fail(failure_to_error(e, doing))

        def failed(failure: Failure) -> None:
            self.fail(failure_to_error(failure, doing))

        self.executor.submit(fn, *args).addCallbacks(done, failed)

    def _do_Admit(self, effect: effects.Admit) -> None:
        try:
            # Secure: the source rules were checked at the handshake.
            arrival = self.host.admit(
                effect.hello,
                self._peer(),
                self.protocol_name,
                self.source_identity(),
                keeps_keys=self.keeper() is not None,
            )
        except ProtocolError as e:
            self.log.info("refused VM {vm}: {reason}", vm=effect.hello.vm_name, reason=e.reason)
            self._journal_refusal(effect.hello.vm_name, e)
            self.run(self.session.refused(e.code, e.reason))
            return
        self.arrival = arrival
        self.high_water = max(self.high_water, 2 * effect.hello.chunk_size)
        self.executor = self.executor_factory()
        if self.data_listener is not None and effect.hello.mode is not wire.Mode.LIVE:
            # On the address the source reached us at; a port of its own.
            self.data_port = self.data_listener(self.out.getHost().host, DataChannelFactory(self))
            port = self.data_port.getHost().port
            self.log.info(
                "data channel of migration {mid} on port {port}",
                mid=arrival.id,
                port=port,
            )
            self.connection.offer_data_channel(port)
        crashpoint.reached(CrashPoint.DESTINATION_ADMITTED)
        self.run(self.session.admitted(arrival.migration_id))

    def _journal_refusal(self, vm: str | None, e: ProtocolError) -> None:
        """Journal an arrival refused before admission (at the handshake, by
        ``--allow-source``: no VM named yet; or at HELLO); ``securemig status``
        shows it.  A journal that cannot take it is logged; the refusal stands."""
        metrics.REFUSALS.labels(e.code.name).inc()
        name = None
        if self.security is not None:
            try:
                name = self.peer_name()
            except ProtocolError:
                name = None  # a certificate naming no host: its address only
        try:
            self.host.journal.refused(
                peer=self._peer(),
                peer_name=name,
                vm=vm,
                code=e.code.name,
                reason=e.reason,
            )
        except Exception as failure:
            self.log.error("cannot journal the refusal: {e}", e=failure)

    # -- the data channel (secure variant; see securemig.protocol.channels)

    def dataReceived(self, data: bytes) -> None:
        """Control bytes; once they brought the wrapped key, read the data channel."""
        super().dataReceived(data)
        self._read_data_channel()

    def data_connection_made(self, receiver: DataChannelReceiver) -> DataConnection | None:
        """A connection to the data port: its records keyed from this TLS
        session; paused while the wrapped key is pending.  None: close it."""
        if self.session.finished or self.arrival is None:
            return None
        connection = self.connection.data_connection(
            *self.data_channel_key(), self.migration_id(), self.clock.seconds()
        )
        self._apply_drops()
        if connection is not None:
            self.data_receivers.append(receiver)
            if self.connection.data_channel_held:
                receiver.out.pauseProducing()
                receiver.held = True
        return connection

    def data_received(self, receiver: DataChannelReceiver, data: bytes) -> None:
        """Bytes from a data connection, read now unless it is held."""
        assert receiver.channel is not None
        self.connection.data_received(receiver.channel, data, self.clock.seconds())
        self._drain_data(receiver)

    def data_connection_lost(self, receiver: DataChannelReceiver) -> None:
        """A data connection ended (the data channel must have sent END)."""
        if receiver in self.data_receivers:
            self.data_receivers.remove(receiver)
        assert receiver.channel is not None
        self._run_reporting(self.connection.data_connection_lost(receiver.channel))
        self._schedule()

    def _read_data_channel(self) -> None:
        # WRAPPED_KEY accepted: resume the connections held since they
        # connected, and read what a transport that did not pause delivered.
        if self.connection.data_channel_held:
            return
        for receiver in list(self.data_receivers):
            if receiver.held:
                receiver.held = False
                receiver.out.resumeProducing()
                self._drain_data(receiver)

    def _drain_data(self, receiver: DataChannelReceiver) -> None:
        assert receiver.channel is not None
        while (batch := self.connection.next_data_batch(receiver.channel)) is not None:
            match batch:
                case DataChannelBound():
                    self._bind(receiver)
                case DropDataConnection(reason=reason):
                    self._drop(receiver, reason)
                    return
                case _:
                    self._run_reporting(batch)
        self._apply_drops()
        self._schedule()

    def _apply_drops(self) -> None:
        # Close what the connection object let go: strangers past their
        # first-record deadline, above the cap, or after the channel bound
        # or the migration ended.
        for connection, reason in self.connection.take_drops():
            for receiver in self.data_receivers:
                if receiver.channel is connection:
                    self._drop(receiver, reason)
                    break

    def _on_timer(self) -> None:
        super()._on_timer()
        self._apply_drops()

    def _bind(self, receiver: DataChannelReceiver) -> None:
        # It proved it holds the key: it is the channel; the port closes.
        self.data_channel = receiver
        tune_transport(receiver.transport, read_size=BOUND_DATA_READ_SIZE)
        self._close_data_port()
        self.log.info(
            "migration {mid}: data channel from {peer} authenticated",
            mid=self.migration_id().hex(),
            peer=receiver.out.getPeer(),
        )

    def _drop(self, receiver: DataChannelReceiver, reason: str) -> None:
        if receiver in self.data_receivers:
            self.data_receivers.remove(receiver)
        receiver.out.abortConnection()
        self.log.warn(
            "closed a data connection from {peer}: {reason}",
            peer=receiver.out.getPeer(),
            reason=reason,
        )

    @property
    def stream_transport(self) -> Any:
        """Where image bytes arrive: the data channel, if bound."""
        return self.data_channel.out if self.data_channel is not None else self.out

    def _close_data_port(self) -> None:
        if self.data_port is not None:
            port, self.data_port = self.data_port, None
            port.stopListening()

    def _do_OpenStream(self, effect: effects.OpenStream) -> None:
        arrival = self.admitted()
        if effect.index == 0:
            arrival.journal_phase(Phase.STREAMING, 0)
        # Images on the data channel are authenticated by its records; the
        # insecure twin does no cryptography (its source sends no hash).
        hashed = self.data_channel is None and self.security is not None
        self._submit("opening a staging file", arrival.open_stream, effect.index, hashed)

    def _do_WriteChunk(self, effect: effects.WriteChunk) -> None:
        arrival = self.admitted()
        if self.session.bytes_received > arrival.hello.images[0].size // 2:
            crashpoint.reached(CrashPoint.DESTINATION_STREAMING)
        n = len(effect.data)
        self.queued += n
        now = self.clock.seconds()
        if now - self.progress_journaled >= PROGRESS_INTERVAL:
            # Live bytes for `securemig jobs`, at a bounded rate.
            self.progress_journaled = now
            arrival.journal_progress(self.session.bytes_received)
        if self.queued > self.high_water and not self.reading_paused:
            self.reading_paused = True
            self.stream_transport.pauseProducing()
        self._submit("writing a staging file", arrival.write, effect.data.parts, then=self._drained)

    def _drained(self, nbytes: int) -> None:
        self.queued -= nbytes
        if self.reading_paused and self.queued <= self.high_water // 2:
            self.reading_paused = False
            self.stream_transport.resumeProducing()

    def _do_CloseStream(self, effect: effects.CloseStream) -> None:
        self._submit("closing a staging file", self.admitted().close_stream, effect.sha256)

    def _do_Prepare(self, effect: effects.Prepare) -> None:
        # Every stream is closed and verified once the disk thread has done
        # what is queued.  Then: release the key (secure: unwrapped inside our
        # TPM, only in the attested PCR state), check on the disk thread that
        # the vTPM opens with it and is the one announced, re-seal it to our
        # TPM, and make staging durable there.
        arrival = self.admitted()

        def prepared(_: object) -> None:
            arrival.prepared(self.session.bytes_received)
            self.run(self.session.prepared())

        def stage() -> None:
            if arrival.staged_ahead:
                arrival.prepare()  # nothing left to write: no disk thread's turn
                prepared(None)
            else:
                self._submit("preparing the VM in staging", arrival.prepare, then=prepared)

        def keep(key: VtpmKey, identity: str | None) -> None:
            arrival.keep_key(self.keeper_or_refuse(), key, identity)
            self._submit("preparing the VM in staging", arrival.prepare, then=prepared)

        def release(_: object) -> None:
            key = arrival.release_key(self.security)
            self._submit(
                "checking the vTPM",
                arrival.check_vtpm,
                key,
                then=lambda identity: keep(key, identity),
            )

        if self.carried_key_kept:
            # The hypervisor's own migration (libvirt): its key was released,
            # sealed to our TPM and made durable in staging when it started
            # (_start_carried), and its vTPM state is the hypervisor's to
            # load; nothing to check or seal again while the guest waits
            # paused for the commit.
            stage()
        elif self.session.live and not arrival.carried:
            # Live: the key was released and re-sealed as the vTPM started.
            # Nothing but the decision is on the switchover path: the EK
            # check (a swtpm start) runs on a thread of its own beside
            # PREPARED and the source's commit, and gates ``cont``
            # (Arrival.check_vtpm_beside).
            checker = self.vtpm_checker or self.executor_factory()
            arrival.check_vtpm_beside(
                checker.submit(arrival.check_vtpm, arrival.release_key(self.security))
            )
            checker.shutdown()
            stage()
        elif arrival.key_expected(secure=self.security is not None):
            self._submit("closing the streams", lambda: None, then=release)
        else:
            self._submit("preparing the VM in staging", arrival.prepare, then=prepared)

    def keeper(self) -> KeySealer | None:
        """What seals vTPM keys to this host's TPM (the secure attestor, or
        the insecure listener's ``key_keeper``: the host attestor that seals
        vTPM keys); None: this listener cannot keep one."""
        return self.security.attestor if self.security is not None else self.key_keeper

    def keeper_or_refuse(self) -> KeySealer:
        """:meth:`keeper`, which admission made sure of for a VM with a key."""
        keeper = self.keeper()
        if keeper is None:
            raise ProtocolError(
                ErrorCode.POLICY_REFUSED, "this destination has no TPM identity to keep a vTPM key"
            )
        return keeper

    def _do_CommitInPlace(self, effect: effects.CommitInPlace) -> None:
        arrival = self.admitted()
        if self.security is not None:
            arrival.check_shared_disk(self.security.attestor.identity.name)
        d = Deferred.fromCoroutine(arrival.commit())

        def failed(f: Failure) -> None:
            self.fail(ProtocolError(ErrorCode.RESUME_FAILED, f.getErrorMessage()))

        d.addCallbacks(lambda _: self.run(self.session.resumed()), failed)

    def _do_Discard(self, effect: effects.Discard) -> None:
        if self.live_receiver is not None:
            self.live_receiver.cut()
        if self.carrier is not None:
            self.carrier.close()
        if self.arrival is not None:
            self.arrival.cancel()
            self._submit("removing staging", self.arrival.discard)

    def _do_HoldInDoubt(self, effect: effects.HoldInDoubt) -> None:
        self.admitted().hold()

    def _do_Finished(self, effect: effects.Finished) -> None:
        self._close(effect)
        if self.vtpm_checker is not None and self.arrival is not None:
            # A check started ahead that no prepare used ends with its thread.
            self.vtpm_checker.submit(self.arrival.drop_vtpm_check)
            self.vtpm_checker.shutdown()
        if self.carrier is not None:
            self.carrier.close()
        if self.reading_paused:
            self.stream_transport.resumeProducing()
        self._close_data_port()
        self._apply_drops()
        for receiver in list(self.data_receivers):
            receiver.out.loseConnection()
        if self.executor is not None:
            # Journal the outcome after queued disk work (a discard frees the
            # space a full disk needs for the journal's own write).  The
            # executor exists once an arrival was admitted.
            arrival, nbytes = self.admitted(), self.session.bytes_received
            self.executor.submit(lambda: None).addBoth(
                lambda _: self._journal_outcome(arrival, effect, nbytes)
            )
            self.executor.shutdown()
        if self.resolved is not None:
            # A recovery connection: say what the RESOLVE got, not an outcome
            # of a migration ("busy, try again" is no abort).
            asked, answer = self.resolved
            self.log.info(
                "{what} of migration {mid} from {peer}: answered {settled} ({why})",
                what=(
                    f"RESOLVE {asked.decision.name.lower()}"
                    if isinstance(asked, wire.Resolve)
                    else "ASK"
                ),
                mid=asked.migration_id.hex(),
                peer=self._peer(),
                settled=answer.settled.name.lower(),
                why=answer.reason,
            )
            return
        vm = self.session.hello.vm_name if self.session.hello else "?"
        self.log.info(
            "migration of VM {vm} from {peer} ended: {outcome}{why}",
            vm=vm,
            peer=self._peer(),
            outcome=effect.outcome.value,
            code=effect.code.name if effect.code else None,
            why=f" ({effect.code.name}: {effect.reason})" if effect.code else "",
        )

    def _journal_outcome(self, arrival: ArrivingVM, effect: effects.Finished, nbytes: int) -> None:
        try:
            arrival.finish(effect, nbytes)
        except Exception:
            self.log.failure("could not journal the outcome of migration {mid}", mid=arrival.id)


class DestinationFactory(Factory):
    """Builds a :class:`DestinationProtocol` per connection to one host,
    each with the same :class:`~securemig.transport.options.DestinationOptions`."""

    def __init__(
        self,
        host: ArrivalHost,
        clock: IReactorTime,
        options: DestinationOptions = DestinationOptions(),  # noqa: B008 (frozen)
        executor_factory: Callable[[], Executor] | None = None,
    ) -> None:
        self.host = host
        self.clock = clock
        self.options = options
        self.executor_factory = executor_factory or (lambda: ThreadExecutor(clock))

    def buildProtocol(self, addr: Any) -> DestinationProtocol:
        """A protocol for one incoming migration."""
        p = DestinationProtocol(self.host, self.clock, self.executor_factory, self.options)
        p.factory = self
        return p


class DataChannelReceiver(Connection):
    """One connection to a destination's data channel port: a thin adapter
    that hands its bytes to the control protocol's connection object, which
    decides what they are (:class:`~securemig.protocol.connection.DataConnection`:
    a stranger until a record authenticates; the channel after)."""

    def __init__(self, control: DestinationProtocol) -> None:
        self.control = control
        self.channel: DataConnection | None = None
        #: Paused because the wrapped key is pending.
        self.held = False

    def connectionMade(self) -> None:
        """Ask the control protocol for this connection's place (or close)."""
        tune_transport(self.transport)
        self.channel = self.control.data_connection_made(self)
        if self.channel is None:
            self.out.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Bytes for the connection object."""
        if self.channel is not None:
            self.control.data_received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """A bound channel must have ended with its END record."""
        if self.channel is not None:
            self.control.data_connection_lost(self)


class DataChannelFactory(Factory):
    """Builds receivers for one migration's data channel port."""

    def __init__(self, control: DestinationProtocol) -> None:
        self.control = control

    def buildProtocol(self, addr: Any) -> DataChannelReceiver:
        """A receiver tied to the migration's control protocol."""
        return DataChannelReceiver(self.control)
