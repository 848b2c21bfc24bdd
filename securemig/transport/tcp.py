"""
TCP endpoints, tuning and accounting under Twisted's transports (TLS or not).
"""

from __future__ import annotations

import contextlib
import random
import socket
import sys
from typing import Any, TypeVar

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol

from securemig.protocol.errors import ErrorCode, LocalFault

#: Bytes a TCP transport reads or sends per system call (Twisted: 64 KiB / 128 KiB).
TRANSPORT_IO_SIZE = 1024 * 1024
#: Bytes a bound data channel reads per system call: several of its records
#: (a record is a chunk and a few dozen bytes more), so that most arrive
#: whole in one read and are decrypted where they are; at
#: :data:`TRANSPORT_IO_SIZE` every one spanned two reads and was first
#: joined, a copy of each byte on the destination's reactor thread.  Only
#: once the channel authenticated: a stranger's reads stay small.
BOUND_DATA_READ_SIZE = 4 * 1024 * 1024
#: How long a TCP connection may take to be established.
CONNECT_TIMEOUT = 30.0


def client_endpoint(
    reactor: Any, host: str, port: int, timeout: float = CONNECT_TIMEOUT
) -> TCP4ClientEndpoint | TCP6ClientEndpoint:
    """The TCP client endpoint to ``host`` (an IPv4 or IPv6 address, without
    brackets, or a name) and ``port``: every connection securemig opens
    (control, data, RESOLVE) is made here."""
    endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return endpoint_type(reactor, host, port, timeout=timeout)


P = TypeVar("P", bound=Protocol)


def connect(endpoint: Any, proto: P) -> Deferred[P]:
    """Connect ``proto`` through ``endpoint``; fires with it once connected.
    Twisted's ``connectProtocol``, typed (Twisted does not annotate it)."""
    connected: Deferred[P] = connectProtocol(endpoint, proto)  # type: ignore[no-untyped-call]
    return connected


def _with_tcp(transport: Any) -> tuple[Any, ...]:
    """A transport, and the transports under it: under TLS the TCP
    transport, and between them a wrapper such as the pre-authentication
    guard (``transport/limits.py``)."""
    chain = [transport]
    for _ in range(3):
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
        chain.append(transport)
    return tuple(chain)


def tune_transport(transport: Any, read_size: int = TRANSPORT_IO_SIZE) -> None:
    """Read (``read_size``) and send in 1 MiB pieces instead of Twisted's 64
    and 128 KiB.

    Each read is one trip around the reactor with its Python overhead; at
    64 KiB a GiB costs 16,384 of them.  ``bufferSize`` and ``SEND_LIMIT`` are
    attributes of Twisted's TCP transports; under TLS they are on the TCP
    transport the TLS protocol wraps; on others (iosim) this does nothing.
    """
    for candidate in _with_tcp(transport):
        if hasattr(candidate, "SEND_LIMIT") and hasattr(candidate, "bufferSize"):
            candidate.bufferSize = read_size
            candidate.SEND_LIMIT = TRANSPORT_IO_SIZE
        if isinstance(candidate, tcp.Connection):
            no_delay(candidate.getHandle())


def no_delay(sock: Any) -> None:
    """Send a TCP socket's small writes at once (``TCP_NODELAY``): the
    commit's messages (PREPARED, COMMIT, DONE) and a stream's last partial
    segment must not wait for the peer's (delayed, up to 40 ms) ACK of
    what went before -- they sit between QEMU's completion and ``cont``.
    Nothing for a socket that is not TCP."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def dup_socket(transport: Any) -> socket.socket | None:
    """A second descriptor of a plain TCP transport's socket, for a thread
    that sends on it while Twisted keeps the connection (its reads, its
    close); None for any other transport (TLS, iosim).  The duplicate shares
    the socket's non-blocking mode, so give it a timeout, not blocking."""
    if not isinstance(transport, tcp.Connection) or not transport.connected:
        return None
    handle = transport.getHandle()
    return handle.dup() if isinstance(handle, socket.socket) else None


def tcp_bytes_acked(transport: Any) -> int | None:
    """Bytes this TCP connection sent that the peer acknowledged (Linux
    ``TCP_INFO`` ``tcpi_bytes_acked``), under TLS too: what crossed the
    wire, TLS records and all, without retransmissions.  None elsewhere."""
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


class NoFreePort(LocalFault):
    """Every port of the destination's ``--data-ports`` range is taken."""

    default_code = ErrorCode.IO_ERROR


def parse_port_range(text: str) -> range:
    """``LOW-HIGH`` (both included, 1-65535, LOW <= HIGH) as a range, or
    ValueError saying what is wrong with it."""
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError("write it as LOW-HIGH, e.g. 40000-40099")
    first, last = int(low), int(high)
    if not 0 < first <= last < 65536:
        raise ValueError("ports are 1-65535, LOW at most HIGH")
    return range(first, last + 1)


def listen_in_range(reactor: Any, ports: range | None, factory: Any, interface: str) -> Any:
    """Listen for ``factory`` on ``interface``: on any free port, or on the
    first free one of ``ports`` (tried from a random place in the range, so
    concurrent migrations do not all probe the same taken ports first);
    :class:`NoFreePort` when all are taken."""
    if ports is None:
        return reactor.listenTCP(0, factory, interface=interface)
    offset = random.randrange(len(ports))
    for i in range(len(ports)):
        try:
            return reactor.listenTCP(ports[(offset + i) % len(ports)], factory, interface=interface)
        except CannotListenError:
            continue
    raise NoFreePort(
        f"no free data channel port: all of {ports[0]}-{ports[-1]} (--data-ports) are in use; "
        "widen the range or let running migrations end"
    )
