"""
Which messages each channel may carry, when the data channel may be read,
and the data channel's reader: bytes in, stream messages out.

A secure migration with a data channel has two byte streams from the
source, with one rule each::

    control connection (TLS)               data channel (TCP, AEAD records)
    HELLO, CHALLENGE, EVIDENCE,            FRAMES records holding STREAM_BEGIN,
    WRAPPED_KEY, COMMIT, ABORT;            DATA, STREAM_END; then one END record
    never a stream frame

Nothing orders the two streams on the wire: the source sends WRAPPED_KEY on
the control connection and then, at once, the first record on the data
channel, which can arrive first (a control segment retransmitted, or
delayed by a proxy).  So the destination does not read the data channel
while the wrapped key is pending (the predicate
:attr:`securemig.protocol.destination.State.key_pending`, a column of the
destination's state table); the bytes wait in
the kernel, TCP's window pushes back on the source, and reading resumes the
moment WRAPPED_KEY is accepted.  No round trip is added.

:class:`DataChannelReader` is the record -> frame -> message chain of one
data connection; it raises :class:`~securemig.protocol.errors.PeerViolation`
(with its code) for anything the data channel may not carry.  Which
connection is *the* channel, and what a violation means for the migration,
is decided by :class:`~securemig.protocol.connection.DestinationConnection`.
"""

from __future__ import annotations

from securemig.protocol import records, wire
from securemig.protocol.errors import ErrorCode, PeerViolation

#: The frames that carry images: on the data channel, and only there once
#: one is offered.
STREAM_MESSAGES = (wire.StreamBegin, wire.Data, wire.StreamEnd)

#: The first record of a data channel holds exactly one STREAM_BEGIN frame
#: (the source seals one frame per record).  A connection is a stranger
#: until that record authenticates, so until then no longer record is
#: accepted: a stranger cannot make the destination buffer a chunk's worth.
FIRST_RECORD_PLAINTEXT = len(wire.encode(wire.StreamBegin(0)))


def check_control(message: wire.Message, data_channel_offered: bool) -> None:
    """Refuse a message that may not arrive on the control connection: with
    a data channel offered, images travel only on it (a stream frame here
    would bypass its records)."""
    if data_channel_offered and isinstance(message, STREAM_MESSAGES):
        raise PeerViolation(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"{type(message).__name__} on the control connection: images travel on the "
            "data channel",
        )


def check_data_channel(message: wire.Message) -> None:
    """Refuse a message that may not arrive on the data channel: stream
    frames only (a COMMIT sealed into a record is still a violation)."""
    if not isinstance(message, STREAM_MESSAGES):
        raise PeerViolation(
            ErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} on the data channel"
        )


class DataChannelReader:
    """One data connection, sans-IO: received bytes in, stream messages out.

    Records are opened by a :class:`~securemig.protocol.records.Opener`
    (bounded before anything is buffered, authenticated, in sequence), the
    frames inside them decoded with the agreed chunk size as the DATA bound,
    and every message checked with :func:`check_data_channel`.
    :meth:`next_message` raises ``PeerViolation`` with the code of whatever
    failed.  :meth:`feed` never raises, so a caller may hold bytes unread.
    """

    def __init__(self, opener: records.Opener, chunk_size: int) -> None:
        self.opener = opener
        self.decoder = wire.FrameDecoder(max_data=chunk_size)
        #: The most a caller should hold unread: one record of the largest size.
        self.hold_limit = records.max_record(chunk_size)
        # Until the first record opened, only one of STREAM_BEGIN's size is
        # accepted (checked from its header, before anything is buffered).
        self._max_plaintext = opener.max_plaintext
        opener.max_plaintext = FIRST_RECORD_PLAINTEXT

    @property
    def authenticated(self) -> bool:
        """True once a record opened: only the TLS peer holds the key, so
        this connection is the source's."""
        return self.opener.sequence > 0

    @property
    def ended(self) -> bool:
        """True once the END record was read."""
        return self.opener.ended

    @property
    def buffered(self) -> int:
        """Received bytes not yet returned as messages."""
        return self.opener.buffered + self.decoder.buffered

    def feed(self, data: bytes) -> None:
        """Append received bytes (kept by reference; nothing is parsed yet)."""
        self.opener.feed(data)

    def next_message(self) -> wire.Message | None:
        """The next stream message, or None (more bytes needed, or ended)."""
        while True:
            message = self.decoder.next_message()
            if message is not None:
                check_data_channel(message)
                return message
            plain = self.opener.next_record()
            if plain is None:
                return None
            # Authenticated: records of any size the chunk size allows follow.
            self.opener.max_plaintext = self._max_plaintext
            self.decoder.feed(plain)

    def closed(self) -> None:
        """The connection ended: refuse a channel cut before its END record."""
        self.opener.closed()
