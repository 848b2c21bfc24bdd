"""
The secure variant's data channel: AEAD records on a plain TCP connection.

Twisted's TLS moves bulk data one 16 KiB TLS record per Python call into
pyOpenSSL, which makes it the bottleneck of a migration (see
``doc/performance.rst``).  So, as DTLS-SRTP keys SRTP (RFC 5764), the images
travel on a second connection whose records are sealed with keys exported
from the attested TLS session of the control connection:

- key: the TLS exporter with label :data:`EXPORTER_LABEL` and the migration
  id as context; only the two ends of that TLS session can compute it, and
  a new session gives a new key (records of one session are refused in
  another);
- AEAD: the one the TLS session negotiated (AES-128-GCM, AES-256-GCM or
  ChaCha20-Poly1305), so ``--tls-cipher`` chooses both;
- nonce: the record's sequence number (64-bit, implicit, never sent), so a
  dropped, repeated or reordered record fails authentication;
- associated data: a label, the migration id, the record kind and the
  sequence number;
- the channel ends with an authenticated END record: a connection that
  closes without one was truncated.

Each FRAMES record carries whole protocol frames (STREAM_BEGIN, DATA,
STREAM_END) exactly as they would appear on the control connection.  This
module is sans-IO: it turns frames into bytes to send, and received bytes
into frames, and knows nothing of sockets.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from securemig.protocol.errors import ErrorCode, PeerViolation, ProtocolError
from securemig.protocol.wire import HEADER, MAX_CONTROL_PAYLOAD, ByteQueue

#: The TLS exporter label of the data channel's key.
EXPORTER_LABEL = b"EXPORTER-securemig-data-channel"
#: The TLS exporter label of a live migration's stream key (QEMU's own
#: stream in records): its own label, so its key is never the image streams'.
LIVE_EXPORTER_LABEL = b"EXPORTER-securemig-live-stream"
#: Record header: kind (1 byte), then the ciphertext's length (4 bytes).
RECORD_HEADER = struct.Struct("!BI")
#: The AEAD tag length of every cipher used here.
TAG = 16
#: Prefix of every record's associated data.
AD_LABEL = b"securemig data record v1"


class Kind(enum.IntEnum):
    """What a record carries."""

    FRAMES = 0  #: whole protocol frames
    END = 1  #: nothing: the authenticated end of the channel


#: TLS 1.3 cipher suite → (AEAD, key length).
AEADS: dict[str, tuple[Any, int]] = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32),
}


def key_length(tls_cipher: str) -> int:
    """How many key bytes to export for the AEAD of this TLS cipher suite."""
    return _aead(tls_cipher)[1]


def _aead(tls_cipher: str) -> tuple[Any, int]:
    try:
        return AEADS[tls_cipher]
    except KeyError:
        raise PeerViolation(
            ErrorCode.BAD_PARAMETER, f"no data channel AEAD for TLS cipher {tls_cipher}"
        ) from None


def _nonce(sequence: int) -> bytes:
    return sequence.to_bytes(12, "big")


def _ad(migration_id: bytes, kind: Kind, sequence: int) -> bytes:
    return b"".join((AD_LABEL, migration_id, bytes([kind]), sequence.to_bytes(8, "big")))


class _Channel:
    def __init__(self, tls_cipher: str, key: bytes, migration_id: bytes) -> None:
        aead, length = _aead(tls_cipher)
        if len(key) != length:
            raise ValueError(f"{tls_cipher} needs a {length}-byte key")
        self.aead = aead(key)
        self.migration_id = migration_id
        self.sequence = 0


class Sealer(_Channel):
    """The sending end: frames in, records out."""

    def seal(self, frames: Sequence[bytes | memoryview], kind: Kind = Kind.FRAMES) -> list[bytes]:
        """One record holding ``frames`` (joined): the buffers to write."""
        if self.sequence >= 1 << 64:
            raise ProtocolError(ErrorCode.INTERNAL, "data channel sequence exhausted")
        plain = frames[0] if len(frames) == 1 else b"".join(frames)
        sealed = self.aead.encrypt(
            _nonce(self.sequence), plain, _ad(self.migration_id, kind, self.sequence)
        )
        self.sequence += 1
        return [RECORD_HEADER.pack(kind, len(sealed)), sealed]

    def seal_into(self, plain: memoryview, out: memoryview, kind: Kind = Kind.FRAMES) -> int:
        """Seal ``plain`` as one record into ``out``, allocating nothing: the
        same bytes as :meth:`seal`, header first.  ``out`` holds at least
        ``RECORD_HEADER.size + len(plain) + TAG`` bytes and is not ``plain``;
        returns the record's length."""
        if self.sequence >= 1 << 64:
            raise ProtocolError(ErrorCode.INTERNAL, "data channel sequence exhausted")
        length = len(plain) + TAG
        RECORD_HEADER.pack_into(out, 0, kind, length)
        end = RECORD_HEADER.size + length
        self.aead.encrypt_into(
            _nonce(self.sequence),
            plain,
            _ad(self.migration_id, kind, self.sequence),
            out[RECORD_HEADER.size : end],
        )
        self.sequence += 1
        return end

    def end(self) -> list[bytes]:
        """The END record: nothing may follow it."""
        return self.seal([b""], Kind.END)


def _unauthentic(sequence: int) -> PeerViolation:
    """What a data record that fails its tag is refused as."""
    return PeerViolation(
        ErrorCode.RECORD_REFUSED,
        f"data record {sequence} does not authenticate (altered, out of order, "
        "repeated or from another session)",
    )


class Opener(_Channel):
    """The receiving end: bytes in, the frames of authentic records out.

    ``max_plaintext`` bounds a record before any of it is buffered.  Any
    record that does not authenticate (flipped, dropped, repeated,
    reordered, from another session or migration) ends the channel with
    :class:`~securemig.protocol.ProtocolError` ``RECORD_REFUSED``.
    """

    def __init__(self, tls_cipher: str, key: bytes, migration_id: bytes, max_plaintext: int):
        super().__init__(tls_cipher, key, migration_id)
        self.max_plaintext = max_plaintext
        self.ended = False
        self._queue = ByteQueue()
        self._header: tuple[Kind, int] | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes.  Never raises: bytes after the END record
        are refused by the next :meth:`next_record`."""
        self._queue.feed(data)

    @property
    def buffered(self) -> int:
        """Received bytes not yet opened."""
        return self._queue.available

    def _take(self, n: int) -> bytes | memoryview:
        # A record within one received buffer is decrypted in place.
        parts = self._queue.take(n)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_buffered(self) -> bytes:
        """Remove and return every received byte not yet opened (a record
        header already read included), for a reader that goes on with this
        opener's sequence through :meth:`header` and :meth:`open_into`."""
        head = b"" if self._header is None else RECORD_HEADER.pack(*self._header)
        self._header = None
        return head + b"".join(self._queue.take(self._queue.available))

    def header(self, raw: bytes | memoryview) -> tuple[Kind, int]:
        """Check a record's header (its first :data:`RECORD_HEADER` bytes)
        before anything of the record is buffered: its kind, and the length
        of what follows it (within ``max_plaintext`` plus the tag)."""
        if self.ended:
            raise PeerViolation(ErrorCode.RECORD_REFUSED, "data after the END record")
        raw_kind, length = RECORD_HEADER.unpack(raw)
        if raw_kind not in (Kind.FRAMES, Kind.END):
            raise PeerViolation(ErrorCode.RECORD_REFUSED, f"unknown record kind {raw_kind}")
        if not TAG <= length <= self.max_plaintext + TAG:
            raise PeerViolation(
                ErrorCode.FRAME_TOO_LARGE,
                f"data record of {length} bytes (at most {self.max_plaintext + TAG})",
            )
        return Kind(raw_kind), length

    def open_into(self, kind: Kind, sealed: bytes | memoryview, out: memoryview) -> int:
        """Authenticate and decrypt the record after a :meth:`header` of
        ``kind`` (``sealed``: its ciphertext and tag) into ``out`` (at least
        ``len(sealed) - TAG`` bytes, not overlapping ``sealed``); the
        plaintext's length.  An END record sets :attr:`ended` (and must be
        empty).  A record that fails to authenticate raises
        ``RECORD_REFUSED``, and what ``out`` then holds is not to be used
        (GCM writes the plaintext before it checks the tag)."""
        try:
            n: int = self.aead.decrypt_into(
                _nonce(self.sequence),
                sealed,
                _ad(self.migration_id, kind, self.sequence),
                out[: len(sealed) - TAG],
            )
        except InvalidTag:
            raise _unauthentic(self.sequence) from None
        self.sequence += 1
        if kind is Kind.END:
            if n:
                raise PeerViolation(ErrorCode.RECORD_REFUSED, "data after the END record")
            self.ended = True
        return n

    def next_record(self) -> bytes | None:
        """The plaintext of the next FRAMES record, or None (more bytes
        needed, or the END record was read: see :attr:`ended`)."""
        if self.ended:
            if self._queue.available:
                raise PeerViolation(ErrorCode.RECORD_REFUSED, "data after the END record")
            return None
        if self._header is None:
            if self._queue.available < RECORD_HEADER.size:
                return None
            self._header = self.header(self._take(RECORD_HEADER.size))
        kind, length = self._header
        if self._queue.available < length:
            return None
        sealed = self._take(length)
        self._header = None
        try:
            plain: bytes = self.aead.decrypt(
                _nonce(self.sequence), sealed, _ad(self.migration_id, kind, self.sequence)
            )
        except InvalidTag:
            raise _unauthentic(self.sequence) from None
        self.sequence += 1
        if kind is Kind.END:
            if plain or self._queue.available:
                raise PeerViolation(ErrorCode.RECORD_REFUSED, "data after the END record")
            self.ended = True
            return None
        return plain

    def closed(self) -> None:
        """The connection ended: refuse a channel that did not end with END."""
        if not self.ended:
            raise PeerViolation(
                ErrorCode.RECORD_REFUSED,
                f"data channel closed after {self.sequence} records without its END record "
                "(truncated)",
            )


def max_plaintext(chunk_size: int) -> int:
    """The largest FRAMES record for a chunk size: one frame, DATA or not."""
    return HEADER.size + max(chunk_size, MAX_CONTROL_PAYLOAD)


def max_record(chunk_size: int) -> int:
    """The largest record on the wire for a chunk size, header and tag included."""
    return RECORD_HEADER.size + max_plaintext(chunk_size) + TAG
