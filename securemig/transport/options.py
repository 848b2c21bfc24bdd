"""
What a migration's two ends are told, as typed values built once.

``securemig migrate`` builds a :class:`SourceOptions`, ``twistd securemig``
a :class:`DestinationOptions` per listener (both in ``app/``, from the
command line and the configuration file, after their checks); the shell
hands them down whole instead of repeating their parameters on every
Protocol, Factory and function (as aioquic's ``QuicConfiguration``).  A new
option is a field here, its flag in ``app/`` and its key in
``app/config.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.protocol import Factory

from securemig.host.contract import KeySealer
from securemig.hypervisor.bundle import Bundle
from securemig.protocol import wire
from securemig.protocol.connection import DEADLINE, IDLE_TIMEOUT
from securemig.trust.attestor import FirstUse, open_attestor, warn_on_stderr
from securemig.trust.keyrelease import DestinationSecurity, SourceSecurity
from securemig.trust.revocation import RevocationList

#: Destination: pause reading when this many bytes wait for the disk (at least
#: two chunks, so the disk thread always has the next one queued).
HIGH_WATER = 4 * 1024 * 1024


class ListeningPort(Protocol):
    """A listening port (Twisted's ``IListeningPort``, which mypy cannot
    read from its zope interface)."""

    def getHost(self) -> Any:
        """The address it listens on (an ``IPv4Address``: ``.host``, ``.port``)."""
        ...

    def stopListening(self) -> object:
        """Stop accepting connections."""
        ...


#: Opens a listening port for a data channel: (interface, factory) → its port.
DataListener = Callable[[str, Factory], ListeningPort]


@dataclass(frozen=True)
class SecureOptions:
    """How a source runs the secure variant."""

    identity: Path
    policy_dir: Path | None = None
    tofu: bool = False
    #: The name the destination must prove; default: the host of --to.
    destination_name: str | None = None
    #: The revocation list the destination's AK certificate is checked
    #: against (:func:`securemig.trust.revocation.for_identity`).
    revocation: RevocationList | None = None
    #: Says a trust on first use where the operator sees it (the source's
    #: terminal, or the client of the daemon driving the migration).
    on_first_use: Callable[[FirstUse], None] = warn_on_stderr

    def prepare(self, bundle: Bundle, host: str) -> SourceSecurity:
        """Open the TPM, unseal the VM's vTPM key for this migration."""
        # The source runs on the operator's terminal: trust on first use says so there.
        attestor = open_attestor(
            self.identity, self.policy_dir, self.tofu, self.on_first_use, self.revocation
        )
        secret = attestor.unseal(bundle.vtpm_key_path.read_bytes())
        return SourceSecurity(attestor, secret, self.destination_name or host, bundle.manifest.vtpm)


@dataclass(frozen=True)
class SourceOptions:
    """One migration as the source runs it (:func:`securemig.transport.client.migrate`)."""

    #: ``HOST:PORT`` of the destination.
    to: str
    variant: wire.Variant = wire.Variant.FULL
    chunk_size: int = wire.DEFAULT_CHUNK_SIZE
    idle_timeout: float = IDLE_TIMEOUT
    deadline: float = DEADLINE
    #: The secure variant; None: the insecure one.
    secure: SecureOptions | None = None
    #: Insecure variant: the identity that unseals a vTPM key (sent in the clear).
    unseal_with: Path | None = None
    #: Image bytes a second at most (None: no limit).
    bandwidth: float | None = None
    #: Live migration: (downtime limit in ms, QEMU's bandwidth in bytes/s).
    live: tuple[int, int] | None = None
    #: Live, a backend whose migration carries its disks and channels
    #: (``Capabilities.carried``): copy the disks (non-shared storage), and
    #: this many extra memory channels (0: one stream).
    copy_storage: bool = False
    parallel: int = 0


@dataclass(frozen=True)
class DestinationOptions:
    """How a destination's listener runs each incoming migration
    (:class:`securemig.transport.destination.DestinationFactory`)."""

    #: ``secure`` or ``insecure``: what the journal records.
    protocol_name: str = "insecure"
    idle_timeout: float = IDLE_TIMEOUT
    deadline: float = DEADLINE
    #: Pause reading when this many bytes wait for the disk.
    high_water: int = HIGH_WATER
    #: The secure variant's :class:`~securemig.trust.keyrelease.DestinationSecurity`.
    security: DestinationSecurity | None = None
    #: Insecure variant: what keeps a vTPM key that arrives in the clear
    #: (this host's attestor, which seals it to its TPM).
    key_keeper: KeySealer | None = None
    #: Secure variant: opens a migration's data channel port (None: images
    #: inside TLS).
    data_listener: DataListener | None = None
    #: Opens a live migration's stream port (``--data-ports`` applies to it
    #: too, with or without ``--tls-data``); None: any free port.
    live_listener: DataListener | None = None
