"""
The Twisted shell around the sans-IO core: bytes in, effects out.

``FramedProtocol`` turns received bytes into messages with
:class:`~securemig.protocol.wire.FrameDecoder`, hands them to a session from
:mod:`securemig.protocol.session`, and carries out the effects the session returns.
It owns the two clocks of a connection: an *idle* timer, reset by any
progress (bytes received, the transport taking more of our data, a disk
write finishing), and an overall *deadline*.

Data path, and why it looks like this:

- The source streams each image with :class:`ImageStreamer`, a *push*
  producer: whenever the transport wants data it reads one large chunk,
  hashes it, and writes header and chunk with ``writeSequence`` so the chunk
  is never copied into a frame.  (Twisted's ``FileSender`` is a pull producer
  with 16 KiB chunks; it costs a Python round trip per 16 KiB.)
- The destination never writes files on the reactor thread.  Each
  connection gets its own single-thread pool (a shared pool could reorder
  one file's writes); chunks are queued to it in order, hashed and written
  in the same pass.  When more than ``high_water`` bytes are queued the
  destination pauses the transport, so TCP's window pushes back on the
  source and memory is bounded by the window, not by the image.
- Secure variant: the images go on a data channel of their own
  (:class:`DataChannelSender` → :class:`DataChannelReceiver`), sealed into
  AEAD records by :mod:`securemig.protocol.records` on the source's reader thread;
  Twisted's TLS would cost a Python round trip per 16 KiB record.  The
  destination opens records on the reactor thread and hands their frames to
  the same session as if they had come on the control connection.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from collections import deque
from collections.abc import Callable, Generator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

from twisted.internet import error as net_error
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from securemig.hypervisor.bundle import disk_owner
from securemig.protocol import records, wire
from securemig.protocol import session as s
from securemig.protocol.errors import ErrorCode, ProtocolError, io_error
from securemig.transport import tls
from securemig.transport.tls import channel_binding, peer_names
from securemig.trust.attest import AttestationError
from securemig.trust.keyrelease import (
    MIGRATION_KEY_ROLE,
    DestinationSecurity,
    KeyTransferError,
    check_offer,
    qualifying_data,
    wrap,
)
from securemig.trust.tpm.tpm import TPMError

T = TypeVar("T")

#: Defaults for the two timers of a connection, in seconds.
IDLE_TIMEOUT = 60.0
DEADLINE = 3600.0
#: After ending a session, how long to keep reading (and discarding) so the
#: peer gets our ABORT: closing a socket with unread data sends a TCP reset,
#: which makes the peer's kernel drop what it had not yet read.
CLOSE_GRACE = 10.0
#: Destination: pause reading when this many bytes wait for the disk (at least
#: two chunks, so the disk thread always has the next one queued).
HIGH_WATER = 4 * 1024 * 1024


class Executor(TypingProtocol):
    """Runs blocking jobs in submission order and reports through Deferreds."""

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Queue ``fn(*args)``; fire with its result or failure."""

    def shutdown(self) -> None:
        """Release the executor once the queued jobs are done."""


class ThreadExecutor:
    """A dedicated single-thread pool: one file's writes never reorder, and
    the reactor thread never blocks on the disk."""

    def __init__(self, reactor: IReactorThreads, name: str = "securemig-disk") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._pool.start()
        # A stopped reactor must not wait forever for an idle worker.
        self._trigger = reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "during", "shutdown", self._pool.stop
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Queue ``fn(*args)`` on the worker thread."""
        return deferToThreadPool(self._reactor, self._pool, fn, *args)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        """Stop the worker after what is queued."""

        def stop(_: object) -> None:
            self._reactor.removeSystemEventTrigger(self._trigger)  # type: ignore[attr-defined]
            self._pool.stop()

        self.submit(lambda: None).addBoth(stop)


class InlineExecutor:
    """Runs each job at once on the calling thread.

    For the in-memory (``iosim``) protocol tests, which are about message
    order and flow control, not threads; never used by the commands.
    """

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` now."""
        return maybeDeferred(fn, *args)

    def shutdown(self) -> None:
        """Nothing to release."""


def failure_to_error(failure: Failure | BaseException, doing: str) -> ProtocolError:
    """Map a local failure onto a protocol error with a stable code."""
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, ProtocolError):
        return error
    if isinstance(error, OSError):
        return io_error(error, doing)

    if isinstance(error, AttestationError):
        return ProtocolError(ErrorCode.ATTESTATION_FAILED, str(error))
    if isinstance(error, KeyTransferError):
        return ProtocolError(ErrorCode.KEY_TRANSFER_FAILED, str(error))
    if isinstance(error, sqlite3.Error):
        # SQLite reports a full disk as its own error, not as ENOSPC.
        full = "full" in str(error)
        code = ErrorCode.DISK_FULL if full else ErrorCode.IO_ERROR
        return ProtocolError(code, f"{doing}: journal: {error}")
    return ProtocolError(ErrorCode.INTERNAL, f"{doing}: {error}")


def _is_refusal(error: Exception) -> bool:
    """An expected refusal by a security check (no traceback needed)."""

    return isinstance(error, (AttestationError, KeyTransferError, TPMError))


#: Bytes a TCP transport reads or sends per system call (Twisted: 64 KiB / 128 KiB).
TRANSPORT_IO_SIZE = 1024 * 1024


def _with_tcp(transport: Any) -> tuple[Any, ...]:
    """A transport, and the TCP transport under it when it is TLS."""
    return (transport, getattr(transport, "transport", None))


def tune_transport(transport: Any) -> None:
    """Read and send in 1 MiB pieces instead of Twisted's 64 and 128 KiB.

    Each read is one trip around the reactor with its Python overhead; at
    64 KiB a GiB costs 16,384 of them.  ``bufferSize`` and ``SEND_LIMIT`` are
    attributes of Twisted's TCP transports; under TLS they are on the TCP
    transport the TLS protocol wraps; on others (iosim) this does nothing.
    """
    for candidate in _with_tcp(transport):
        if hasattr(candidate, "SEND_LIMIT") and hasattr(candidate, "bufferSize"):
            candidate.bufferSize = TRANSPORT_IO_SIZE
            candidate.SEND_LIMIT = TRANSPORT_IO_SIZE


def tcp_bytes_acked(transport: Any) -> int | None:
    """Bytes this TCP connection sent that the peer acknowledged (Linux
    ``TCP_INFO`` ``tcpi_bytes_acked``), under TLS too: what crossed the
    wire, TLS records and all, without retransmissions.  None elsewhere."""
    import socket

    for candidate in _with_tcp(transport):
        try:
            # A closed Twisted TCP transport has no socket any more.
            handle = getattr(candidate, "getHandle", lambda: None)()
        except AttributeError:
            return None
        if isinstance(handle, socket.socket) and hasattr(socket, "TCP_INFO"):
            try:
                info = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                return None
            if len(info) >= TCP_INFO_BYTES_ACKED + 8:
                return int.from_bytes(
                    info[TCP_INFO_BYTES_ACKED : TCP_INFO_BYTES_ACKED + 8], sys.byteorder
                )
    return None


#: Offset of ``tcpi_bytes_acked`` (u64) in Linux's ``struct tcp_info`` (since 4.1).
TCP_INFO_BYTES_ACKED = 120


class Connection(Protocol):
    """A protocol whose transport is used as what it is."""

    @property
    def out(self) -> Any:
        """The transport.  Twisted declares its type through zope interfaces,
        which mypy cannot read; this is the one place we say so."""
        return self.transport


class FramedProtocol(Connection):
    """Common to both sides: framing, timers, and running session effects.

    Subclasses define ``_do_<Effect>`` for the effects of their side.
    """

    log = Logger()
    session: s.DestinationSession | s.SourceSession

    def __init__(
        self, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT, deadline: float = DEADLINE
    ) -> None:
        self.clock: Any = clock
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.decoder = wire.FrameDecoder()
        self.connection_open = True
        self._idle: Any = None  # IDelayedCall
        self._overall: Any = None

    # -- Twisted's Protocol interface

    def connectionMade(self) -> None:
        """Start both timers; let the transport move bulk data in large pieces."""
        tune_transport(self.transport)
        self._idle = self.clock.callLater(self.idle_timeout, self._timed_out, "idle")
        self._overall = self.clock.callLater(self.deadline, self._timed_out, "deadline")

    def dataReceived(self, data: bytes) -> None:
        """Feed bytes to the decoder and every whole message to the session."""
        if self.session.finished:
            return
        self.touch()
        self.decoder.feed(data)
        while not self.session.finished:
            try:
                message = self.decoder.next_message()
                if message is None:
                    return
                self.check_control(message)
                effects = self.session.receive(message)
            except ProtocolError as e:
                self.fail(e)
                return
            self.run(effects)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Stop the timers; a session still running learns it lost its peer."""
        self._cancel_timers()
        self.connection_open = False
        if not self.session.finished:
            clean = reason.check(net_error.ConnectionDone, net_error.ConnectionLost)
            # A TLS refusal (bad certificate, wrong name) arrives as the reason.
            self.run(self.session.connection_lost("" if clean else reason.getErrorMessage()))

    # -- helpers for subclasses

    def check_control(self, message: wire.Message) -> None:
        """Refuse a message that may not arrive on the control connection."""

    def touch(self) -> None:
        """Progress was made: restart the idle timer."""
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)

    def fail(self, error: ProtocolError) -> None:
        """End the session because of a local failure or a peer's violation."""
        if not self.session.finished:
            self.log.warn("failing: {code}: {reason}", code=error.code.name, reason=error.reason)
            self.run(self.session.fail(error.code, error.reason))

    def run(self, effects: s.Effects) -> None:
        """Carry out effects in order.

        An effect that raises ends the session with the error's code (a full
        disk under the journal is DISK_FULL, not a dropped connection); the
        rest of that batch is skipped, because it assumed success.
        """
        for effect in effects:
            try:
                getattr(self, "_do_" + type(effect).__name__)(effect)
            except Exception as e:
                doing = type(effect).__name__
                if isinstance(e, (ProtocolError, OSError, sqlite3.Error)) or _is_refusal(e):
                    self.log.warn("{doing} refused: {e}", doing=doing, e=e)
                else:
                    self.log.failure("{doing} failed", doing=doing)
                if not self.session.finished:
                    self.fail(failure_to_error(e, doing))
                return

    def send(self, message: Any) -> None:
        """Write one control message."""
        self.out.write(wire.encode(message))

    def _do_Send(self, effect: s.Send) -> None:
        self.send(effect.message)

    # -- the secure variant (TPM operations are quick and run in place)

    security: Any = None

    def migration_id(self) -> bytes:
        """This migration's id (known once the destination admitted it)."""
        raise NotImplementedError

    def journal_phase(self, phase: str) -> None:
        """Record a phase of this migration in this side's journal."""
        raise NotImplementedError

    def peer_name(self) -> str:
        """The name the peer must prove (TLS and AK certificate alike)."""
        raise NotImplementedError

    def qualifying(self, role: str, nonce: bytes) -> bytes:
        """Qualifying data bound to this TLS session and migration."""

        return qualifying_data(channel_binding(self.transport), role, nonce, self.migration_id())

    def data_channel_key(self) -> tuple[str, bytes]:
        """The TLS cipher suite of this session and the data channel's key,
        exported from it for this migration: only the TLS peer has it."""

        cipher = tls.cipher_suite(self.transport)
        key = tls.exported(
            self.transport, records.EXPORTER_LABEL, records.key_length(cipher), self.migration_id()
        )
        return cipher, key

    def _do_Attest(self, effect: s.Attest) -> None:
        evidence = self.security.attestor.evidence(self.qualifying(effect.role, effect.nonce))
        self.run(self.session.attested(evidence))

    def _do_VerifyPeer(self, effect: s.VerifyPeer) -> None:
        qualifying = self.qualifying(effect.role, effect.nonce)
        self.peer_values = self.security.attestor.verify(
            effect.evidence, qualifying, self.peer_name()
        )
        self.peer_ak = effect.evidence.ak_public
        self.log.info("{peer} attested", peer=self.peer_name())
        self.journal_phase("peer-attested")
        self.run(self.session.peer_verified())

    def _do_Finished(self, effect: s.Finished) -> None:
        self._cancel_timers()
        if self.connection_open:
            self.close_gracefully()

    def close_gracefully(self) -> None:
        """Flush and half-close; drop the connection once the peer closed
        its side too or after :data:`CLOSE_GRACE` seconds."""
        if hasattr(self.out, "loseWriteConnection") and hasattr(self.out, "abortConnection"):
            self.out.loseWriteConnection()
            self._overall = self.clock.callLater(CLOSE_GRACE, self.out.abortConnection)
        else:
            self.out.loseConnection()

    def _timed_out(self, which: str) -> None:
        if which == "idle":
            reason = f"no progress for {self.idle_timeout:g} s in phase {self.session.phase}"
        else:
            reason = f"migration ran past its deadline of {self.deadline:g} s"
        self.fail(ProtocolError(ErrorCode.TIMEOUT, reason))

    def _cancel_timers(self) -> None:
        for call in (self._idle, self._overall):
            if call is not None and call.active():
                call.cancel()


# --------------------------------------------------------------------------
# Destination


class DestinationProtocol(FramedProtocol):
    """One incoming migration, on a destination."""

    session: s.DestinationSession

    def __init__(
        self,
        host: Any,
        clock: IReactorTime,
        executor_factory: Callable[[], Executor],
        protocol_name: str = "insecure",
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        high_water: int = HIGH_WATER,
        security: Any = None,
        sealer: Any = None,
        data_listener: DataListener | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, deadline)
        self.security = security
        self.sealer = sealer
        self.data_listener = data_listener if security is not None else None
        #: The data channel: its listening port, then its bound connection.
        self.data_port: Any = None
        self.data_offered = False
        self.data_channel: DataChannelReceiver | None = None
        self.session = s.DestinationSession(secure=security is not None)
        self.wrapped_key: Any = None
        self.host = host
        self.protocol_name = protocol_name
        self.executor_factory = executor_factory
        self.high_water = high_water
        self.arrival: Any = None
        self.executor: Executor | None = None
        self.queued = 0
        self.reading_paused = False

    def _peer(self) -> str:
        peer = self.out.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def migration_id(self) -> bytes:
        """The id this destination gave the migration."""
        return bytes(self.arrival.migration_id)

    def peer_name(self) -> str:
        """The source's name from its verified TLS certificate."""

        names = peer_names(self.transport)
        if not names:
            raise ProtocolError(
                ErrorCode.ATTESTATION_FAILED, "the source's certificate names no host"
            )
        return names[0]

    def _do_OfferKey(self, effect: s.OfferKey) -> None:

        qualifying = self.qualifying(MIGRATION_KEY_ROLE, b"")
        offer = self.security.key.offer(self.security.attestor.identity.ak, qualifying)
        self.run(self.session.key_offered(offer))

    def _do_AcceptKey(self, effect: s.AcceptKey) -> None:
        self.wrapped_key = effect.wrapped
        self.journal_phase("key-received")

    def journal_phase(self, phase: str) -> None:
        """Record a phase in the destination's journal."""
        self.arrival.journal_phase(phase, self.session.bytes_received)

    def _submit(
        self,
        doing: str,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any], None] | None = None,
    ) -> None:
        assert self.executor is not None

        def done(result: Any) -> None:
            self.touch()
            if then is not None and not self.session.finished:
                try:
                    then(result)
                except Exception as e:
                    self.fail(failure_to_error(e, doing))

        def failed(failure: Failure) -> None:
            self.fail(failure_to_error(failure, doing))

        self.executor.submit(fn, *args).addCallbacks(done, failed)

    def _do_Admit(self, effect: s.Admit) -> None:
        try:
            if self.security is not None:
                self.security.check_source(self.peer_name())
            elif self.sealer is None and any(i.name == "vtpm" for i in effect.hello.images):
                raise ProtocolError(
                    ErrorCode.POLICY_REFUSED,
                    "this destination has no TPM "
                    "identity to keep a vTPM key (start it with --identity)",
                )
            self.arrival = self.host.admit(effect.hello, self._peer(), self.protocol_name)
        except ProtocolError as e:
            self.log.info("refused VM {vm}: {reason}", vm=effect.hello.vm_name, reason=e.reason)
            self.run(self.session.refused(e.code, e.reason))
            return
        self.decoder.max_data = effect.hello.chunk_size
        self.high_water = max(self.high_water, 2 * effect.hello.chunk_size)
        self.executor = self.executor_factory()
        if self.data_listener is not None:
            # On the address the source reached us at; a port of its own.
            self.data_port = self.data_listener(self.out.getHost().host, DataChannelFactory(self))
            self.session.offer_data_port(self.data_port.getHost().port)
            self.data_offered = True
        self.run(self.session.admitted(self.arrival.migration_id))

    # -- the data channel (secure variant; see securemig.protocol.records)

    def check_control(self, message: wire.Message) -> None:
        """With a data channel, images may arrive only on it."""
        if self.data_offered and isinstance(message, STREAM_MESSAGES):
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{type(message).__name__} on the control connection: images travel on the "
                "data channel",
            )

    def data_opener(self) -> Any:
        """The receiving end of the data channel, keyed from this TLS session."""

        hello = self.session.hello
        assert hello is not None
        return records.Opener(
            *self.data_channel_key(), self.migration_id(), records.max_plaintext(hello.chunk_size)
        )

    def bind_data_channel(self, channel: DataChannelReceiver) -> bool:
        """A data connection proved it holds the key: it is the channel, and
        the listener closes.  False if there already is one."""
        if self.data_channel is not None or self.session.finished:
            return False
        self.data_channel = channel
        self._close_data_port()
        self.log.info(
            "migration {mid}: data channel from {peer} authenticated",
            mid=self.migration_id().hex(),
            peer=channel.out.getPeer(),
        )
        return True

    def stream_message(self, message: wire.Message) -> None:
        """A message from the bound data channel: stream frames only."""
        self.touch()
        if not isinstance(message, STREAM_MESSAGES):
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{type(message).__name__} on the data channel",
            )
        self.run(self.session.receive(message))

    @property
    def stream_transport(self) -> Any:
        """Where image bytes arrive: the data channel, if bound."""
        return self.data_channel.out if self.data_channel is not None else self.out

    def _close_data_port(self) -> None:
        if self.data_port is not None:
            port, self.data_port = self.data_port, None
            port.stopListening()

    def _do_OpenStream(self, effect: s.OpenStream) -> None:
        if effect.index == 0:
            self.arrival.journal_phase("streaming", 0)
        # Images on the data channel are authenticated by its records.
        hashed = self.data_channel is None
        self._submit("opening a staging file", self.arrival.open_stream, effect.index, hashed)

    def _do_WriteChunk(self, effect: s.WriteChunk) -> None:
        n = len(effect.data)
        self.queued += n
        if self.queued > self.high_water and not self.reading_paused:
            self.reading_paused = True
            self.stream_transport.pauseProducing()
        self._submit(
            "writing a staging file", self.arrival.write, effect.data.parts, then=self._drained
        )

    def _drained(self, nbytes: int) -> None:
        self.queued -= nbytes
        if self.reading_paused and self.queued <= self.high_water // 2:
            self.reading_paused = False
            self.stream_transport.resumeProducing()

    def _do_CloseStream(self, effect: s.CloseStream) -> None:
        self._submit("closing a staging file", self.arrival.close_stream, effect.sha256)

    def _do_Prepare(self, effect: s.Prepare) -> None:
        def prepared(_: object) -> None:
            self.arrival.journal_phase("prepared", self.session.bytes_received)
            self.run(self.session.prepared())

        def receive_key(_: object) -> None:
            # Every stream is closed and verified now.  Secure: unwrap inside
            # our TPM (only in the attested PCR state).  Then, on the disk
            # thread, check the vTPM opens with the key and is the one
            # announced (a swtpm start); then re-seal the key to our TPM: it
            # is never written in the clear here.

            key = self.wrapped_key
            if isinstance(key, wire.WrappedKey):
                secret, expected = self.security.unwrap(key, self.migration_id())
            elif isinstance(key, wire.ClearKey) and len(key.material) in (32, 64):
                secret, expected = key.material[:32], key.material[32:]
            else:
                raise KeyTransferError("no usable vTPM key arrived")

            def checked(identity: str | None) -> None:
                self.arrival.sealed_vtpm_key = self.keeper().seal(secret)
                self.arrival.vtpm_identity = identity
                self._submit("preparing the VM in staging", self.arrival.prepare, then=prepared)

            self._submit(
                "checking the vTPM",
                DestinationSecurity.check_vtpm,
                self.arrival.staging,
                secret,
                expected,
                then=checked,
            )

        if self.wrapped_key is None and self.security is None:
            if any(i.name == "vtpm" for i in self.arrival.hello.images):
                raise KeyTransferError("a vTPM state arrived without its key")
            self._submit("preparing the VM in staging", self.arrival.prepare, then=prepared)
        else:
            self._submit("closing the streams", lambda: None, then=receive_key)

    def keeper(self) -> Any:
        """What seals vTPM keys to this host's TPM (the secure attestor, or
        the insecure listener's ``sealer``)."""
        return self.security.attestor if self.security is not None else self.sealer

    def _do_CommitInPlace(self, effect: s.CommitInPlace) -> None:
        shared = self.arrival.hello.shared_disk
        if self.security is not None and shared:
            # The source handed the disk over at its commit point, before COMMIT.
            owner, me = disk_owner(Path(shared)), self.security.attestor.identity.name
            if owner not in (None, me):
                raise ProtocolError(
                    ErrorCode.RESUME_FAILED, f"shared disk {shared} belongs to {owner}, not to us"
                )
        d = Deferred.fromCoroutine(self.arrival.commit())

        def failed(f: Failure) -> None:
            self.fail(ProtocolError(ErrorCode.RESUME_FAILED, f.getErrorMessage()))

        d.addCallbacks(lambda _: self.run(self.session.resumed()), failed)

    def _do_Discard(self, effect: s.Discard) -> None:
        if self.arrival is not None:
            self.arrival.cancel()
            self._submit("removing staging", self.arrival.discard)

    def _do_HoldInDoubt(self, effect: s.HoldInDoubt) -> None:
        self.arrival.hold()

    def _do_Finished(self, effect: s.Finished) -> None:
        super()._do_Finished(effect)
        if self.reading_paused:
            self.stream_transport.resumeProducing()
        self._close_data_port()
        if self.data_channel is not None:
            self.data_channel.out.loseConnection()
        if self.executor is not None:
            # Journal the outcome after queued disk work (a discard frees the
            # space a full disk needs for the journal's own write).
            arrival, nbytes = self.arrival, self.session.bytes_received
            self.executor.submit(lambda: None).addBoth(
                lambda _: self._journal_outcome(arrival, effect, nbytes)
            )
            self.executor.shutdown()
        vm = self.session.hello.vm_name if self.session.hello else "?"
        self.log.info(
            "migration of VM {vm} from {peer} ended: {outcome}{why}",
            vm=vm,
            peer=self._peer(),
            outcome=effect.outcome.value,
            why=f" ({effect.code.name}: {effect.reason})" if effect.code else "",
        )

    def _journal_outcome(self, arrival: Any, effect: s.Finished, nbytes: int) -> None:
        try:
            arrival.finish(effect, nbytes)
        except Exception:
            self.log.failure("could not journal the outcome of migration {mid}", mid=arrival.id)


class DestinationFactory(Factory):
    """Builds a :class:`DestinationProtocol` per connection to one host."""

    def __init__(
        self,
        host: Any,
        clock: Any,
        protocol_name: str = "insecure",
        executor_factory: Callable[[], Executor] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        security: Any = None,
        sealer: Any = None,
        data_listener: DataListener | None = None,
    ) -> None:
        self.host = host
        self.security = security
        self.sealer = sealer
        self.data_listener = data_listener
        self.clock = clock
        self.protocol_name = protocol_name
        self.executor_factory = executor_factory or (lambda: ThreadExecutor(clock))
        self.idle_timeout = idle_timeout
        self.deadline = deadline

    def buildProtocol(self, addr: Any) -> DestinationProtocol:
        """A protocol for one incoming migration."""
        p = DestinationProtocol(
            self.host,
            self.clock,
            self.executor_factory,
            self.protocol_name,
            self.idle_timeout,
            self.deadline,
            security=self.security,
            sealer=self.sealer,
            data_listener=self.data_listener,
        )
        p.factory = self
        return p


#: Opens a listening port for a data channel: (interface, factory) → IListeningPort.
DataListener = Callable[[str, Factory], Any]
#: The frames that carry images.
STREAM_MESSAGES = (wire.StreamBegin, wire.Data, wire.StreamEnd)


class DataChannelReceiver(Connection):
    """One connection to a destination's data channel port.

    Until a record from it authenticates it is a stranger: anything wrong
    just closes it (anyone can connect to a port).  Once one has, it is the
    channel: a bad record, or a close before the END record, fails the
    migration.
    """

    log = Logger()

    def __init__(self, control: DestinationProtocol) -> None:
        self.control = control
        self.opener: Any = None
        self.bound = False
        self.decoder: wire.FrameDecoder | None = None

    def connectionMade(self) -> None:
        """Key the opener from the control connection's TLS session."""
        tune_transport(self.transport)
        hello = self.control.session.hello
        if self.control.session.finished or hello is None:
            self.out.loseConnection()
            return
        self.opener = self.control.data_opener()
        self.decoder = wire.FrameDecoder(max_data=hello.chunk_size)

    def dataReceived(self, data: bytes) -> None:
        """Open records; hand their frames to the control protocol."""
        if self.opener is None or self.control.session.finished:
            return
        try:
            self.opener.feed(data)
            while (plain := self.opener.next_record()) is not None:
                if not self.bound:
                    if not self.control.bind_data_channel(self):
                        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a second data channel")
                    self.bound = True
                assert self.decoder is not None
                self.decoder.feed(plain)
                while (message := self.decoder.next_message()) is not None:
                    self.control.stream_message(message)
                    if self.control.session.finished:
                        return
        except ProtocolError as e:
            self._refuse(e)

    def _refuse(self, error: ProtocolError) -> None:
        self.opener = None
        self.out.abortConnection()
        if self.bound:
            self.control.fail(error)
        else:
            self.log.warn(
                "closed a data connection from {peer}: {reason}",
                peer=self.out.getPeer(),
                reason=error.reason,
            )

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """A bound channel must have ended with its END record."""
        if self.bound and self.opener is not None and not self.control.session.finished:
            try:
                self.opener.closed()
            except ProtocolError as e:
                self.control.fail(e)


class DataChannelFactory(Factory):
    """Builds receivers for one migration's data channel port."""

    def __init__(self, control: DestinationProtocol) -> None:
        self.control = control

    def buildProtocol(self, addr: Any) -> DataChannelReceiver:
        """A receiver tied to the migration's control protocol."""
        return DataChannelReceiver(self.control)


# --------------------------------------------------------------------------
# Source


#: A frame to send: buffers for writeSequence, image bytes in it, ends a stream.
Frame = tuple[list[bytes], int, bool]


@implementer(interfaces.IPushProducer)
class ImageStreamer:
    """A push producer writing every image as STREAM_BEGIN, DATA*, STREAM_END.

    Reading and hashing happen on a worker thread, a few chunks ahead of the
    transport, so the reactor thread only writes: the two overlap instead of
    taking turns.  The frames come from :meth:`_frames`, a generator that
    the worker advances one frame at a time (never two at once: the worker
    is a single thread), so the SHA-256 that ends a stream is of exactly the
    bytes read for it.  ``images`` is a list of ``(path, size)`` in manifest
    order.
    """

    #: How many frames may be read ahead of the transport.
    READ_AHEAD = 4

    def __init__(
        self,
        transport: Any,
        images: list[tuple[Path, int]],
        chunk_size: int,
        executor: Executor,
        on_progress: Callable[[int], None],
        on_done: Callable[[], None],
        on_error: Callable[[ProtocolError], None],
        sealer: Any = None,
    ) -> None:
        self.transport = transport
        #: Data channel: seals each frame into a record (on the worker thread).
        self.sealer = sealer
        self.images = images
        self.chunk_size = chunk_size
        self.executor = executor
        self.on_progress = on_progress
        self.on_done = on_done
        self.on_error = on_error
        self.paused = False
        self.stopped = False
        self._frames_left: Generator[Frame, None, None] = (
            self._frames() if sealer is None else self._records(self._frames())
        )
        self._ready: deque[Frame] = deque()
        self._streams_sent = 0
        self._in_flight = 0
        self._eof = False
        self._requesting = False

    def start(self) -> None:
        """Register with the transport and begin reading ahead."""
        self.transport.registerProducer(self, True)
        self._request()

    def resumeProducing(self) -> None:
        """The transport wants more."""
        self.paused = False
        self._pump()

    def pauseProducing(self) -> None:
        """The transport's buffer is full."""
        self.paused = True

    def stopProducing(self) -> None:
        """Stop for good (abort, or the connection went away)."""
        if not self.stopped:
            self.stopped = True
            self._ready.clear()
            self.transport.unregisterProducer()
            # Close the generator (and its open file) on the thread that runs it.
            self.executor.submit(self._frames_left.close)
            self.executor.shutdown()

    def _frames(self) -> Generator[Frame, None, None]:
        """Each frame to send: buffers for writeSequence, the image bytes in it,
        and whether it ends a stream."""
        for index, (path, size) in enumerate(self.images):
            yield [wire.encode(wire.StreamBegin(index))], 0, False
            # On the data channel the records' AEAD already authenticates
            # every byte, their order and the end: no second hash.
            digest = hashlib.sha256() if self.sealer is None else None
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(self.chunk_size):
                    sent += len(chunk)
                    if sent > size:
                        raise ProtocolError(ErrorCode.IO_ERROR, f"{path} grew during the migration")
                    if digest is not None:
                        digest.update(chunk)
                    yield [wire.data_header(len(chunk)), chunk], len(chunk), False
            if sent != size:
                raise ProtocolError(ErrorCode.IO_ERROR, f"{path} shrank during the migration")
            end = wire.StreamEnd(wire.UNHASHED if digest is None else digest.digest())
            yield [wire.encode(end)], 0, True

    def _records(self, frames: Generator[Frame, None, None]) -> Generator[Frame, None, None]:
        """The frames sealed into data channel records, one frame per record,
        and the END record after the last."""
        ended = 0
        for buffers, n, ends_stream in frames:
            sealed = self.sealer.seal(buffers)
            ended += ends_stream
            if ended == len(self.images):
                sealed += self.sealer.end()
            yield sealed, n, ends_stream

    def _request(self) -> None:
        # Guard against re-entry: an inline executor answers within submit().
        if self._requesting:
            return
        self._requesting = True
        try:
            while (
                not self.stopped
                and not self._eof
                and self._in_flight + len(self._ready) < self.READ_AHEAD
            ):
                self._in_flight += 1
                d = self.executor.submit(next, self._frames_left, None)
                d.addCallbacks(self._arrived, self._failed)
        finally:
            self._requesting = False

    def _arrived(self, frame: Frame | None) -> None:
        self._in_flight -= 1
        if self.stopped:
            return
        if frame is None:
            self._eof = True
        else:
            self._ready.append(frame)
        self._pump()

    def _failed(self, failure: Failure) -> None:
        self._in_flight -= 1
        if not self.stopped:
            self.stopProducing()
            self.on_error(failure_to_error(failure, "reading an image"))

    def _pump(self) -> None:
        while self._ready and not self.paused and not self.stopped:
            buffers, n, ends_stream = self._ready.popleft()
            self.transport.writeSequence(buffers)
            if n:
                self.on_progress(n)
            if ends_stream:
                self._streams_sent += 1
                if self._streams_sent == len(self.images):
                    # Done the moment the last byte is written: the peer may
                    # answer PREPARED before the reader thread says "no more".
                    self.stopProducing()
                    self.on_done()
                    return
        if not self.stopped:
            self._request()


class SourceProtocol(FramedProtocol):
    """The source's connection: drives one :class:`~securemig.protocol.session.SourceSession`.

    ``departure`` is the host side (lock, journal, commit, roll back; see
    :mod:`securemig.host.departure`).  ``finished`` fires with the final
    :class:`~securemig.protocol.session.Finished` effect.
    """

    session: s.SourceSession

    def __init__(
        self,
        session: s.SourceSession,
        departure: Any,
        clock: IReactorTime,
        executor_factory: Callable[[], Executor],
        on_progress: Callable[[int], None] = lambda n: None,
        idle_timeout: float = IDLE_TIMEOUT,
        deadline: float = DEADLINE,
        security: Any = None,
        data_connector: DataConnector | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, deadline)
        self.session = session
        self.security = security
        self.data_connector = data_connector or partial(connect_data_channel, clock)
        self.data_channel: DataChannelSender | None = None
        self.departure = departure
        self.executor_factory = executor_factory
        self.on_progress = on_progress
        self.streamer: ImageStreamer | None = None
        self.finished: Deferred[s.Finished] = Deferred()
        self.rolled_back: Deferred[None] | None = None
        self.bytes_sent = 0
        #: TCP payload bytes acknowledged by the destination, both
        #: connections, when the session finished (None where unknown).
        self.wire_bytes: int | None = None

    def connectionMade(self) -> None:
        """Say HELLO."""
        super().connectionMade()
        self.departure.connected()
        self.run(self.session.start())

    def _do_StartStreams(self, effect: s.StartStreams) -> None:
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

    def _stream(self, transport: Any, sealer: Any) -> None:
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
        )
        self.streamer.start()

    def migration_id(self) -> bytes:
        """The id the destination gave this migration."""
        assert self.session.migration_id is not None
        return self.session.migration_id

    def peer_name(self) -> str:
        """The destination's name, which TLS already checked."""
        return str(self.security.destination_name)

    def journal_phase(self, phase: str) -> None:
        """Record a phase in the source's journal."""
        self.departure.journal.phase(self.departure.id, phase)

    def _do_WrapKey(self, effect: s.WrapKey) -> None:

        self.journal_phase("key-offered")
        key = check_offer(
            effect.offer,
            self.peer_ak,
            self.qualifying(MIGRATION_KEY_ROLE, b""),
            self.security.attestor.pcrs,
            self.peer_values,
        )
        wrapped = wrap(key, self.security.key_material(), self.migration_id())
        self.run(self.session.key_wrapped(wrapped))

    def _do_CommitLocally(self, effect: s.CommitLocally) -> None:
        def failed(f: Failure) -> None:
            self.fail(failure_to_error(f, "committing at the source"))

        Deferred.fromCoroutine(self.departure.commit()).addCallbacks(
            lambda _: self.run(self.session.committed_locally()), failed
        )

    def _do_RollBack(self, effect: s.RollBack) -> None:
        self._stop_streaming()
        self.rolled_back = self.departure.rollback()

    def _do_Finished(self, effect: s.Finished) -> None:
        try:
            counts = [tcp_bytes_acked(self.transport)]
            if self.data_channel is not None:
                counts.append(tcp_bytes_acked(self.data_channel.transport))
            self.wire_bytes = None if None in counts else sum(c or 0 for c in counts)
            self._stop_streaming()
            super()._do_Finished(effect)
            self.departure.finish(effect, self.bytes_sent)
        finally:
            # Whatever failed above, the caller must learn the outcome (nothing
            # else would: the session has ended).  Report it only once the VM
            # is back where it was (a resume).
            rolled_back = self.rolled_back or succeed(None)
            rolled_back.addBoth(lambda _: self.finished.callback(effect))

    def _stop_streaming(self) -> None:
        if self.streamer is not None:
            self.streamer.stopProducing()
        channel = self.data_channel
        if channel is not None and channel.transport is not None and channel.connected:
            if channel.done:
                channel.out.loseConnection()
            else:
                channel.done = True
                channel.out.abortConnection()


#: Opens the source's data connection: (host, port, protocol) → Deferred(protocol).
DataConnector = Callable[[str, int, Protocol], Deferred[Any]]


def connect_data_channel(reactor: Any, host: str, port: int, proto: Protocol) -> Deferred[Any]:
    """Connect ``proto`` to a destination's data channel port over TCP."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol

    endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return connectProtocol(endpoint_type(reactor, host, port, timeout=30), proto)


class DataChannelSender(Connection):
    """The source's data connection; it only sends (records, from the
    :class:`ImageStreamer`).  Losing it before the streams are sent fails
    the migration."""

    def __init__(self, control: SourceProtocol) -> None:
        self.control = control
        self.done = False

    def connectionMade(self) -> None:
        """Send in large pieces."""
        tune_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """The destination never sends on the data channel: a violation."""
        self.control.fail(ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "bytes on the data channel"))

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Cut before the streams were all sent: the migration cannot go on."""
        if not self.done and not self.control.session.finished:
            self.control.fail(
                ProtocolError(
                    ErrorCode.CONNECTION_LOST,
                    f"the data channel closed: {reason.getErrorMessage()}",
                )
            )
